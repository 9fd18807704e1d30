"""The validate stage against real Great Expectations 1.x on small generated data."""

from __future__ import annotations

import json

import pytest
from helpers_stage import ENTITY, LABEL, churn_frame, stage_context, write_parquet

from mlplatform.spec import export_gx_expectations
from mlplatform.spec.model import Expectation
from mlplatform.stages.context import StageFailed
from mlplatform.stages.validate import expectation_problems, validate_data

EXPECTATIONS = [
    {"type": "expect_column_values_to_be_between",
     "kwargs": {"column": "tenure_months", "min_value": 0, "max_value": 240}},
    {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": LABEL, "value_set": [0, 1]}},
    {"type": "expect_column_values_to_be_between",
     "kwargs": {"column": "monthly_charges", "min_value": 0, "max_value": 1000, "mostly": 0.99}, "severity": "warning"},
]


def ctx_with(tmp_path, monkeypatch, expectations=EXPECTATIONS, min_rows=1000):
    return stage_context(tmp_path, monkeypatch, validation={"expectations": expectations, "min_rows": min_rows})


def failure_text(ctx, files) -> str:
    with pytest.raises(StageFailed) as info:
        validate_data(ctx, files)
    return str(info.value)


def test_clean_data_passes_and_writes_the_result(tmp_path, monkeypatch):
    ctx = ctx_with(tmp_path, monkeypatch)
    files = [write_parquet(churn_frame(1000, seed=s, first_id=1 + 1000 * s), tmp_path / f"p{s}.parquet")
             for s in range(2)]
    result = validate_data(ctx, files)
    # 3 from the spec + entity, timestamp, label non-null + row count
    assert result == {"success": True, "rows": 2000, "evaluated": 7, "warnings": [],
                      "result_path": str(ctx.artifact_dir / "validation.json")}
    saved = json.loads((ctx.artifact_dir / "validation.json").read_text())
    assert saved["success"] is True and saved["rows"] == 2000
    assert saved["great_expectations"]["statistics"]["evaluated_expectations"] == 7
    json.dumps(result)


def test_failure_names_expectation_column_count_and_examples(tmp_path, monkeypatch):
    ctx = ctx_with(tmp_path, monkeypatch)
    df = churn_frame()
    bad = [300, 301, 302, 303, 304, 305, 306, 307]
    df.loc[range(10, 10 + len(bad)), "tenure_months"] = bad
    df[ENTITY] = df[ENTITY].astype("float64")
    df.loc[[4, 5], ENTITY] = None
    text = failure_text(ctx, [write_parquet(df, tmp_path / "p.parquet")])
    lines = text.splitlines()
    assert lines[0].startswith("data validation failed: 2 of 6 checks")
    between = lines.index("- expect_column_values_to_be_between(column='tenure_months', min_value=0, max_value=240) "
                          "[spec.validation.expectations[0]]")
    assert lines[between + 1].strip() == "8 unexpected of 2000 rows (0.40%); examples: 300, 301, 302, 303, 304"
    nulls = lines.index(f"- expect_column_values_to_not_be_null(column='{ENTITY}') [default]")
    assert lines[nulls + 1].strip() == "2 unexpected of 2000 rows (0.10%); at rows 4, 5"
    saved = json.loads((ctx.artifact_dir / "validation.json").read_text())
    assert saved["success"] is False and len(saved["failed"]) == 2


def test_failed_warnings_are_reported_not_fatal(tmp_path, monkeypatch):
    ctx = ctx_with(tmp_path, monkeypatch)
    df = churn_frame()
    df.loc[:99, "monthly_charges"] = 5000.0  # 5% above the max; mostly=0.99 fails
    result = validate_data(ctx, [write_parquet(df, tmp_path / "p.parquet")])
    assert result["success"] is True
    [warning] = result["warnings"]
    assert warning.startswith("expect_column_values_to_be_between(column='monthly_charges'")
    assert "100 unexpected of 2000 rows (5.00%); examples: 5000" in warning


def test_missing_column_fails_with_a_clear_message(tmp_path, monkeypatch):
    expectations = [{"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "no_such_column"}}]
    ctx = ctx_with(tmp_path, monkeypatch, expectations)
    text = failure_text(ctx, [write_parquet(churn_frame().drop(columns=[LABEL]), tmp_path / "p.parquet")])
    assert "- expect_column_values_to_not_be_null(column='no_such_column') [spec.validation.expectations[0]]" in text
    assert 'could not run: Error: The column "no_such_column" in BatchData does not exist.' in text
    assert f"- expect_column_values_to_not_be_null(column='{LABEL}') [default]" in text


def test_too_few_rows_fails(tmp_path, monkeypatch):
    ctx = ctx_with(tmp_path, monkeypatch, [], min_rows=500)
    text = failure_text(ctx, [write_parquet(churn_frame(120), tmp_path / "p.parquet")])
    assert "- expect_table_row_count_to_be_between(min_value=500) [default]\n    observed value 120" in text


def test_declared_default_is_not_checked_twice(tmp_path, monkeypatch):
    expectations = [{"type": "expect_column_values_to_not_be_null", "kwargs": {"column": ENTITY}}]
    ctx = ctx_with(tmp_path, monkeypatch, expectations)
    assert validate_data(ctx, [write_parquet(churn_frame(), tmp_path / "p.parquet")])["evaluated"] == 4


def test_expectation_problems_reports_what_gx_rejects():
    expectations = [Expectation.model_validate(e) for e in [
        EXPECTATIONS[0],
        {"type": "expect_column_values_to_not_be_nul", "kwargs": {"column": "a"}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "a", "value_set": 5}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "a", "max_value": 1, "colum": "b"}},
        {"type": "expect_column_values_to_be_unique", "kwargs": {}},
    ]]
    assert expectation_problems(expectations) == [
        (1, "Great Expectations has no expectation type 'expect_column_values_to_not_be_nul'"),
        (2, "expect_column_values_to_be_in_set: value_set: value is not a valid list"),
        (3, "expect_column_values_to_be_between: colum: not a kwarg of this expectation"),
        (4, "expect_column_values_to_be_unique: column: field required"),
    ]


def test_rejected_expectation_fails_the_stage_instead_of_being_dropped(tmp_path, monkeypatch):
    ctx = ctx_with(tmp_path, monkeypatch, [{"type": "expect_values_to_be_nice", "kwargs": {"column": "a"}}])
    text = failure_text(ctx, [write_parquet(churn_frame(), tmp_path / "p.parquet")])
    assert ("- spec.validation.expectations[0]: Great Expectations has no expectation type "
            "'expect_values_to_be_nice'") in text


def test_exported_expectation_list_matches_great_expectations():
    expected = export_gx_expectations.core_expectations()
    assert export_gx_expectations.OUTPUT.read_text() == export_gx_expectations.render(expected), (
        "gx_expectations.json is stale: run python -m mlplatform.spec.export_gx_expectations")
    assert expected["expect_column_values_to_not_be_null"] == ["column"]
    assert expected["expect_column_values_to_be_between"] == ["column"]
    assert expected["expect_column_values_to_be_in_set"] == ["column", "value_set"]
    assert expected["expect_table_row_count_to_be_between"] == []
