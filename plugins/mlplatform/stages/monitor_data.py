"""What the monitor compares beyond feature drift: where current data comes from, prediction drift, performance.

* Current data: the window ``monitoring.prediction_window`` of the gateway's prediction log when it holds at
  least ``MIN_LOG_ROWS`` rows for the model (the inputs the model really served), else the newest partition.
* Prediction drift: the champion scores the reference snapshot and the current rows; Evidently tests the
  two distributions of P(label=1) (its default method for the row count). Scoring both sides with the same
  model keeps it apples to apples whatever the logged output format was. Reported, alerted, not a trigger:
  feature drift decides retraining.
* Performance: when the current rows carry the label (labels that arrived later, in the partition), the
  champion's ``evaluation.metric`` on them next to its evaluation on the holdout (``eval_<metric>`` of its run).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from mlplatform.stages.evaluate import HIGHER_IS_BETTER, load_classifier, score

log = logging.getLogger(__name__)

MIN_LOG_ROWS = 50
PREDICTION = "prediction"
DEGRADED_BY = 0.05  # performance counts as degraded when this much worse than at evaluation


def current_from_prediction_log(location: str, model_name: str, window: timedelta, now: datetime,
                                features: list[str], out_dir: Path) -> tuple[Path, str, int] | None:
    """(parquet of the window's inputs, its id, rows), or None when the log has too few rows for the window."""
    import pandas as pd

    from mlplatform.serving.predlog import read_window

    since = now - window
    rows = [row for entry in read_window(location, model_name, since, now) for row in entry["inputs"]
            if isinstance(row, dict)]
    if len(rows) < MIN_LOG_ROWS:
        log.info("prediction log %s: %d rows for %s in the last %s (< %d): using the newest partition",
                 location, len(rows), model_name, window, MIN_LOG_ROWS)
        return None
    frame = pd.DataFrame.from_records(rows)
    missing = [c for c in features if c not in frame.columns]
    if missing:
        log.warning("prediction log rows lack feature(s) %s: using the newest partition", ", ".join(missing))
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "current_from_predictions.parquet"
    frame[features].astype("float64").to_parquet(path, index=False)
    return path, f"predictions:{model_name}@{since.isoformat(timespec='seconds')}/{window}", len(frame)


def champion_model(config, model_name: str, version: str):
    """(classifier with predict_proba, its input columns or None) of a registered version, resolved through
    ``config``'s tracking server and registry (never MLflow's process default)."""
    return load_classifier(f"models:/{model_name}/{version}", config)


def prediction_drift(spec, model, columns: list[str], reference, current, out_dir: Path) -> dict[str, Any]:
    """Drift of the champion's P(label=1) on ``current`` against on ``reference``; writes an HTML report."""
    import pandas as pd

    from mlplatform.stages.drift import _column_verdicts, _run_report, save_html

    ref = pd.DataFrame({PREDICTION: model.predict_proba(reference[columns].astype("float64"))[:, 1]})
    cur = pd.DataFrame({PREDICTION: model.predict_proba(current[columns].astype("float64"))[:, 1]})
    threshold = spec.spec.monitoring.drift_threshold
    snapshot = _run_report(ref, cur, [PREDICTION], None, None, threshold)
    html = out_dir / "prediction_drift.html"
    save_html(snapshot, html)
    verdicts = _column_verdicts(json.loads(snapshot.json()))
    verdict = verdicts[0] if verdicts else {"column": PREDICTION, "method": None, "score": None,
                                            "threshold": None, "drifted": False}
    return {**verdict, "html": str(html), "reference_mean": float(ref[PREDICTION].mean()),
            "current_mean": float(cur[PREDICTION].mean())}


def performance_skipped(spec, current) -> str | None:
    """Why the performance check cannot run on ``current`` (no label column, all labels null, one class for
    roc_auc), or None when it can."""
    label, metric = spec.spec.data.label, spec.spec.evaluation.metric
    if label not in current.columns:
        return f"no labels in the current data yet (no {label!r} column)"
    labelled = current[current[label].notna()]
    if labelled.empty:
        return f"no labels in the current data yet (all {len(current)} {label!r} values are null)"
    if metric == "roc_auc" and labelled[label].nunique() < 2:
        return (f"roc_auc needs both classes: the {len(labelled)} labelled current rows are all "
                f"{labelled[label].iloc[0]!r}")
    return None


def performance(spec, model, columns: list[str], current, champion_eval: float | None) -> dict[str, Any] | None:
    """The champion's metric on labelled current rows against its evaluation; None when
    ``performance_skipped`` gives a reason."""
    label, metric = spec.spec.data.label, spec.spec.evaluation.metric
    if performance_skipped(spec, current) is not None:
        return None
    labelled = current[current[label].notna()]
    value = score(model, labelled, columns, label, metric)
    out = {"metric": metric, "value": value, "rows": len(labelled), "at_evaluation": champion_eval,
           "change": None, "degraded": False}
    if champion_eval is not None:
        change = value - champion_eval
        out["change"] = change
        out["degraded"] = (-change if HIGHER_IS_BETTER[metric] else change) > DEGRADED_BY
    return out


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Task-log lines for the prediction drift and performance parts of a monitor result."""
    lines = [f"current data: {result.get('current')} ({result.get('current_source')})"]
    pred = result.get("prediction_drift")
    if pred:
        verdict = "PREDICTION DRIFT" if pred["drifted"] else "no prediction drift"
        lines.append(f"{verdict}: P(label=1) {pred['method']} score {pred['score']:.4g} (threshold "
                     f"{pred['threshold']:g}); mean {pred['reference_mean']:.3f} -> {pred['current_mean']:.3f}; "
                     f"report: {pred['html']}")
    elif result.get("model_checks_error"):
        lines.append(f"prediction drift not computed: {result['model_checks_error']}")
    perf = result.get("performance")
    if perf:
        at_eval = "n/a" if perf["at_evaluation"] is None else f"{perf['at_evaluation']:.4f}"
        lines.append(f"{'PERFORMANCE DEGRADED' if perf['degraded'] else 'performance'}: {perf['metric']} "
                     f"{perf['value']:.4f} on {perf['rows']} labelled rows (at evaluation {at_eval})")
    elif result.get("model_checks_error"):
        lines.append(f"performance not computed: {result['model_checks_error']}")
    else:
        lines.append(f"performance: {result.get('performance_note') or 'not computed'}")
    return lines
