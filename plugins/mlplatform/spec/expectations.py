"""Expectations a spec may declare: an allowlist of types with typed kwargs, and ``where:`` row conditions.

Nothing a tenant writes reaches an evaluator: the kwargs of each allowed type are checked against the
types, bounds and patterns exported from Great Expectations' own classes (``gx_expectations.json``, see
``export_gx_expectations``); kwargs that evaluate text (``row_condition``, ``condition_parser``), GX's
suite-parameter objects and the platform's own fields (``meta``, ``result_format``...) are not kwargs of any
type. A row condition is written as ``where:`` in a small structured form (column, operator, literal) that
the validate stage turns into GX condition objects (``to_gx_condition``).

Runs at DAG-parse time: pydantic and the standard library only, never GX.

``where`` forms (operators ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``, ``not_in``, ``is_null``,
``not_null``)::

    where: {column: plan, op: "==", value: pro}
    where: {all: [{column: plan, op: in, value: [plus, pro]}, {column: tenure_months, op: ">", value: 3}]}
    where: {any: [{column: plan, op: "==", value: pro}, {all: [{column: support_calls, op: ">=", value: 5}, ...]}]}

Values are literals: a finite number, true/false (``==``/``!=`` only), or a string of letters, digits,
spaces and ``_ . , : / @ + -`` (at most 100 characters); ``in``/``not_in`` take a list of numbers or of
strings (1-100).
"""

from __future__ import annotations

import json
import math
import re
import re._constants as sre_c
import re._parser as sre_parse
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

ALLOWLIST_FILE = Path(__file__).with_name("gx_expectations.json")
_COLUMN_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"  # = model.COLUMN_RE (model.py imports this module)
_LITERAL_RE = r"^[A-Za-z0-9 _.,:/@+-]{0,100}$"
MAX_CONDITIONS = 20
MAX_IN_VALUES = 100

Op = Literal["==", "!=", "<", "<=", ">", ">=", "in", "not_in", "is_null", "not_null"]
_VALUE_SCHEMA = {"anyOf": [{"type": ["number", "boolean"]}, {"type": "string", "pattern": _LITERAL_RE},
                            {"type": "array", "items": {"anyOf": [{"type": "number"},
                                                                   {"type": "string", "pattern": _LITERAL_RE}]},
                             "minItems": 1, "maxItems": 100}]}


def _literal_value(v: Any) -> Any:
    """A condition value is a literal: finite number, bool, plain short string, or a list of those."""
    if v is None:
        return v
    for item in v if isinstance(v, list) else [v]:
        if isinstance(item, bool | int):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"{item} is not a finite number")
        elif isinstance(item, str):
            if not re.match(_LITERAL_RE, item):
                raise ValueError(f"{item[:60]!r} is not a plain literal: strings in conditions hold letters, digits, "
                                 "spaces and _ . , : / @ + - (at most 100 characters)")
        else:
            raise ValueError(f"expected a number, true/false, a string or a list of them, got {type(item).__name__}")
    return v


