"""Drift stage: an Evidently 0.7 data-drift report between the training snapshot and the current partition.

Only the feature columns are tested; the entity and timestamp are declared in the ``DataDefinition`` so
Evidently never treats them as features. Evidently is imported inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlplatform.stages.context import RunContext, StageFailed

_VALUE_DRIFT = "evidently:metric_v2:ValueDrift"
_DRIFTED = {"FAIL", "WARNING"}
_TESTED = _DRIFTED | {"SUCCESS"}


def save_html(snapshot, path: Path) -> None:
    """Write the report's HTML with its embedded data safe for a ``<script>`` block.

    Evidently inlines the report data as ``json.dumps`` output inside ``<script>``; a category value such as
    ``</script><script>...`` (tenant data) would end that block and run as script in whoever opens the
    report. ``<``, ``>`` and ``&`` become JSON unicode escapes, which decode to the same strings.
    """
    from evidently.legacy.utils import dashboard

    encoder = dashboard.NumpyEncoder
    dashboard.NumpyEncoder = _ScriptSafeEncoder.with_base(encoder)
    try:
        text = snapshot.get_html_str(as_iframe=False)
    finally:
        dashboard.NumpyEncoder = encoder
    Path(path).write_text(text, encoding="utf-8")


class _ScriptSafeEncoder:
    """Mixin for a ``json.JSONEncoder``: ``<``, ``>`` and ``&`` as unicode escapes."""

    @classmethod
    def with_base(cls, base: type) -> type:
        return type("ScriptSafe" + base.__name__, (cls, base), {})

    def encode(self, o):
        text = super().encode(o)  # type: ignore[misc]
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def compute_drift(ctx: RunContext, reference: Path, current_files: list[Path], feature_columns: list[str]) -> dict:
    """Test each feature for drift; drift is detected when the drifted share reaches the spec's threshold."""
    if not reference.exists():
        raise StageFailed(f"no stored training snapshot for the champion of {ctx.dag_id}: {reference} does not "
                          "exist, so there is nothing to compare the current data with; run the pipeline's "
                          "training once to store one")
    return drift_between(ctx.spec, [reference], current_files, feature_columns, ctx.artifact_dir)


def drift_between(spec, reference_files: list[Path], current_files: list[Path], feature_columns: list[str],
                  out_dir: Path, prefix: str = "drift_report") -> dict:
    """Evidently drift of ``current_files`` against ``reference_files``; writes ``<prefix>.html``/``.json``.

    Per-column methods and thresholds come from ``spec.monitoring.columns``; other columns keep Evidently's
    defaults (KS / chi-square below 1,000 reference rows, Wasserstein / Jensen-Shannon above).
    """
    if not current_files:
        raise StageFailed("no current partition files to check for drift")
    if not feature_columns:
        raise StageFailed("no feature columns to check for drift")
    monitoring = spec.spec.monitoring
    threshold = monitoring.drift_threshold
    unknown = sorted(set(getattr(monitoring, "columns", {}) or {}) - set(feature_columns))
    if unknown:
        raise StageFailed(f"spec.monitoring.columns names {', '.join(unknown)}, which are not feature columns "
                          f"(features: {', '.join(feature_columns)})")
    methods, thresholds = column_options(monitoring)
    keys = [spec.spec.data.entity, spec.spec.data.timestamp]
    ref, cur = _read(reference_files, keys, feature_columns), _read(current_files, keys, feature_columns)
    entity, timestamp = (k if k in ref.columns and k in cur.columns else None for k in keys)
    snapshot = _run_report(ref, cur, feature_columns, entity, timestamp, threshold, methods, thresholds)
    out_dir.mkdir(parents=True, exist_ok=True)
    html, json_path = out_dir / f"{prefix}.html", out_dir / f"{prefix}.json"
    save_html(snapshot, html)
    text = snapshot.json()
    json_path.write_text(text)
    columns = _column_verdicts(json.loads(text))
    drifted = [{k: c[k] for k in ("column", "method", "score", "threshold")} for c in columns if c["drifted"]]
    share = len(drifted) / len(columns) if columns else 0.0
    return {"drift_share": share, "drift_detected": share >= threshold, "threshold": threshold,
            "drifted_columns": drifted, "columns_tested": len(columns), "html": str(html), "json": str(json_path),
            "reference_rows": len(ref), "current_rows": len(cur),
            "columns": [{k: c[k] for k in ("column", "method", "score", "threshold", "drifted")} for c in columns]}


