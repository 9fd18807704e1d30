"""Validate stage: Great Expectations 1.x checks on the input partitions, run in an ephemeral context.

The checks are the spec's expectations plus defaults (entity, timestamp and label non-null; at least
``min_rows`` rows). Only ``severity: error`` checks fail the stage; failed warnings are reported.
GX is imported inside the functions: DAG parsing imports this package.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mlplatform.spec.expectations import Where, expectation_problems as allowlist_problems, to_gx_condition
from mlplatform.spec.model import Expectation
from mlplatform.spec.safetext import find_unsafe_text
from mlplatform.spec.yamlsafe import dotted
from mlplatform.stages.context import RunContext, StageFailed

_EXAMPLES = 5
_META_KEY = "mlplatform"


def validate_data(ctx: RunContext, files: list[Path]) -> dict:
    """Run the checks on ``files``; raise ``StageFailed`` listing every failed error-severity check."""
    checks = _checks(ctx)
    refused = [f"- {origin}: {msg}" for origin, e in checks for msg in refusals(e)]
    if refused:  # lint refuses these too; a spec object built without lint must not reach GX either
        raise StageFailed("refused: these expectations are outside the platform's allowlist:\n" + "\n".join(refused))
    problems = expectation_problems(list(ctx.spec.spec.validation.expectations))
    if problems:
        raise StageFailed("Great Expectations rejects these expectations:\n"
                          + "\n".join(f"- spec.validation.expectations[{i}]: {msg}" for i, msg in problems))
    frame = _read(files)
    result = _run_suite(frame, [_domain_obj(e, {"check": i, "origin": origin}) for i, (origin, e) in enumerate(checks)])
    failed = [(*checks[r["expectation_config"]["meta"][_META_KEY]["check"]], r)
              for r in result["results"] if not r["success"]]
    failures = [f for f in failed if f[1].severity == "error"]
    warnings = [_short(e, r) for _, e, r in failed if e.severity == "warning"]
    path = ctx.artifact_dir / "validation.json"
    report = {"success": not failures, "rows": len(frame), "files": [str(f) for f in files],
              "failed": [_short(e, r) for _, e, r in failures], "warnings": warnings, "great_expectations": result}
    path.write_text(json.dumps(report, indent=1, default=str))
    if failures:
        errors = sum(e.severity == "error" for _, e in checks)
        raise StageFailed(_failure_text(failures, errors, len(frame), path))
    return {"success": True, "rows": len(frame), "evaluated": len(result["results"]), "warnings": warnings,
            "result_path": str(path)}


def expectation_problems(expectations: list[Expectation]) -> list[tuple[int, str]]:
    """(index, message) for each expectation Great Expectations itself rejects (unknown type, bad kwargs)."""
    out = []
    for i, e in enumerate(expectations):
        try:
            _domain_obj(e, {})
        except Exception as exc:  # noqa: BLE001 - GX raises its own errors, pydantic errors and TypeErrors
            out.append((i, _rejection(e, exc)))
    return out


def refusals(e: Expectation) -> list[str]:
    """Why ``e`` may not run: the allowlist of types and typed kwargs (spec/expectations.py), template syntax
    in its text, and a ``where`` that does not validate. The same checks as lint, repeated at run time."""
    out = [f"{dotted(path)}: {msg}" for path, msg in allowlist_problems(e.type, e.kwargs, e.where is not None)]
    out += [f"{dotted(('kwargs',) + path)}: {msg}" for path, msg in find_unsafe_text(e.kwargs)]
    if e.where is not None:
        try:
            Where.model_validate(e.where.model_dump(exclude_none=True) if isinstance(e.where, Where) else e.where)
        except ValidationError as exc:
            out.append("where: " + "; ".join(err["msg"] for err in exc.errors()))
        except Exception as exc:  # noqa: BLE001 - whatever a forged object raises
            out.append(f"where: {exc}")
    return out


def default_expectations(ctx: RunContext) -> list[Expectation]:
    """Checks every pipeline gets: entity, timestamp and label non-null; at least ``min_rows`` rows."""
    d = ctx.spec.spec.data
    out = [Expectation(type="expect_column_values_to_not_be_null", kwargs={"column": c})
           for c in (d.entity, d.timestamp, d.label)]
    out.append(Expectation(type="expect_table_row_count_to_be_between",
                           kwargs={"min_value": ctx.spec.spec.validation.min_rows}))
    return out


def _checks(ctx: RunContext) -> list[tuple[str, Expectation]]:
    """(origin, expectation) pairs; a default the spec already declares (same type and kwargs) is left out."""
    declared = list(ctx.spec.spec.validation.expectations)
    same = [(e.type, e.kwargs) for e in declared if e.where is None]
    checks = [(f"spec.validation.expectations[{i}]", e) for i, e in enumerate(declared)]
    return checks + [("default", e) for e in default_expectations(ctx) if (e.type, e.kwargs) not in same]


def _domain_obj(e: Expectation, meta: dict):
    """The GX expectation; raises on an unknown type or bad kwargs (a suite built from dicts would drop it)."""
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration
    from great_expectations.expectations.metadata_types import FailureSeverity

    severity = FailureSeverity.CRITICAL if e.severity == "error" else FailureSeverity.WARNING
    kwargs = copy.deepcopy(e.kwargs)
    for key in ("row_condition", "condition_parser"):  # never from a spec (refusals() reports them)
        if key in kwargs:
            raise ValueError(f"{key} is not allowed: write the condition as where")
    if e.where is not None:
        kwargs["row_condition"] = to_gx_condition(e.where)
    config = ExpectationConfiguration(type=e.type, kwargs=kwargs, meta={_META_KEY: meta}, severity=severity)
    obj = config.to_domain_obj()
    _no_evaluated_condition(obj)
    return obj


def _no_evaluated_condition(obj) -> None:
    """The built expectation holds no string condition and no pass-through filter (both go to
    ``DataFrame.query`` verbatim): only the condition objects ``to_gx_condition`` makes."""
    from great_expectations.expectations.row_conditions import (
        AndCondition,
        ComparisonCondition,
        NullityCondition,
        OrCondition,
    )

    def ok(c) -> bool:
        if isinstance(c, AndCondition | OrCondition):
            return all(ok(x) for x in c.conditions)
        return type(c) in (ComparisonCondition, NullityCondition)

    condition = getattr(obj, "row_condition", None)
    if getattr(obj, "condition_parser", None) is not None or not (condition is None or ok(condition)):
        raise ValueError("a row condition that Great Expectations would evaluate as text is not allowed")


def _rejection(e: Expectation, exc: Exception) -> str:
    """A one-line reason from a GX or pydantic error."""
    from great_expectations.exceptions import ExpectationNotFoundError

    if isinstance(exc, ExpectationNotFoundError):
        return f"Great Expectations has no expectation type {e.type!r}"
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return f"{e.type}: {exc}"
    by_field: dict[str, str] = {}
    for err in errors():  # a union field reports one error per alternative: the first is the telling one
        field = ".".join(str(p) for p in err["loc"] if p != "__root__")
        msg = "not a kwarg of this expectation" if err["type"] == "value_error.extra" else err["msg"]
        by_field.setdefault(field, msg)
    return f"{e.type}: " + "; ".join(f"{f}: {m}" if f else m for f, m in by_field.items())


def _read(files: list[Path]):
    import pandas as pd

    if not files:
        raise StageFailed("no parquet files to validate")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def _run_suite(frame, expectations: list) -> dict[str, Any]:
    """Validate ``frame`` in an ephemeral GX context with SUMMARY results; the result as a JSON dict."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("mlplatform").add_dataframe_asset("input")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
    suite = gx.ExpectationSuite(name="mlplatform", expectations=expectations)
    return batch.validate(suite, result_format="SUMMARY").to_json_dict()


