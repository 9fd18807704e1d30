"""The seven stage operators of a pipeline DAG."""

from __future__ import annotations

import json
import logging
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowSkipException

from mlplatform.operators.base import StageOperator

log = logging.getLogger(__name__)


def _partitions(ctx: Any):
    from mlplatform.data.partitions import list_partitions, split_partitions

    training, current = split_partitions(list_partitions(ctx.spec.spec.data.source, ctx.config,
                                                      ctx.tenant.spec.data.allowed_prefixes), ctx.as_of)
    return [f for p in training for f in p.files], list(current.files), current.date


class ValidateOperator(StageOperator):
    """Great Expectations checks on the training partitions; failing ``error`` checks stop the run."""

    stage = "validate"

    def run(self, ctx, upstream, context):
        from mlplatform.stages.validate import validate_data

        training_files, _, current_date = _partitions(ctx)
        result = validate_data(ctx, training_files)
        log.info("validation passed: %s rows, %s expectations, %s warnings",
                 result["rows"], result["evaluated"], len(result["warnings"]))
        for w in result["warnings"]:
            log.warning("expectation warning: %s", w)
        return {**result, "as_of": current_date, "training_files": [str(f) for f in training_files]}


class FeaturesOperator(StageOperator):
    """Feast: apply the tenant's feature views, build the point-in-time training set, materialize online."""

    stage = "features"

    def run(self, ctx, upstream, context):
        from mlplatform.stages.features import build_features

        training_files, current_files, _ = _partitions(ctx)
        result = build_features(ctx, training_files, current_files)
        result["current_files"] = [str(f) for f in current_files]
        log.info("training set: %s rows (%s train / %s holdout), fingerprint %s",
                 result["rows"], result["train_rows"], result["holdout_rows"], result["fingerprint"])
        return result


class TrainOperator(StageOperator):
    """Runs the trainer: a local process by default, a Kubernetes pod when the platform says so."""

    stage = "train"
    upstream_stages = ("features",)
    ui_color = "#fde8e8"

    def run(self, ctx, upstream, context):
        features = upstream["features"]
        if ctx.config.train_backend == "kubernetes":
            from mlplatform.k8s.run import run_pod_trainer

            result = run_pod_trainer(ctx, features, context)
        else:
            from mlplatform.stages.train_local import run_local_trainer

            result = run_local_trainer(ctx, features)
        log.info("trained run %s: %s", result["run_id"], json.dumps(result.get("metrics", {}), sort_keys=True))
        return result

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
        from mlplatform.stages.evaluate import evaluate_model

        result = evaluate_model(ctx, upstream["train"], upstream["features"])
        log.info("evaluation %s: %s", result["decision"].upper(), result["reason"])
        return result


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
        from mlplatform.stages.drift import compute_drift, summary_lines

        features = upstream["features"]
        result = compute_drift(ctx, _path(features["train_path"]), [_path(f) for f in features["current_files"]],
                               features["feature_columns"])
        for line in summary_lines(result):
            log.info("%s", line)
        result["event_emitted"] = False
        if result["drift_detected"]:
            log.info("drift found; retraining is requested by the monitor DAG %s__monitor, not here", ctx.dag_id)
        return result


def _path(value: str):
    from pathlib import Path

    return Path(value)


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
