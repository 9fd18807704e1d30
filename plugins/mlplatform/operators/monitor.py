"""The monitor DAG's operator: drift of the newest data against the champion's training snapshot.

Reference data is the training-set snapshot the champion was trained on (model version tag
``mlplatform.reference_uri``; for versions registered before that tag existed, the snapshot the run's
features stage left in the artifact store, found through ``mlplatform.dag_run_id`` and then tagged). No
champion or no snapshot: the task says so and succeeds with ``status`` ``no_champion`` / ``no_reference``.
Current data is the gateway's prediction-log window, else the newest partition; the champion's prediction
drift and (with labels) performance come with it (``mlplatform.stages.monitor_data``). Reports go to the
artifact store (``mlplatform.reports``: local, or S3) and are linked from the task and the model version.

On drift (and ``retrain_on_drift``) it asks the retrain policy (cooldown, daily cap, a retrain already
running, same data) and only then emits the tenant-and-pipeline drift Asset through an AssetAlias, so a
run without drift, or with a refused retrain, emits nothing. Drift alerts go to the tenant's channel.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from airflow.sdk import AssetAlias, BaseOperatorLink

from mlplatform.operators.base import StageOperator

log = logging.getLogger(__name__)

REPORT_TAG = "mlplatform.drift_report"
REPORT_JSON_TAG = "mlplatform.drift_report_json"
CHECKED_TAG = "mlplatform.drift_checked_at"
SHARE_TAG = "mlplatform.drift_share"
PREDICTION_REPORT_TAG = "mlplatform.prediction_drift_report"
PERFORMANCE_TAG = "mlplatform.live_performance"
REFERENCE_BACKFILLED_TAG = "mlplatform.reference_backfilled"
ROW_ID = "_mlp_row_id"


def monitor_alias(asset) -> AssetAlias:
    return AssetAlias(name=f"{asset.name}__monitor")


class DriftReportLink(BaseOperatorLink):
    """"Drift report" button on the task: the HTML report of that try (pushed to XCom when the task ends)."""

    name = "Drift report"

    def get_link(self, operator, *, ti_key) -> str:
        url = getattr(operator, "report_link", None)
        if url:
            return url
        pull = getattr(ti_key, "xcom_pull", None)
        if pull is None:
            return ""
        result = pull(task_ids=ti_key.task_id) or {}
        return result.get("report_url", "") if isinstance(result, dict) else ""


class DriftReportJsonLink(DriftReportLink):
    name = "Drift report (JSON)"

    def get_link(self, operator, *, ti_key) -> str:
        url = getattr(operator, "report_json_link", None)
        if url:
            return url
        pull = getattr(ti_key, "xcom_pull", None)
        result = (pull(task_ids=ti_key.task_id) or {}) if pull else {}
        return result.get("report_json_url", "") if isinstance(result, dict) else ""


class DriftCheckOperator(StageOperator):
    """Evidently drift of the newest partition against the champion's training snapshot; may emit the Asset."""

    stage = "drift_check"
    ui_color = "#fff4d6"
    operator_extra_links = (DriftReportLink(), DriftReportJsonLink())
    # Set by the factory through ``for_spec(extra=...)`` (stage operators define no ``__init__``); the task's
    # ``outlets`` must be ``[monitor_alias(drift_asset)]``.
    drift_asset = None
    training_dag_id: str = ""
    report_link: str | None = None
    report_json_link: str | None = None

    # ----------------------------------------------------------------------------------------- run
    def run(self, ctx, upstream, context):
        from mlplatform import sandbox
        from mlplatform.stages.drift import summary_lines

        self.report_link = self.report_json_link = None
        md = ctx.spec.metadata
        base = {"status": "", "model_name": ctx.spec.model_name, "champion_version": None, "drift_detected": False,
                "event_emitted": False, "policy": None, "alert_sent": False}
        client, champion = self._champion(ctx)
        if champion is None:
            msg = (f"no champion for {ctx.spec.model_name} yet: nothing to monitor until the training DAG "
                   f"{self.training_dag_id} promotes a model")
            log.warning("%s", msg)
            return {**base, "status": "no_champion", "message": msg}
        reference, how = self._reference(ctx, client, champion)
        base.update(champion_version=champion.version, reference=reference, reference_found_by=how)
        if reference is None:
            msg = (f"champion {ctx.spec.model_name} version {champion.version} has no stored training snapshot "
                   f"(no {_ref_tag()} tag and no train.parquet left by its run "
                   f"{champion.tags.get('mlplatform.dag_run_id', '?')}): no reference data, so no drift check. "
                   f"The next training run stores one; or trigger {self.training_dag_id} now.")
            log.warning("NO REFERENCE: %s", msg)
            return {**base, "status": "no_reference", "message": msg}
        features = self._features(ctx, Path(reference))
        out_dir = ctx.config.artifact_dir(md.tenant, md.name, f"monitor__{ctx.run_key}")
        current_files, current_id, source = self._current(ctx, features, out_dir)
        # Tenant data, column names and the champion model (output of tenant-influenced training) are handled
        # in the tenant's sandbox; the registry, the prediction log, reports and alerts stay here.
        result = sandbox.run("mlplatform.stages.entry:drift_check", str(reference), [str(f) for f in current_files],
                             str(out_dir), ctx.spec.model_name, str(champion.version),
                             self._champion_eval(ctx, client, champion), features, ctx=ctx)
        result.update({k: v for k, v in base.items() if k not in result}, status="checked", current=current_id,
                      current_source=source, current_files=[str(f) for f in current_files])
        self._publish(ctx, result)
        from mlplatform.stages import monitor_data

        for line in summary_lines(result) + monitor_data.summary_lines(result):
            log.info("%s", line)
        self._tag_champion(client, champion, result)
        if result["drift_detected"]:
            if ctx.spec.spec.monitoring.retrain_on_drift:
                result["policy"] = self._maybe_emit(ctx, context, champion, current_id, result)
            result["alert_sent"] = self._alert(ctx, context, result)
        (out_dir / "monitor_result.json").write_text(json.dumps(result, indent=2, default=str))
        return result

    # ------------------------------------------------------------------------------------ reference
    def _champion(self, ctx):
        from mlplatform.stages import registry

        client = registry.client(ctx)
        version = registry.get_alias_version(client, ctx.spec.model_name, "champion")
        return client, (None if version is None else client.get_model_version(ctx.spec.model_name, version))

    def _reference(self, ctx, client, champion) -> tuple[str | None, str]:
        from mlplatform.stages.context import run_key
        from mlplatform.stages.register import REFERENCE_TAG

        uri = champion.tags.get(REFERENCE_TAG)
        if uri:
            path = _local_path(uri)
            if path is not None and path.is_file():
                return str(path), "tag"
            log.warning("the champion's %s tag points at %s, which is gone", REFERENCE_TAG, uri)
        run_id = champion.tags.get("mlplatform.dag_run_id")
        if run_id:  # backfill for versions registered before the reference tag existed
            md = ctx.spec.metadata
            path = ctx.config.artifact_dir(md.tenant, md.name, run_key(run_id)) / "train.parquet"
            if path.is_file():
                client.set_model_version_tag(ctx.spec.model_name, champion.version, REFERENCE_TAG,
                                             path.resolve().as_uri())
                client.set_model_version_tag(ctx.spec.model_name, champion.version, REFERENCE_BACKFILLED_TAG,
                                             datetime.now(timezone.utc).isoformat())
                log.info("backfilled %s on version %s from its run's artifacts: %s", REFERENCE_TAG,
                         champion.version, path)
                return str(path.resolve()), "backfilled"
        return None, "missing"

    def _current(self, ctx, features: list[str], out_dir: Path) -> tuple[list[Path], str, str]:
        """(files, id, source): the prediction log's window when the gateway logged enough, else the newest
        partition."""
        from mlplatform.data.partitions import list_partitions, split_partitions
        from mlplatform.serving.predlog import default_location
        from mlplatform.spec.model import duration_seconds
        from mlplatform.stages.monitor_data import current_from_prediction_log

        if ctx.params.get("as_of") is None:  # a chosen partition date overrides the live window
            window = timedelta(seconds=duration_seconds(ctx.spec.spec.monitoring.prediction_window))
            logged = current_from_prediction_log(default_location(ctx.config.home), ctx.spec.model_name, window,
                                                 datetime.now(timezone.utc), features, out_dir)
            if logged is not None:
                path, current_id, rows = logged
                log.info("current data: %d rows the gateway served in the last %s", rows, window)
                return [path], current_id, "prediction_log"
        _, current = split_partitions(list_partitions(ctx.spec.spec.data.source, ctx.config,
                                                          ctx.tenant.spec.data.allowed_prefixes), ctx.as_of)
        return list(current.files), f"{ctx.spec.spec.data.source}@dt={current.date}", "partition"

    def _champion_eval(self, ctx, client, champion) -> float | None:
        """The champion's ``eval_<metric>`` at evaluation time (for the performance check), None if unknown."""
        metric = f"eval_{ctx.spec.spec.evaluation.metric}"
        try:
            return client.get_run(champion.run_id).data.metrics.get(metric) if champion.run_id else None
        except Exception as exc:  # noqa: BLE001 - the performance check then has no baseline
            log.warning("could not read %s of the champion's run %s: %s", metric, champion.run_id, exc)
            return None

    def _features(self, ctx, reference: Path) -> list[str]:
        import pyarrow.parquet as pq

        names = [n for n in pq.read_schema(reference).names if n != ROW_ID]
        return ctx.spec.feature_columns(names)

    def _publish(self, ctx, result: dict) -> None:
        """Reports to the artifact store (S3 when configured); their links on the result and the task."""
        from mlplatform.reports import publish

        pred = result.get("prediction_drift")
        links = publish(ctx.config.artifact_root, [result["html"], result["json"]] + ([pred["html"]] if pred else []))
        result["report_url"] = self.report_link = links[result["html"]]
        result["report_json_url"] = self.report_json_link = links[result["json"]]
        if pred:
            pred["report_url"] = links[pred["html"]]

    def _tag_champion(self, client, champion, result) -> None:
        tags = {REPORT_TAG: result["report_url"], REPORT_JSON_TAG: result["report_json_url"],
                CHECKED_TAG: datetime.now(timezone.utc).isoformat(), SHARE_TAG: f"{result['drift_share']:.4f}"}
        if result.get("prediction_drift"):
            tags[PREDICTION_REPORT_TAG] = result["prediction_drift"]["report_url"]
        if result.get("performance"):
            perf = result["performance"]
            tags[PERFORMANCE_TAG] = f"{perf['metric']}={perf['value']:.4f} on {perf['rows']} labelled rows"
        for key, value in tags.items():
            client.set_model_version_tag(result["model_name"], champion.version, key, value)

    # -------------------------------------------------------------------------------------- trigger
    def _maybe_emit(self, ctx, context, champion, current_id: str, result: dict) -> dict:
        from mlplatform.spec.model import duration_seconds
        from mlplatform.stages.retrain_policy import check_and_record, state_path

        monitoring = ctx.spec.spec.monitoring
        running = self._training_running(context)
        reference_id = champion.tags.get("mlplatform.data_fingerprint") or result["reference"]
        alias = monitor_alias(self.drift_asset)

        def emit():
            context["outlet_events"][alias].add(self.drift_asset, extra={
                "drift_share": result["drift_share"], "monitor_run_id": ctx.run_id, "current": current_id,
                "champion_version": str(champion.version),
                "drifted_columns": [c["column"] for c in result["drifted_columns"]]})

        md = ctx.spec.metadata
        decision = check_and_record(
            state_path(ctx.config.artifact_root, md.tenant, md.name), datetime.now(timezone.utc),
            cooldown=timedelta(seconds=duration_seconds(monitoring.cooldown)),
            max_per_day=monitoring.max_retrains_per_day, retrain_running=running,
            data_key=f"{current_id}|{reference_id}", run_id=ctx.run_id, emit_fn=emit)
        result["event_emitted"] = decision.emit
        if decision.emit:
            log.info("drift: emitted asset event %s (retrain requested)", self.drift_asset.name)
        else:
            log.info("drift, but no retrain requested (%s): %s", decision.reason, decision.message)
        return decision.as_dict()

    def _training_running(self, context) -> bool:
        ti = context.get("ti")
        count = getattr(ti, "get_dr_count", None)
        if count is None:
            return False
        try:
            return count(dag_id=self.training_dag_id, states=["queued", "running"]) > 0
        except Exception as exc:  # noqa: BLE001 - the cooldown still applies
            log.warning("could not count the runs of %s: %s", self.training_dag_id, exc)
            return False

    def _alert(self, ctx, context, result: dict) -> bool:
        from mlplatform.notify import send_alert

        cols = ", ".join(f"{c['column']} ({c['method']} {c['score']:.3g})" for c in result["drifted_columns"])
        policy = result.get("policy") or {}
        retrain = ("retrain requested" if result["event_emitted"]
                   else f"no retrain ({policy.get('reason', 'retrain_on_drift is off')})")
        message = (f"drift in {ctx.spec.metadata.tenant}/{ctx.spec.metadata.name}: share {result['drift_share']:.2f} "
                   f">= {result['threshold']:.2f}; {cols}; {retrain}")
        details = {k: result.get(k) for k in ("drift_share", "threshold", "drifted_columns", "columns_tested",
                                              "current", "current_source", "champion_version", "report_url",
                                              "event_emitted", "policy", "prediction_drift", "performance")}
        return send_alert(self.tenant, ctx.spec.metadata.name, "drift", message, details, context)


def _ref_tag() -> str:
    from mlplatform.stages.register import REFERENCE_TAG

    return REFERENCE_TAG


def _local_path(uri: str) -> Path | None:
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "":
        return Path(uri)
    return None  # s3:// references need the S3 artifact backend
