"""Write ``gx_expectations.json``: the expectation types a spec may use, each with its typed kwargs.

The platform allows a curated set of Great Expectations core expectation types (``ALLOWED``); the kwargs of
each, their JSON types, bounds and which are required come from GX's own pydantic classes, so the file
follows the pinned GX version. The spec loader reads it at parse time (``spec/expectations.py``), so a
mistyped type, a misspelled kwarg or a kwarg of the wrong type is a plain lint error without importing GX
(6-8 s). Rerun after upgrading great-expectations (a test fails while the file is stale)::

    python -m mlplatform.spec.export_gx_expectations

What is left out, and why (see SECURITY.md, "Great Expectations"):

- kwargs that evaluate or render text: ``row_condition`` (a string goes to ``DataFrame.query``, which
  resolves attribute access and calls) and ``condition_parser``; specs write ``where:`` instead, which the
  platform turns into GX condition objects. ``description``, ``notes``, ``meta``, ``result_format``,
  ``catch_exceptions``, ``windows``, ``id``, ``batch_id``, ``rendered_content``, ``severity`` are the
  platform's, not the tenant's (``severity`` is the spec's own field);
- every ``dict`` alternative of a kwarg: GX uses it for suite parameters (``{"$PARAMETER": ...}``), which
  the platform never supplies;
- types that take SQL or query text, name other tables, resolve remote documents or take arbitrary
  objects (``EXCLUDED`` below).
"""

from __future__ import annotations

import collections.abc
import json
import types
import typing
from datetime import date, datetime
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).with_name("gx_expectations.json")
_CORE_MODULE = "great_expectations.expectations.core."

# What a tabular-ML pipeline checks on its input: columns and types, nulls, ranges and statistics, sets,
# uniqueness, row counts, string lengths and formats, ordering, column pairs.
ALLOWED = (
    "expect_column_distinct_values_to_be_in_set",
    "expect_column_distinct_values_to_contain_set",
    "expect_column_distinct_values_to_equal_set",
    "expect_column_max_to_be_between",
    "expect_column_mean_to_be_between",
    "expect_column_median_to_be_between",
    "expect_column_min_to_be_between",
    "expect_column_most_common_value_to_be_in_set",
    "expect_column_pair_values_a_to_be_greater_than_b",
    "expect_column_pair_values_to_be_equal",
    "expect_column_pair_values_to_be_in_set",
    "expect_column_proportion_of_non_null_values_to_be_between",
    "expect_column_proportion_of_unique_values_to_be_between",
    "expect_column_quantile_values_to_be_between",
    "expect_column_stdev_to_be_between",
    "expect_column_sum_to_be_between",
    "expect_column_to_exist",
    "expect_column_type_to_be",
    "expect_column_unique_value_count_to_be_between",
    "expect_column_value_lengths_to_be_between",
    "expect_column_value_lengths_to_equal",
    "expect_column_value_z_scores_to_be_less_than",
    "expect_column_values_to_be_between",
    "expect_column_values_to_be_dateutil_parseable",
    "expect_column_values_to_be_decreasing",
    "expect_column_values_to_be_in_set",
    "expect_column_values_to_be_in_type_list",
    "expect_column_values_to_be_increasing",
    "expect_column_values_to_be_json_parseable",
    "expect_column_values_to_be_null",
    "expect_column_values_to_be_of_type",
    "expect_column_values_to_be_unique",
    "expect_column_values_to_match_regex",
    "expect_column_values_to_match_regex_list",
    "expect_column_values_to_match_strftime_format",
    "expect_column_values_to_not_be_in_set",
    "expect_column_values_to_not_be_null",
    "expect_column_values_to_not_be_outliers",
    "expect_column_values_to_not_match_regex",
    "expect_column_values_to_not_match_regex_list",
    "expect_compound_columns_to_be_unique",
    "expect_multicolumn_sum_to_equal",
    "expect_multicolumn_values_to_be_equal",
    "expect_table_column_count_to_be_between",
    "expect_table_column_count_to_equal",
    "expect_table_columns_to_match_ordered_list",
    "expect_table_columns_to_match_set",
    "expect_table_row_count_to_be_between",
    "expect_table_row_count_to_equal",
)

