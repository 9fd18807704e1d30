"""The control DAG's operator: a person's promote-now / abort / rollback, applied through the canary state machine."""

from __future__ import annotations

import json
import logging
from typing import Any

from mlplatform.operators.base import StageOperator

log = logging.getLogger(__name__)


def actor_of(context: Any) -> str:
    """Who asked: the user who triggered the control run, else the run itself."""
    dag_run = context.get("dag_run")
    user = getattr(dag_run, "triggering_user_name", None)
    return f"user:{user}" if user else f"airflow:{getattr(dag_run, 'run_id', None) or context.get('run_id')}"


class CanaryControlOperator(StageOperator):
    """Applies the trigger form's ``action`` (promote_now | abort | rollback_to_previous) to the pipeline's model."""

    stage = "canary_control"
    ui_color = "#fff4d6"
    pipelines: dict = {}  # pipeline name -> (spec, spec sha256), set by the factory

    def execute(self, context):
        """Act on the pipeline the trigger form names (the tenant's control DAG serves all its pipelines)."""
        from airflow.sdk.exceptions import AirflowFailException

        name = (context.get("params") or {}).get("pipeline")
        if name not in self.pipelines:
            raise AirflowFailException(f"unknown pipeline {name!r}; choose one of {', '.join(sorted(self.pipelines))}")
        self.spec, self.spec_sha256 = self.pipelines[name]
        return super().execute(context)

    def run(self, ctx, upstream, context):
        from mlplatform.stages import registry
        from mlplatform.stages.canary_state import ACTIONS, apply_action
        from mlplatform.stages.context import StageFailed

        action = ctx.params.get("action")
        if action not in ACTIONS:
            raise StageFailed(f"choose an action in the trigger form: one of {', '.join(ACTIONS)}")
        try:
            result = apply_action(registry.client(ctx), ctx.spec.model_name, action, actor=actor_of(context),
                                  reason=str(ctx.params.get("reason") or ""), run_id=ctx.run_id,
                                  audit_file=ctx.artifact_dir / "canary-audit.jsonl")
        except LookupError as exc:  # nothing to act on: retrying cannot help
            raise StageFailed(str(exc)) from None
        log.info("%s on %s: %s", action, ctx.spec.model_name, json.dumps(result, default=str, sort_keys=True))
        return result


GATEWAY_CONN_ID = "mlplatform_gateway"  # HTTP connection: host = the gateway URL, password = a platform token


class DeferrableCanaryDeployOperator(StageOperator):
    """The deploy stage with deferrable bakes on the standalone gateway (``python -m mlplatform.serving``).

    Each step: the state machine moves the canary share in MLflow (the gateway follows it), the task defers to
    ``GatewayBakeTrigger`` for the bake time (no worker slot held while real traffic flows), then judges the
    step's gates in ``execute_complete`` and defers again for the next step, or decides. Crash-safe like the
    blocking form: every resumption reads the state recorded in MLflow. The factory uses it when
    ``MLPLATFORM_GATEWAY_URL`` is set; the bearer token is the ``mlplatform_gateway`` connection's password.
    Attributes ``gateway_url`` and ``gateway_token`` (``for_spec(extra=...)``) override both.
    """

    stage = "canary_deploy"
    upstream_stages = ("register", "features")
    gateway_url: str | None = None
    gateway_token: str | None = None

    def _gateway(self, ctx) -> tuple[str, str | None]:
        """(URL, bearer token): the attributes, else ``MLPLATFORM_GATEWAY_URL`` and the connection's password,
        else the ``mlplatform_gateway`` connection alone."""
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            conn = BaseHook.get_connection(GATEWAY_CONN_ID)
        except AirflowNotFoundException:
            conn = None
        url = self.gateway_url or ctx.config.gateway_url
        if not url and conn is not None:
            host = conn.host or ""
            url = host if "://" in host else f"{conn.schema or 'http'}://{host}:{conn.port or 8000}"
        if not url:
            raise RuntimeError(f"no standalone gateway: set MLPLATFORM_GATEWAY_URL or the {GATEWAY_CONN_ID} "
                               "connection")
        return url, self.gateway_token or (conn.password if conn is not None else None) or None

    def _machine(self, ctx, registered):
        from mlplatform.stages import registry
        from mlplatform.stages.canary_state import CanaryMachine
        from mlplatform.stages.deploy import task_actor

        return CanaryMachine(registry.client(ctx), registered["model_name"], str(registered["version"]),
                             actor=task_actor(ctx), run_id=ctx.run_id,
                             audit_file=ctx.artifact_dir / "canary-audit.jsonl")

    def run(self, ctx, upstream, context):
        from mlplatform.stages.deploy import canary_deploy

        registered = upstream["register"]
        machine = self._machine(ctx, registered)
        champion = machine.aliases().get("champion")
        if champion is None or champion == machine.version or ctx.params.get("skip_canary"):
            return canary_deploy(ctx, registered, upstream["features"])  # no bake: first model, retry, skip
        return self._advance(ctx, machine, registered, champion, machine.begin_step(ctx.spec.spec.deployment,
                                                                                    champion))

    def _advance(self, ctx, machine, registered, champion, outcome):
        from mlplatform.spec.model import duration_seconds
        from mlplatform.triggers.canary import GatewayBakeTrigger

        kind, value = outcome
        if kind == "done":
            (ctx.artifact_dir / "canary.json").write_text(json.dumps(value, indent=2, default=str))
            log.info("canary decision: %s (champion is now version %s)", value.get("decision"),
                     value.get("champion_version"))
            return value
        step, share = value
        url, token = self._gateway(ctx)
        bake = duration_seconds(ctx.spec.spec.deployment.bake_time)
        log.info("canary step %d: %.0f%% of %s traffic to v%s; deferring for the %ss bake", step + 1, 100 * share,
                 machine.name, machine.version, bake)
        self.defer(trigger=GatewayBakeTrigger(url, machine.name, champion, machine.version, share, bake, token),
                   method_name="execute_complete", kwargs={"registered": registered, "champion": champion})

    def execute_complete(self, context, event=None, registered=None, champion=None):
        import os

        from airflow.sdk.exceptions import AirflowFailException

        from mlplatform.operators.base import _QUIET_ENV
        from mlplatform.stages.canary_state import CanaryHeld

        for key, value in _QUIET_ENV.items():
            os.environ.setdefault(key, value)
        event = event or {}
        if event.get("status") != "baked":
            raise RuntimeError(f"canary bake failed: {event.get('message')}")  # retried; the state resumes
        ctx = self.run_context(context)
        machine = self._machine(ctx, registered)
        deployment = ctx.spec.spec.deployment
        try:
            kind, value = machine.finish_step(deployment, event["stats"], event.get("bake_seconds", 0.0))
            if kind == "next":
                return self._advance(ctx, machine, registered, champion, machine.begin_step(deployment, champion))
            return self._advance(ctx, machine, registered, champion, (kind, value))
        except CanaryHeld as exc:
            raise AirflowFailException(str(exc)) from None
