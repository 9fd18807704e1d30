"""The validate stage against real Great Expectations 1.x on small generated data."""

from __future__ import annotations

import dataclasses
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
    assert text.startswith("refused: these expectations are outside the platform's allowlist:")
    assert ("- spec.validation.expectations[0]: type: unknown or not allowed expectation type "
            "'expect_values_to_be_nice'") in text


def test_exported_expectation_list_matches_great_expectations():
    expected = export_gx_expectations.core_expectations()
    assert export_gx_expectations.OUTPUT.read_text() == export_gx_expectations.render(expected), (
        "gx_expectations.json is stale: run python -m mlplatform.spec.export_gx_expectations")
    types = expected["types"]
    assert types["expect_column_values_to_not_be_null"]["required"] == ["column"]
    assert types["expect_column_values_to_be_in_set"]["required"] == ["column", "value_set"]
    assert types["expect_table_row_count_to_be_between"]["required"] == []
    between = types["expect_column_values_to_be_between"]
    assert between["kwargs"]["mostly"] == {"type": ["number"], "minimum": 0.0, "maximum": 1.0}
    assert between["where"] is True and types["expect_table_columns_to_match_set"]["where"] is False
    # nothing that evaluates text, no suite-parameter objects, no platform fields
    for entry in types.values():
        assert not set(entry["kwargs"]) & export_gx_expectations.PLATFORM_FIELDS
        assert "object" not in json.dumps({k: v for k, v in entry["kwargs"].items() if k != "quantile_ranges"})
    assert "expect_query_results_to_match_comparison" in expected["excluded"]
    assert "unexpected_rows_expectation" in expected["excluded"]


# ------------------------------------------------------------------------------------- hostile conditions

# Historical pandas-query payloads: `@` reaches the caller's globals (the GX engine module imports pandas
# as pd), attribute chains reach os; with condition_parser pandas, great_expectations, or none at all.
PAYLOADS = [
    "@pd.io.common.os.system('touch {marker}') == 0",
    "customer_id > 0 and @pd.io.common.os.system('touch {marker}') == 0",
    "@pd.core.computation.ops.os.system('touch {marker}') == 0",
    "customer_id.__class__.__init__.__globals__['os'].system('touch {marker}') == 0",
    "@__builtins__['__import__']('os').system('touch {marker}') == 0",
    'col("customer_id") > 0',
]


def _forged(kwargs: dict, where=None) -> Expectation:
    """An expectation built without validation, as if lint had been bypassed."""
    return Expectation.model_construct(type="expect_column_values_to_not_be_null", kwargs=kwargs, where=where,
                                       severity="warning")


def _forged_ctx(tmp_path, monkeypatch, expectation: Expectation):
    """A run context whose spec holds ``expectation`` although the spec model would refuse it."""
    ctx = ctx_with(tmp_path, monkeypatch, [])
    validation = ctx.spec.spec.validation.model_copy(update={"expectations": [expectation]})
    spec = ctx.spec.model_copy(update={"spec": ctx.spec.spec.model_copy(update={"validation": validation})})
    return dataclasses.replace(ctx, spec=spec)