# Core types a spec may not use, with the reason lint gives.
EXCLUDED = {
    "expect_query_results_to_match_comparison": "it runs SQL text from the spec",
    "unexpected_rows_expectation": "it runs SQL text from the spec",
    "expect_table_row_count_to_equal_other_table": "it reads another table",
    "expect_column_values_to_match_json_schema": "a JSON schema can make the worker fetch remote documents ($ref)",
    "expect_column_values_to_match_like_pattern": "LIKE patterns are SQL-only; use expect_column_values_to_match_regex",
    "expect_column_values_to_match_like_pattern_list": "LIKE patterns are SQL-only; use expect_column_values_to_match_regex_list",
    "expect_column_values_to_not_match_like_pattern": "LIKE patterns are SQL-only; use expect_column_values_to_not_match_regex",
    "expect_column_values_to_not_match_like_pattern_list": "LIKE patterns are SQL-only; use expect_column_values_to_not_match_regex_list",
    "expect_column_kl_divergence_to_be_less_than": "it takes an arbitrary partition object; use spec.monitoring for drift",
    "expect_select_column_values_to_be_unique_within_record": "not offered; use expect_compound_columns_to_be_unique",
}

# Fields of every GX expectation that are the platform's (or evaluate text): never a spec kwarg.
PLATFORM_FIELDS = {"id", "meta", "notes", "result_format", "description", "catch_exceptions", "rendered_content",
                   "severity", "windows", "batch_id", "row_condition", "condition_parser", "library_metadata"}

# Platform bounds on string and list kwargs (GX has none): long regexes and sets cost parse and run time.
MAX_STRING = 200
MAX_ITEMS = 1000
# String kwargs that name columns or types get a pattern; regexes are checked separately (spec/expectations.py).
_COLUMN_KWARGS = {"column", "column_A", "column_B", "column_list", "column_set"}
_COLUMN_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
_TYPE_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*(\[[A-Za-z0-9_, :/]{1,40}\])?$"
_TYPE_KWARGS = {"type_", "type_list"}
_REGEX_KWARGS = {"regex", "regex_list"}
_SCALAR = {"type": ["string", "number", "boolean"]}