Value = Annotated[Any, BeforeValidator(_literal_value), WithJsonSchema(_VALUE_SCHEMA)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Comparison(_Strict):
    """``column op value``: one comparison of a column with a literal."""

    column: str = Field(pattern=_COLUMN_RE, max_length=64)
    op: Op
    value: Value = None

    @model_validator(mode="after")
    def _comparison(self):
        _check_comparison(self.column, self.op, self.value, "value" in self.model_fields_set)
        return self


def _check_comparison(column: str | None, op: str | None, value: Any, has_value: bool) -> None:
    if column is None or op is None:
        raise ValueError("a condition needs column and op (and value, except for is_null / not_null)")
    if op in ("is_null", "not_null"):
        if has_value:
            raise ValueError(f"op {op} takes no value")
        return
    if value is None:
        raise ValueError(f"op {op!r} needs a value (for a null test use op is_null or not_null)")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{v} is not a finite number")
    if op in ("in", "not_in"):
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_IN_VALUES:
            raise ValueError(f"op {op} needs a list of 1 to {MAX_IN_VALUES} values")
        numbers = [isinstance(v, int | float) and not isinstance(v, bool) for v in value]
        strings = [isinstance(v, str) for v in value]
        if not (all(numbers) or all(strings)):
            raise ValueError(f"op {op} needs a list of numbers or a list of strings, not a mix (or booleans)")
        return
    if isinstance(value, list):
        raise ValueError(f"op {op!r} compares with one value, not a list (use in / not_in)")
    if isinstance(value, bool) and op not in ("==", "!="):
        raise ValueError(f"op {op!r} cannot compare with true/false")


class AllOf(_Strict):
    """An item of ``any``: a comparison, or ``all`` of comparisons."""

    column: str | None = Field(None, pattern=_COLUMN_RE, max_length=64)
    op: Op | None = None
    value: Value = None
    all: list[Comparison] | None = Field(None, min_length=1, max_length=MAX_CONDITIONS)

    @model_validator(mode="after")
    def _one_form(self):
        if self.all is not None:
            if self.column is not None or self.op is not None or self.value is not None:
                raise ValueError("give either column/op/value or all, not both")
        else:
            _check_comparison(self.column, self.op, self.value, "value" in self.model_fields_set)
        return self


class Where(_Strict):
    """Row condition of an expectation: one comparison, ``all`` of comparisons, or ``any`` of comparisons
    and ``all`` groups. The validate stage turns it into Great Expectations condition objects."""

    column: str | None = Field(None, pattern=_COLUMN_RE, max_length=64, description="Column to compare.")
    op: Op | None = Field(None, description="==, !=, <, <=, >, >=, in, not_in, is_null, not_null.")
    value: Value = Field(
        None, description="A number, true/false, a string of letters, digits, spaces and _ . , : / @ + - "
        "(at most 100), or for in / not_in a list of numbers or of strings.")
    all: list[Comparison] | None = Field(None, min_length=1, max_length=MAX_CONDITIONS,
                                         description="Rows where every comparison holds.")
    any: list[AllOf] | None = Field(None, min_length=1, max_length=MAX_CONDITIONS,
                                    description="Rows where at least one comparison (or all-group) holds.")

    @model_validator(mode="before")
    @classmethod
    def _not_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            raise ValueError("where is a mapping such as {column: plan, op: '==', value: pro}, never a string: "
                             "condition strings are evaluated as code on the worker")
        return data

    @model_validator(mode="after")
    def _one_form(self):
        forms = [self.all is not None, self.any is not None,
                 self.column is not None or self.op is not None or self.value is not None]
        if sum(forms) != 1:
            raise ValueError("write one of: {column, op, value}, {all: [...]} or {any: [...]}")
        if forms[2]:
            _check_comparison(self.column, self.op, self.value, "value" in self.model_fields_set)
        count = len(self.all or []) + sum(len(a.all) if a.all else 1 for a in self.any or [])
        if count > MAX_CONDITIONS:
            raise ValueError(f"{count} comparisons; at most {MAX_CONDITIONS}")
        return self

    def describe(self) -> str:
        """Readable form for messages: ``plan == 'pro' and tenure_months > 3``."""
        def one(c) -> str:
            if c.op in ("is_null", "not_null"):
                return f"{c.column} {c.op.replace('_', ' ')}"
            return f"{c.column} {c.op.replace('_', ' ')} {c.value!r}"

        if self.all:
            return " and ".join(one(c) for c in self.all)
        if self.any:
            return " or ".join(f"({' and '.join(one(x) for x in a.all)})" if a.all else one(a) for a in self.any)
        return one(self)


def to_gx_condition(where: Where):
    """GX 1.x condition objects for ``where`` (imports GX: call only in a task).

    The pandas execution engine turns them into a ``DataFrame.query`` string itself: column names (checked
    against COLUMN_RE here) as bare identifiers or backticked, values through ``repr``. With names and
    literals restricted as above, that string holds only identifiers, comparison operators and literals.
    """
    from great_expectations.expectations.row_conditions import (
        AndCondition,
        Column,
        ComparisonCondition,
        NullityCondition,
        Operator,
        OrCondition,
    )

    ops = {"==": Operator.EQUAL, "!=": Operator.NOT_EQUAL, "<": Operator.LESS_THAN, "<=": Operator.LESS_THAN_OR_EQUAL,
           ">": Operator.GREATER_THAN, ">=": Operator.GREATER_THAN_OR_EQUAL, "in": Operator.IN, "not_in": Operator.NOT_IN}

    def one(c):
        # Checked again here: a model can be built without validation (model_construct), bypassing lint.
        _check_comparison(c.column, c.op, c.value, c.op not in ("is_null", "not_null"))
        if not re.match(_COLUMN_RE, c.column) or len(c.column) > 64:
            raise ValueError(f"column {c.column!r} is not a plain column name")
        values = c.value if isinstance(c.value, list) else [c.value]
        for v in values:
            if isinstance(v, str) and not re.match(_LITERAL_RE, v):
                raise ValueError(f"value {v!r} is not a plain literal")
            if not isinstance(v, bool | int | float | str | None):
                raise ValueError(f"value {v!r} is not a literal")
        if c.op in ("is_null", "not_null"):
            return NullityCondition(column=Column(c.column), is_null=c.op == "is_null")
        value = list(c.value) if isinstance(c.value, list) else c.value
        return ComparisonCondition(column=Column(c.column), operator=ops[c.op], parameter=value)

    if where.all:
        return AndCondition(conditions=[one(c) for c in where.all])
    if where.any:
        return OrCondition(conditions=[AndCondition(conditions=[one(x) for x in a.all]) if a.all else one(a)
                                       for a in where.any])
    return one(where)


# ------------------------------------------------------------------------------------------- allowlist


@lru_cache(maxsize=1)
def allowlist() -> dict[str, Any]:
    """``{"types": {type: {"kwargs": {name: schema}, "required": [...], "where": bool}}, "excluded": {type: why}}``."""
    return json.loads(ALLOWLIST_FILE.read_text())


EVALUATING_KWARGS = {
    "row_condition": "a row_condition string is evaluated by pandas (DataFrame.query) on the worker; "
                     "write the condition as where: {column, op, value} next to kwargs",
    "condition_parser": "conditions are written as where: {column, op, value}; the platform picks the parser",
}


def expectation_problems(type_: str, kwargs: Any, has_where: bool = False) -> list[tuple[tuple[Any, ...], str]]:
    """(path below the expectation, message) for each way ``type_``/``kwargs`` leave the allowlist."""
    import difflib

    lst = allowlist()
    types, excluded = lst["types"], lst["excluded"]
    if type_ not in types:
        if type_ in excluded:
            return [(("type",), f"{type_} is not allowed in specs: {excluded[type_]}")]
        close = difflib.get_close_matches(type_, list(types), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return [(("type",), f"unknown or not allowed expectation type {type_!r}{hint} "
                            "(allowed: the types in mlplatform/spec/gx_expectations.json)")]
    entry = types[type_]
    if not isinstance(kwargs, dict):
        return [(("kwargs",), "kwargs must be a mapping")]
    out: list[tuple[tuple[Any, ...], str]] = []
    allowed = entry["kwargs"]
    for key, value in kwargs.items():
        where = ("kwargs", key)
        if key in EVALUATING_KWARGS:
            out.append((where, f"{key!r} is not allowed: {EVALUATING_KWARGS[key]}"))
        elif key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            out.append((where, f"unknown kwarg {key!r} of {type_}{hint} (allowed: {', '.join(allowed) or 'none'})"))
        else:
            out += [(where + sub, msg) for sub, msg in _check(value, allowed[key])]
    missing = [k for k in entry["required"] if k not in kwargs]
    if missing:
        out.append((("kwargs",), f"{type_} needs {', '.join(missing)}"))
    if has_where and not entry["where"]:
        out.append((("where",), f"{type_} checks the whole table and takes no where condition"))
    return out


_JSON_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _kind(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(v), type(v).__name__)


def _check(value: Any, schema: dict, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], str]]:
    """The subset of JSON Schema the exported allowlist uses."""
    if "anyOf" in schema:
        results = [_check(value, s, path) for s in schema["anyOf"]]
        return [] if any(not r for r in results) else min(results, key=len)
    if "enum" in schema:
        return [] if value in schema["enum"] and not isinstance(value, bool) else \
            [(path, f"{value!r} is not allowed; expected one of {', '.join(map(repr, schema['enum']))}")]
    types = schema.get("type", [])
    matching = [t for t in types if _JSON_TYPES[t](value)]
    if not matching:
        words = {"integer": "an integer", "number": "a number", "boolean": "true/false", "null": "null",
                 "array": "a list", "object": "a mapping",
                 "string": "an ISO date" if schema.get("format") == "date" else "a string"}
        want = ", ".join(words[t] for t in types[:-1]) + (" or " if len(types) > 1 else "") + words[types[-1]]
        return [(path, f"expected {want}, got {_kind(value)}")]
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, f"{value} is not a finite number")]
    if isinstance(value, int | float) and not isinstance(value, bool):
        for key, ok, word in (("minimum", lambda a, b: a >= b, "at least"), ("maximum", lambda a, b: a <= b, "at most"),
                              ("exclusiveMinimum", lambda a, b: a > b, "above"),
                              ("exclusiveMaximum", lambda a, b: a < b, "below")):
            if key in schema and not ok(value, schema[key]):
                return [(path, f"{value} must be {word} {schema[key]}")]
        return []
    if isinstance(value, str):
        if schema.get("format") == "date":
            return [] if _is_date(value) else \
                [(path, f"{value!r} is not a number or an ISO date (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS)")]
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return [(path, f"string of {len(value)} characters; at most {schema['maxLength']}")]
        if "pattern" in schema and not re.match(schema["pattern"], value):
            return [(path, f"{value!r} does not match {schema['pattern']}")]
        if schema.get("regex"):
            problem = regex_problem(value)
            return [(path, problem)] if problem else []
        return []
    if isinstance(value, list):
        out: list[tuple[tuple[Any, ...], str]] = []
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return [(path, f"{len(value)} items; at most {schema['maxItems']}")]
        if "minItems" in schema and len(value) < schema["minItems"]:
            return [(path, f"{len(value)} items; at least {schema['minItems']}")]
        item_schema = dict(schema.get("items", {}))
        if schema.get("regex"):
            item_schema["regex"] = True
        for i, item in enumerate(value):
            out += _check(item, item_schema, path + (i,))
        return out
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out = [(path + (k,), f"unknown key {k!r} (allowed: {', '.join(props)})") for k in value if k not in props]
        out += [(path, f"needs {k}") for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                out += _check(v, props[k], path + (k,))
        return out
    return []


def _is_date(value: str) -> bool:
    for parse in (date.fromisoformat, datetime.fromisoformat):
        try:
            parse(value)
            return True
        except ValueError:
            pass
    return False


# ----------------------------------------------------------------------------------------------- regex

MAX_REGEX = 200
_REPEATS = (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, getattr(sre_c, "POSSESSIVE_REPEAT", None))


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` may not be a data regex: too long, invalid, backreferences, or a quantified part that
    itself holds a quantifier (the shapes of catastrophic backtracking, e.g. ``(a+)+``); else None.

    Python's ``re`` has no time limit, and GX applies the regex to every value of a column on the worker."""
    if len(pattern) > MAX_REGEX:
        return f"regex of {len(pattern)} characters; at most {MAX_REGEX}"
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"invalid regex: {exc}"
    problem = _walk_regex(parsed, inside_repeat=False)
    return f"regex not allowed: {problem}" if problem else None


def _walk_regex(items, inside_repeat: bool) -> str | None:
    for op, arg in items:
        if op in (sre_c.GROUPREF, sre_c.GROUPREF_EXISTS):
            return "backreferences are not allowed"
        if op in _REPEATS and op is not None:
            low, high, sub = arg
            unbounded_or_many = high is sre_c.MAXREPEAT or high > 1
            if unbounded_or_many and inside_repeat:
                return "a quantifier inside a quantified group (e.g. (a+)+) can take exponential time; rewrite it"
            problem = _walk_regex(sub, inside_repeat or unbounded_or_many)
            if problem:
                return problem
        elif op == sre_c.SUBPATTERN:
            problem = _walk_regex(arg[-1], inside_repeat)
            if problem:
                return problem
        elif op == sre_c.BRANCH:
            if inside_repeat:
                return ("alternatives inside a repeated group (e.g. (a|aa)+) can take exponential time; "
                        "use a character class or rewrite it")
            for branch in arg[1]:
                problem = _walk_regex(branch, inside_repeat)
                if problem:
                    return problem
        elif op in (sre_c.ASSERT, sre_c.ASSERT_NOT):
            problem = _walk_regex(arg[1], inside_repeat)
            if problem:
                return problem
        elif op == getattr(sre_c, "ATOMIC_GROUP", None):
            problem = _walk_regex(arg, inside_repeat)
            if problem:
                return problem
    return None


def expectation_json_schema(schema: dict[str, Any]) -> None:
    """``json_schema_extra`` of the spec's Expectation model: the allowed types and, per type, its kwargs."""
    types = allowlist()["types"]

    def clean(s: Any) -> Any:
        if isinstance(s, dict):
            return {k: clean(v) for k, v in s.items() if k != "regex"}
        if isinstance(s, list):
            return [clean(v) for v in s]
        return s

    schema.setdefault("properties", {}).setdefault("type", {})["enum"] = sorted(types)
    schema["allOf"] = [
        {"if": {"properties": {"type": {"const": name}}, "required": ["type"]},
         "then": {"properties": {"kwargs": {"type": "object", "properties": clean(entry["kwargs"]),
                                            "required": entry["required"], "additionalProperties": False},
                                 **({} if entry["where"] else {"where": {"type": "null"}})}}}
        for name, entry in sorted(types.items())
    ]
