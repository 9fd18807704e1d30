"""The seven stage operators of a pipeline DAG."""

from __future__ import annotations

import json
import logging
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowSkipException

from mlplatform.operators.base import StageOperator

log = logging.getLogger(__name__)


def _isolated(entry: str, ctx: Any, *args: Any) -> Any:
    """Run ``mlplatform.stages.entry.<entry>`` in the tenant's sandbox: tenant data, column names and
    hyperparameters never meet the secrets of this task process (``mlplatform.sandbox``)."""
    from mlplatform import sandbox

    return sandbox.run(f"mlplatform.stages.entry:{entry}", *args, ctx=ctx)


class ValidateOperator(StageOperator):
    """Great Expectations checks on the training partitions; failing ``error`` checks stop the run."""

    stage = "validate"

    def run(self, ctx, upstream, context):
        return _isolated("validate", ctx)


class FeaturesOperator(StageOperator):
    """Feast: apply the tenant's feature views, build the point-in-time training set, materialize online."""

    stage = "features"

    def run(self, ctx, upstream, context):
        return _isolated("features", ctx)


class TrainOperator(StageOperator):
    """Runs the trainer: a local process by default, a Kubernetes pod when the platform says so."""

    stage = "train"
    upstream_stages = ("features",)
    ui_color = "#fde8e8"

    def run(self, ctx, upstream, context):
        features = upstream["features"]
        if ctx.config.train_backend == "kubernetes":
            # Platform work: creates the pod (tenant namespace and service account) with the cluster connection.
            from mlplatform.k8s.run import run_pod_trainer

            result = run_pod_trainer(ctx, features, context)
            log.info("trained run %s: %s", result["run_id"], json.dumps(result.get("metrics", {}), sort_keys=True))
            return result
        return _isolated("train_local", ctx, features)

    def execute_complete(self, context, event=None, **kwargs):
        """Where the triggerer resumes the kubernetes backend's deferred pod (``mlplatform.k8s.run``)."""
        from mlplatform.k8s.run import resume_pod_trainer

        result = resume_pod_trainer(self.run_context(context), context, event or {}, **kwargs)
        log.info("trained run %s: %s", result["run_id"], json.dumps(result.get("metrics", {}), sort_keys=True))
        return result


class EvaluateOperator(StageOperator):
    """Gates the challenger on the spec's minimum and on beating the champion; never fails the run."""

    stage = "evaluate"
    upstream_stages = ("train", "features")

    def run(self, ctx, upstream, context):
        return _isolated("evaluate", ctx, upstream["train"], upstream["features"])


class RegisterOperator(StageOperator):
    """Registers the accepted model in MLflow (idempotent per DAG run) with alias ``challenger``."""

    stage = "register"
    upstream_stages = ("train", "evaluate", "features")

    promote = False  # templates without a canary stage promote right after registering

    def run(self, ctx, upstream, context):
        evaluation = upstream["evaluate"]
        if evaluation["decision"] != "accepted":
            raise AirflowSkipException(f"model rejected by evaluate: {evaluation['reason']}")
        from mlplatform.stages.register import register_model

        lineage = {"data_fingerprint": upstream["features"]["fingerprint"]}
        result = register_model(ctx, upstream["train"], evaluation, lineage)
        log.info("%s version %s (%s)", result["model_name"], result["version"],
                 "created" if result["created"] else "already registered by an earlier try")
        if self.promote:
            from mlplatform.stages.deploy import promote_without_canary

            result["promotion"] = promote_without_canary(ctx, result)
            log.info("no canary in this template: version %s is now champion", result["version"])
        return result


class CanaryDeployOperator(StageOperator):
    """Serves the challenger next to the champion, bakes on replayed traffic, promotes or rolls back."""

    stage = "canary_deploy"
    upstream_stages = ("register", "features")

    def run(self, ctx, upstream, context):
        from mlplatform.stages.deploy import canary_deploy

        result = canary_deploy(ctx, upstream["register"], upstream["features"])
        log.info("canary decision: %s (champion is now version %s)", result["decision"], result["champion_version"])
        return result


class DriftMonitorOperator(StageOperator):
    """Evidently drift between the training snapshot and the newest partition: a report, no trigger.

    Drift-triggered retraining comes from the pipeline's monitor DAG (``<dag_id>__monitor``), which applies
    the cooldown and the daily cap before it emits the drift Asset.
    """

    stage = "drift_monitor"
    upstream_stages = ("features",)

    def run(self, ctx, upstream, context):
        result = _isolated("drift_monitor", ctx, upstream["features"])
        result["event_emitted"] = False
        if result["drift_detected"]:
            log.info("drift found; retraining is requested by the monitor DAG %s__monitor, not here", ctx.dag_id)
        return result


class SpecErrorOperator(BaseOperator):
    """The one task of a broken spec's DAG: fails with the lint errors, so they show in the UI and logs."""

    ui_color = "#ffd6d6"

    def __init__(self, *, problems: list[str], **kwargs: Any):
        super().__init__(**kwargs)
        self.problems = problems

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException("this pipeline's spec is invalid; fix it and the DAG comes back:\n"
                                   + "\n".join(self.problems))


STAGE_OPERATORS: dict[str, type[StageOperator]] = {
    op.stage: op
    for op in (ValidateOperator, FeaturesOperator, TrainOperator, EvaluateOperator, RegisterOperator,
               CanaryDeployOperator, DriftMonitorOperator)
}