def _title(e: Expectation) -> str:
    args = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in e.kwargs.items())
    return f"{e.type}({args})" + (f" where {e.where.describe()}" if e.where is not None else "")


def _exception(r: dict) -> str | None:
    """GX's message when an expectation could not run (e.g. a missing column), else None."""
    info = r.get("exception_info") or {}
    entries = [info] if "raised_exception" in info else list(info.values())
    for entry in entries:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            return entry.get("exception_message") or "raised an exception"
    return None


def _counts(r: dict) -> str:
    res = r.get("result") or {}
    if "unexpected_count" in res:
        pct = res.get("unexpected_percent") or 0.0
        return f"{res['unexpected_count']} unexpected of {res.get('element_count', '?')} rows ({pct:.2f}%)"
    if "observed_value" in res:
        return f"observed value {res['observed_value']}"
    return "failed"


def _examples(r: dict) -> str | None:
    """Up to five distinct unexpected values, or the row numbers when the values are nulls."""
    res = r.get("result") or {}
    values = [c["value"] for c in res.get("partial_unexpected_counts") or []]
    if values and all(v is None for v in values):
        rows = res.get("partial_unexpected_index_list") or []
        return f"at rows {', '.join(map(str, rows[:_EXAMPLES]))}" if rows else None
    return f"examples: {', '.join(map(_value, values[:_EXAMPLES]))}" if values else None


def _value(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else repr(v)


def _detail(r: dict) -> str:
    error = _exception(r)
    if error:
        return f"could not run: {error}"
    examples = _examples(r)
    return _counts(r) + (f"; {examples}" if examples else "")


def _short(e: Expectation, r: dict) -> str:
    return f"{_title(e)}: {_detail(r)}"


def _failure_text(failures: list, checks: int, rows: int, path: Path) -> str:
    lines = [f"data validation failed: {len(failures)} of {checks} checks with severity error did not pass "
             f"({rows} rows; full result in {path})"]
    for origin, e, r in failures:
        lines += [f"- {_title(e)} [{origin}]", f"    {_detail(r)}"]
    return "\n".join(lines)