def test_payload_is_live_against_great_expectations_itself(tmp_path):
    """Control: the first payload does run a shell command through GX 1.24 when nothing stops it."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    marker = tmp_path / "PWNED"
    config = ExpectationConfiguration(type="expect_column_values_to_not_be_null", kwargs={
        "column": "plan", "row_condition": PAYLOADS[0].format(marker=marker), "condition_parser": "pandas"})
    asset = gx.get_context(mode="ephemeral").data_sources.add_pandas("x").add_dataframe_asset("y")
    batch = asset.add_batch_definition_whole_dataframe("a").get_batch(batch_parameters={"dataframe": churn_frame(20)})
    batch.validate(config.to_domain_obj())
    assert marker.exists()


@pytest.mark.parametrize("parser", [None, "pandas", "great_expectations"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_validate_refuses_a_string_row_condition_that_bypassed_lint(tmp_path, monkeypatch, payload, parser):
    marker = tmp_path / "PWNED"
    kwargs = {"column": "plan", "row_condition": payload.format(marker=marker)}
    if parser:
        kwargs["condition_parser"] = parser
    ctx = _forged_ctx(tmp_path, monkeypatch, _forged(kwargs))
    text = failure_text(ctx, [write_parquet(churn_frame(), tmp_path / "p.parquet")])
    assert text.startswith("refused: these expectations are outside the platform's allowlist:")
    assert "kwargs.row_condition: 'row_condition' is not allowed" in text
    assert not marker.exists()
    assert not (ctx.artifact_dir / "validation.json").exists()


def test_domain_object_never_carries_a_text_condition(tmp_path):
    """Below the refusal: _domain_obj itself will not build an expectation with a string condition."""
    from mlplatform.stages.validate import _domain_obj

    marker = tmp_path / "PWNED"
    with pytest.raises(ValueError, match="row_condition is not allowed"):
        _domain_obj(_forged({"column": "plan", "row_condition": PAYLOADS[0].format(marker=marker)}), {})
    assert not marker.exists()


@pytest.mark.parametrize("where", [
    {"column": "plan", "op": "==", "value": "x' or @pd.io.common.os.system('touch {marker}') == 0 or 'a"},
    {"column": "@pd.io.common.os.system('touch {marker}')", "op": "==", "value": 0},
    {"column": "plan", "op": "in", "value": ["pro", "__import__('os').system('touch {marker}')"]},
    {"all": [{"column": "plan", "op": "==", "value": "pro"},
             {"column": "customer_id.__class__", "op": ">", "value": 0}]},
])
def test_validate_refuses_a_forged_where(tmp_path, monkeypatch, where):
    from mlplatform.spec.expectations import Comparison, Where

    marker = tmp_path / "PWNED"
    fmt = json.loads(json.dumps(where).replace("{marker}", str(marker)))
    forged_where = Where.model_construct(
        **{k: ([Comparison.model_construct(**c) for c in v] if k == "all" else v) for k, v in fmt.items()})
    ctx = _forged_ctx(tmp_path, monkeypatch, _forged({"column": "plan"}, forged_where))
    text = failure_text(ctx, [write_parquet(churn_frame(), tmp_path / "p.parquet")])
    assert text.startswith("refused:") and "where:" in text
    assert not marker.exists()


def test_where_condition_selects_the_rows_checked(tmp_path, monkeypatch):
    """A structured where runs in real GX: only matching rows are checked (here: basic plans under 100)."""
    expectations = [
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "monthly_charges", "max_value": 100},
         "where": {"all": [{"column": "plan", "op": "==", "value": "basic"}, {"column": "support_calls", "op": "<", "value": 100}]}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "plan", "value_set": ["plus", "pro"]},
         "where": {"any": [{"column": "plan", "op": "not_in", "value": ["basic"]},
                           {"all": [{"column": "tenure_months", "op": "is_null"}]}]}},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "tenure_months"},
         "where": {"column": "plan", "op": "!=", "value": "basic"}, "severity": "warning"},
    ]
    ctx = ctx_with(tmp_path, monkeypatch, expectations)
    df = churn_frame()
    df["monthly_charges"] = df["monthly_charges"].clip(upper=99.0)
    df.loc[df["plan"] != "basic", "monthly_charges"] = 5000.0  # outside the condition: must not count
    basic = int((df["plan"] == "basic").sum())
    result = validate_data(ctx, [write_parquet(df, tmp_path / "p.parquet")])
    assert result["success"] is True and result["warnings"] == []
    saved = json.loads((ctx.artifact_dir / "validation.json").read_text())
    counts = {r["expectation_config"]["meta"]["mlplatform"]["check"]: r["result"]["element_count"]
              for r in saved["great_expectations"]["results"] if "element_count" in r["result"]}
    assert counts[0] == basic and counts[1] == len(df) - basic and counts[2] == len(df) - basic

    df.loc[df.index[df["plan"] == "basic"][:3], "monthly_charges"] = 150.0
    text = failure_text(ctx, [write_parquet(df, tmp_path / "p.parquet")])
    assert ("- expect_column_values_to_be_between(column='monthly_charges', max_value=100) "
            "where plan == 'basic' and support_calls < 100 [spec.validation.expectations[0]]") in text
    assert f"3 unexpected of {basic} rows" in text


def test_real_validate_task_refuses_the_payload_in_its_sandbox(tmp_path, monkeypatch):
    """The task path end to end: ValidateOperator.execute -> sandboxed child -> validate_data, with a spec
    object that carries the pandas payload (lint would refuse the file). The task fails, no shell runs."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from mlplatform.config import get_config
    from mlplatform.operators.stages import ValidateOperator

    marker = tmp_path / "PWNED"
    ctx = _forged_ctx(tmp_path, monkeypatch, _forged({"column": "plan", "row_condition": PAYLOADS[0].format(
        marker=marker), "condition_parser": "pandas"}))
    get_config.cache_clear()
    for day in (1, 2, 3):
        write_parquet(churn_frame(300, seed=day), ctx.config.data_root / "acme" / "churn" / f"dt=2026-11-0{day}"
                      / "p.parquet")
    task = ValidateOperator.for_spec(spec=ctx.spec, tenant=ctx.tenant, spec_sha256="", task_id="validate")
    ti = SimpleNamespace(try_number=1, task_id="validate", xcom_pull=lambda task_ids: None)
    with pytest.raises(AirflowFailException, match="outside the platform's allowlist") as info:
        task.execute({"run_id": "manual__payload", "params": {}, "ti": ti})
    assert "row_condition" in str(info.value)
    assert not marker.exists()
    get_config.cache_clear()