def column_options(monitoring) -> tuple[dict[str, str], dict[str, float]]:
    """(per-column method, per-column threshold) from ``monitoring.columns`` (only the fields set)."""
    methods, thresholds = {}, {}
    for name, opts in (getattr(monitoring, "columns", None) or {}).items():
        if opts.method is not None:
            methods[name] = opts.method
        if opts.threshold is not None:
            thresholds[name] = float(opts.threshold)
    return methods, thresholds


def summary_lines(result: dict) -> list[str]:
    """A compact human summary for the task log."""
    verdict = "DRIFT DETECTED" if result["drift_detected"] else "no drift"
    lines = [f"{verdict}: {len(result['drifted_columns'])} of {result['columns_tested']} feature columns drifted "
             f"(share {result['drift_share']:.2f}, threshold {result['threshold']:.2f}); "
             f"reference {result['reference_rows']} rows, current {result['current_rows']} rows"]
    lines += [f"  {c['column']}: {c['method']} score {c['score']:.4g} (threshold {c['threshold']:g})"
              for c in result["drifted_columns"]]
    lines.append(f"report: {result['html']}")
    return lines


def _read(files: list[Path], keys: list[str], features: list[str]):
    """The feature columns (and the id/timestamp columns present) of ``files``; missing features fail."""
    import pandas as pd
    import pyarrow.parquet as pq

    frames = []
    for f in files:
        names = pq.read_schema(f).names
        missing = [c for c in features if c not in names]
        if missing:
            raise StageFailed(f"{f} has no column(s) {', '.join(missing)}; the drift check needs every feature")
        frames.append(pd.read_parquet(f, columns=[k for k in keys if k in names] + features))
    return pd.concat(frames, ignore_index=True)


def _run_report(ref, cur, features: list[str], entity: str | None, timestamp: str | None, threshold: float,
                methods: dict[str, str] | None = None, thresholds: dict[str, float] | None = None):
    """Run ``DataDriftPreset`` on the features; column types are inferred once, from the reference."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    keys = [c for c in (entity, timestamp) if c]
    for frame in (ref, cur):  # tz-aware timestamps make Evidently's plots warn on every column
        if timestamp and getattr(frame[timestamp].dtype, "tz", None) is not None:
            frame[timestamp] = frame[timestamp].dt.tz_convert(None)
    definition = DataDefinition(id_column=entity, timestamp=timestamp)
    ref_data = Dataset.from_pandas(ref[keys + features], data_definition=definition)
    # The same definition for both: inferred per frame, a small int column could be categorical in one only.
    cur_data = Dataset.from_pandas(cur[keys + features], data_definition=ref_data.data_definition)
    preset = DataDriftPreset(columns=features, drift_share=threshold, per_column_method=methods or None,
                             per_column_threshold=thresholds or None)
    report = Report([preset], include_tests=True)
    return report.run(cur_data, ref_data)


def _column_verdicts(report: dict) -> list[dict]:
    """One entry per tested column from the report's ValueDrift tests (``drifted``: the test did not pass)."""
    scores = {m["id"]: m["value"] for m in report["metrics"]}
    out = []
    for test in report["tests"]:
        params = test["metric_config"]["params"]
        if params.get("type") != _VALUE_DRIFT or test["status"] not in _TESTED:
            continue
        out.append({"column": params["column"], "method": params["method"],
                    "score": float(scores[test["metric_config"]["metric_id"]]),
                    "threshold": float(params["threshold"]), "drifted": test["status"] in _DRIFTED})
    return out
