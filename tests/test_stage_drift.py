"""The drift stage against real Evidently 0.7 on small generated data."""

from __future__ import annotations

import json

import pytest
from helpers_stage import ENTITY, FEATURES, LABEL, TS, churn_frame, stage_context, write_parquet

from mlplatform.stages.context import StageFailed
from mlplatform.stages.drift import compute_drift, summary_lines


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    return stage_context(tmp_path, monkeypatch, monitoring={"drift_threshold": 0.3})


@pytest.fixture
def reference(tmp_path):
    """The training snapshot: features plus entity, timestamp and label."""
    return write_parquet(churn_frame(2000, seed=1), tmp_path / "train.parquet")


def current(tmp_path, shift: float, seed: int = 2):
    """Two current files; ids from another range than the reference (they would drift if tested)."""
    frame = churn_frame(1200, seed=seed, shift=shift, first_id=500_000)
    return [write_parquet(frame.iloc[:600], tmp_path / "cur" / "a.parquet"),
            write_parquet(frame.iloc[600:], tmp_path / "cur" / "b.parquet")]


def test_shifted_columns_are_detected(ctx, reference, tmp_path):
    result = compute_drift(ctx, reference, current(tmp_path, shift=1.0), FEATURES)
    assert sorted(c["column"] for c in result["drifted_columns"]) == ["monthly_charges", "support_calls"]
    assert result["columns_tested"] == 4
    assert result["drift_share"] == 0.5 and result["drift_detected"] is True
    assert (result["reference_rows"], result["current_rows"]) == (2000, 1200)
    for c in result["drifted_columns"]:
        assert set(c) == {"column", "method", "score", "threshold"} and c["method"] and c["threshold"] > 0
    json.dumps(result)
    lines = summary_lines(result)
    assert lines[0].startswith("DRIFT DETECTED: 2 of 4 feature columns drifted (share 0.50, threshold 0.30)")
    assert any(line.strip().startswith("monthly_charges: ") for line in lines)


def test_unshifted_data_is_not_drift(ctx, reference, tmp_path):
    result = compute_drift(ctx, reference, current(tmp_path, shift=0.0), FEATURES)
    assert result["drifted_columns"] == [] and result["drift_share"] == 0.0
    assert result["drift_detected"] is False
    assert summary_lines(result)[0].startswith("no drift: 0 of 4 feature columns drifted")


def test_reports_are_written_and_ids_are_not_tested(ctx, reference, tmp_path):
    result = compute_drift(ctx, reference, current(tmp_path, shift=0.0), FEATURES)
    html, report = ctx.artifact_dir / "drift_report.html", ctx.artifact_dir / "drift_report.json"
    assert (result["html"], result["json"]) == (str(html), str(report))
    assert html.stat().st_size > 10_000 and "<html" in html.read_text()[:2000].lower()
    tested = {t["metric_config"]["params"].get("column") for t in json.loads(report.read_text())["tests"]} - {None}
    assert tested == set(FEATURES)
    assert not {ENTITY, TS, LABEL} & tested


def test_missing_reference_says_there_is_no_training_snapshot(ctx, tmp_path):
    with pytest.raises(StageFailed, match="no stored training snapshot for the champion"):
        compute_drift(ctx, tmp_path / "missing.parquet", current(tmp_path, shift=0.0), FEATURES)


def test_missing_feature_in_current_data_fails(ctx, reference, tmp_path):
    path = write_parquet(churn_frame(300).drop(columns=["plan"]), tmp_path / "cur.parquet")
    with pytest.raises(StageFailed, match="has no column\\(s\\) plan"):
        compute_drift(ctx, reference, [path], FEATURES)


def test_report_html_never_lets_data_close_its_script_block(tmp_path):
    """A category value is tenant data: inlined raw, ``</script><script>`` would run in the reader's browser."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    from mlplatform.stages.drift import save_html

    payload = "</script><script>window.PWNED=1</script><!--&"
    definition = DataDefinition(categorical_columns=["plan"], numerical_columns=["n"])
    ref = pd.DataFrame({"plan": ["a", "b"] * 60, "n": range(120)})
    cur = pd.DataFrame({"plan": [payload, "b"] * 60, "n": range(120)})
    snapshot = Report([DataDriftPreset()], include_tests=True).run(
        Dataset.from_pandas(cur, data_definition=definition), Dataset.from_pandas(ref, data_definition=definition))
    assert payload in snapshot.get_html_str(as_iframe=False)  # Evidently's own rendering is open to it
    html = tmp_path / "report.html"
    save_html(snapshot, html)
    text = html.read_text()
    assert payload not in text and "window.PWNED" in text  # present, but only as escaped JSON
    start = text.index("var ", text.index("<script>\n    var "))
    first = text[start:].split("\n", 1)[0]
    data = json.loads(first.split(" = ", 1)[1].rstrip(";"))
    assert payload in json.dumps(data, ensure_ascii=False)
