"""The base of every stage operator: the spec travels with the task, the work happens in ``run()``."""

from __future__ import annotations

import logging
import os
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from mlplatform.config import get_config
from mlplatform.spec.model import PipelineSpec, TenantFile

log = logging.getLogger(__name__)

# Set wherever tasks run: MLflow and friends phone home otherwise.
_QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "GIT_PYTHON_REFRESH": "quiet"}


class StageOperator(BaseOperator):
    """Runs one pipeline stage for one spec; subclasses implement ``run(ctx, upstream, context)``.

    Stage operators define no ``__init__``: Airflow deep-copies the DAG's Params once per ``__init__`` level
    of every operator, which made parsing 1,000 specs 40% slower. ``for_spec`` sets the spec afterwards.
    """

    ui_color = "#e8f0fe"
    stage: str = ""
    upstream_stages: tuple[str, ...] = ()
    spec: PipelineSpec
    tenant: TenantFile
    spec_sha256: str

    @classmethod
    def for_spec(cls, *, spec: PipelineSpec, tenant: TenantFile, spec_sha256: str, extra: dict | None = None,
                 **kwargs: Any) -> StageOperator:
        """Create the task and attach the spec, its tenant and any stage-specific attributes."""
        task = cls(**kwargs)
        task.spec, task.tenant, task.spec_sha256 = spec, tenant, spec_sha256
        for name, value in (extra or {}).items():
            setattr(task, name, value)
        return task

    def run_context(self, context: Any):
        from mlplatform.stages.context import RunContext

        check_conf_keys(self, context)
        params = dict(context.get("params") or {})
        return RunContext(
            spec=self.spec,
            tenant=self.tenant,
            config=get_config(),
            run_id=context["run_id"],
            spec_sha256=self.spec_sha256,
            as_of=params.get("as_of") or None,
            params=params,
            try_number=getattr(context.get("ti"), "try_number", 1) or 1,
        )

    def upstream_results(self, context: Any) -> dict[str, Any]:
        """XCom results of the stages this one reads, by stage name (missing stages are None)."""
        ti = context["ti"]
        return {name: ti.xcom_pull(task_ids=name) for name in self.upstream_stages}

    def execute(self, context: Any) -> Any:
        for key, value in _QUIET_ENV.items():
            os.environ.setdefault(key, value)
        from mlplatform.stages.context import StageFailed

        ctx = self.run_context(context)
        try:
            return self.run(ctx, self.upstream_results(context), context)
        except StageFailed as exc:
            # A data or spec problem: retrying cannot help, so fail now with the message the tenant needs.
            raise AirflowFailException(f"{self.stage} failed for {self.spec.dag_id}:\n{exc}") from None

    def run(self, ctx: Any, upstream: dict[str, Any], context: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


def check_conf_keys(task: BaseOperator, context: Any) -> None:
    """Fail the run at once on a trigger-conf key the DAG has no Param for (a typo such as ``hp_max_dept``
    would otherwise be ignored: Airflow merges conf into ``params`` and validates only the declared keys)."""
    conf = getattr(context.get("dag_run"), "conf", None) or {}
    if not conf or not isinstance(conf, dict):
        return
    try:
        accepted = set(task.dag.params) | set(task.params or {})
    except Exception:  # noqa: BLE001 - a task outside a DAG (unit tests): nothing to check against
        return
    unknown = sorted(str(k) for k in conf if k not in accepted)
    if not unknown:
        return
    import difflib

    hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, sorted(accepted), n=1))
             else repr(k) for k in unknown]
    raise AirflowFailException(
        f"unknown trigger conf key(s) {', '.join(hints)} for {task.dag_id}: accepted keys are "
        f"{', '.join(sorted(accepted)) or 'none'}; the run does not start with a setting it would ignore")