def _constraints(tp: Any, info: Any = None) -> dict:
    out = {}
    for src in (tp, info):
        for attr, key in (("ge", "minimum"), ("le", "maximum"), ("gt", "exclusiveMinimum"), ("lt", "exclusiveMaximum")):
            value = getattr(src, attr, None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = value
    return out


def _schema(tp: Any, info: Any = None) -> dict | None:
    """JSON schema of a kwarg's annotation without GX's dict (suite parameter) alternatives; None: unusable."""
    from great_expectations.compatibility import pydantic

    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *extra = typing.get_args(tp)
        field_info = next((e for e in extra if hasattr(e, "ge")), None)
        return _schema(base, field_info or info)
    if origin in (typing.Union, types.UnionType):
        parts = [s for s in (_schema(a, info) for a in typing.get_args(tp)) if s is not None]
        return _merge(parts)
    if tp is type(None):
        return {"type": ["null"]}
    if tp is Any:
        return dict(_SCALAR)
    if tp is bool:
        return {"type": ["boolean"]}
    if isinstance(tp, type) and issubclass(tp, bool):
        return {"type": ["boolean"]}
    if isinstance(tp, type) and issubclass(tp, int):
        return {"type": ["integer"], **_constraints(tp, info)}
    if isinstance(tp, type) and issubclass(tp, float):
        return {"type": ["number"], **_constraints(tp, info)}
    if isinstance(tp, type) and issubclass(tp, datetime | date):
        return {"type": ["string"], "format": "date"}
    if isinstance(tp, type) and issubclass(tp, str):
        return {"type": ["string"]}
    if origin is typing.Literal:
        return {"enum": list(typing.get_args(tp))}
    if tp in (list, set, tuple, typing.List, typing.Set, typing.Sequence):  # noqa: UP006 - bare typing aliases
        return {"type": ["array"], "items": dict(_SCALAR)}
    if origin in (list, set, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and args:
            return {"type": ["array"], "items": _merge([_schema(a) for a in args]), "minItems": len(args),
                    "maxItems": len(args)}
        return {"type": ["array"], "items": _schema(args[0]) if args else dict(_SCALAR)}
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
        props = {f.alias: _schema(f.outer_type_, f.field_info) for f in tp.__fields__.values()}
        return {"type": ["object"], "properties": props, "required": [f.alias for f in tp.__fields__.values() if f.required]}
    if tp is dict or origin is dict or (isinstance(tp, type) and issubclass(tp, dict)):
        return None  # suite parameters and free objects: never from a spec
    raise TypeError(f"no JSON type for {tp!r}: extend export_gx_expectations._schema")


def _merge(parts: list[dict | None]) -> dict | None:
    unique: list[dict] = []
    for p in parts:  # list and set alternatives give the same schema
        if p is not None and p not in unique:
            unique.append(p)
    parts = unique
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    if any("enum" in p for p in parts) or any("items" in p or "properties" in p for p in parts[1:]):
        return {"anyOf": parts}
    merged: dict = {"type": []}
    for p in parts:
        merged["type"] += [t for t in p["type"] if t not in merged["type"]]
        merged.update({k: v for k, v in p.items() if k != "type"})
    return merged


def _bounded(name: str, schema: dict) -> dict:
    """Platform bounds on top of GX's types: lengths, list sizes, patterns for columns and type names."""
    def walk(s: dict, pattern: str | None) -> dict:
        s = dict(s)
        for key in ("anyOf",):
            if key in s:
                s[key] = [walk(x, pattern) for x in s[key]]
        types_ = s.get("type", [])
        if "string" in types_ and "format" not in s:
            s["maxLength"] = MAX_STRING
            if pattern:
                s["pattern"] = pattern
        if "array" in types_:
            s.setdefault("maxItems", MAX_ITEMS)
            if "items" in s:
                s["items"] = walk(s["items"], pattern)
        if "properties" in s:
            s["properties"] = {k: walk(v, None) for k, v in s["properties"].items()}
        return s

    pattern = _COLUMN_PATTERN if name in _COLUMN_KWARGS else _TYPE_PATTERN if name in _TYPE_KWARGS else None
    out = walk(schema, pattern)
    if name in _REGEX_KWARGS:
        out["regex"] = True  # spec/expectations.py compiles it and refuses backtracking bombs
    return out


def core_expectations() -> dict[str, Any]:
    """The allowlist: ``{"types": {type: {"kwargs": {name: schema}, "required": [...]}}, "excluded": {...}}``."""
    from great_expectations.expectations.registry import (
        get_expectation_impl,
        list_registered_expectation_implementations,
        register_core_expectations,
    )

    register_core_expectations()
    core = {name for name in list_registered_expectation_implementations()
            if get_expectation_impl(name).__module__.startswith(_CORE_MODULE)}
    missing = sorted(set(ALLOWED) - core)
    if missing:
        raise SystemExit(f"Great Expectations no longer has {missing}: update ALLOWED")
    out: dict[str, Any] = {}
    for name in sorted(ALLOWED):
        impl = get_expectation_impl(name)
        kwargs, required = {}, []
        for field in impl.__fields__.values():
            if field.alias in PLATFORM_FIELDS:
                continue
            schema = _schema(field.outer_type_, field.field_info)
            if schema is None:
                if field.required:
                    raise SystemExit(f"{name}.{field.alias} takes only objects: take {name} out of ALLOWED")
                continue
            kwargs[field.alias] = _bounded(field.alias, schema)
            if field.required:
                required.append(field.alias)
        # ``where:`` becomes GX's row_condition, which only some types take.
        out[name] = {"kwargs": dict(sorted(kwargs.items())), "required": required,
                     "where": "row_condition" in impl.__fields__}
    return {"types": out, "excluded": {k: EXCLUDED[k] for k in sorted(EXCLUDED) if k in core}}


def render(expectations: dict[str, Any]) -> str:
    """The file's exact text."""
    return json.dumps(expectations, indent=1, sort_keys=True) + "\n"


def main() -> None:
    expectations = core_expectations()
    OUTPUT.write_text(render(expectations))
    print(f"wrote {len(expectations['types'])} expectation types to {OUTPUT}")


if __name__ == "__main__":
    main()
