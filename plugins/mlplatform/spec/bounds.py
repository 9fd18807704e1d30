"""Bounds from the platform, not the spec: hyperparameter allowlists and ranges, platform-only keys, and the
per-tenant limits on training timeouts, schedules and serving replicas.

The ranges live in a platform-owned file (``include/platform/bounds.yaml``, or ``$MLPLATFORM_BOUNDS_FILE``)
read once per parse (cached on path, mtime and size); the tenant limits come from the tenant file's
``spec.quotas`` with the platform file's ``tenant_defaults`` where it is silent. Checked at parse time by the
loader (``check_bounds``) and again at run time on the trigger form's overrides (``run_hyperparameters``).

Parse-time code: imports pydantic and croniter (both already loaded by Airflow), never an ML library.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from mlplatform.config import REPO_ROOT
from mlplatform.spec.errors import Problem, SpecError
from mlplatform.spec.model import (
    PipelineSpec,
    Strict,
    TenantFile,
    TrainingSpec,
    cpu_cores,
    duration_seconds,
    memory_bytes,
)
from mlplatform.spec.yamlsafe import Located, load_file

BOUNDS_FILE = REPO_ROOT / "include" / "platform" / "bounds.yaml"
# The framework/model keys of bounds.yaml: every one must be there, nothing else.
MODEL_KEYS = ("xgboost", "sklearn/gradient_boosting", "sklearn/random_forest", "sklearn/logistic_regression", "pytorch")
# Schedule presets and the cron each one stands for (None: no interval, @once runs once, @continuous back to back).
PRESETS: dict[str, str | None] = {
    "@once": None, "@continuous": None, "@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *", "@quarterly": "0 0 1 */3 *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *",
}
# Most features a spec may name in all its feature views together (each view also has its own cap).
MAX_VIEW_FEATURES = 500


class HyperparameterError(ValueError):
    """A hyperparameter value the platform does not allow (raised at run time)."""


# ------------------------------------------------------------------------------------------ the platform file


class ParamRange(Strict):
    """One allowed hyperparameter: a number range (inclusive) or a list of choices."""

    type: Literal["int", "float", "str", "bool"]
    minimum: float | None = Field(None, alias="min")
    maximum: float | None = Field(None, alias="max")
    choices: list[bool | str] | None = Field(None, min_length=1)
    note: str = ""

    @model_validator(mode="after")
    def _kind(self) -> ParamRange:
        if self.type in ("int", "float"):
            if self.choices is not None or self.minimum is None or self.maximum is None:
                raise ValueError(f"a {self.type} parameter takes min and max, not choices")
            if not (math.isfinite(self.minimum) and math.isfinite(self.maximum)) or self.minimum > self.maximum:
                raise ValueError(f"min {self.minimum} and max {self.maximum} must be finite, min <= max")
        else:
            want = bool if self.type == "bool" else str
            if self.choices is None or self.minimum is not None or self.maximum is not None:
                raise ValueError(f"a {self.type} parameter takes choices, not min and max")
            if any(type(c) is not want for c in self.choices):
                raise ValueError(f"choices of a {self.type} parameter must all be {self.type}")
        return self

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(_show(c) for c in self.choices)
        kind = "an integer" if self.type == "int" else "a number"
        return f"{kind} in [{_num(self.minimum)}, {_num(self.maximum)}]"


class TenantDefaults(Strict):
    max_training_timeout: str
    min_schedule_interval: str
    schedule_presets: list[str]
    max_serving_replicas: int = Field(ge=1, le=100)

    @model_validator(mode="after")
    def _values(self) -> TenantDefaults:
        duration_seconds(self.max_training_timeout)
        duration_seconds(self.min_schedule_interval)
        unknown = [p for p in self.schedule_presets if p not in PRESETS]
        if unknown:
            raise ValueError(f"unknown schedule presets {unknown}; known: {', '.join(PRESETS)}")
        return self


class PlatformBounds(Strict):
    api_version: Literal["mlplatform.io/v1"] = Field(alias="apiVersion")
    kind: Literal["PlatformBounds"]
    platform_keys: dict[str, str] = Field(default_factory=dict)
    hyperparameters: dict[str, dict[str, ParamRange]]
    tenant_defaults: TenantDefaults

    @model_validator(mode="after")
    def _complete(self) -> PlatformBounds:
        if set(self.hyperparameters) != set(MODEL_KEYS):
            raise ValueError(f"hyperparameters must list exactly {', '.join(MODEL_KEYS)}")
        for key, params in self.hyperparameters.items():
            clash = sorted(set(params) & set(self.platform_keys))
            if clash:
                raise ValueError(f"{key}: {', '.join(clash)} are platform keys and cannot be allowed to specs")
        return self


def bounds_file() -> Path:
    return Path(os.environ.get("MLPLATFORM_BOUNDS_FILE", "").strip() or BOUNDS_FILE)


def load_bounds(path: Path | None = None) -> PlatformBounds:
    """The platform bounds; raises SpecError (with the file's line) when the file is missing or invalid."""
    path = path or bounds_file()
    try:
        st = path.stat()
    except OSError as exc:
        raise SpecError([Problem(_display(path), 1, 1, "", f"platform bounds file: {exc.strerror}")]) from None
    result = _load_cached(str(path), st.st_mtime_ns, st.st_size)
    if isinstance(result, list):
        raise SpecError(result)
    return result


@lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int, size: int) -> PlatformBounds | list[Problem]:
    """Parsed once per (path, mtime, size): every spec of a parse shares it; problems are cached too."""
    try:
        located = load_file(Path(path), _display(Path(path)))
        return PlatformBounds.model_validate(located.data)
    except SpecError as exc:
        return exc.problems
    except ValidationError as exc:
        return [located.problem(tuple(e["loc"]), e["msg"].removeprefix("Value error, "))
                for e in exc.errors(include_url=False)]


def _display(path: Path) -> str:
    path = path.absolute()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def model_key(training: TrainingSpec) -> str:
    return f"sklearn/{training.model}" if training.framework == "sklearn" else training.framework


def _num(x: float | int | None) -> str:
    if x is None:
        return "?"
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _num(value)
    return repr(value)


# ------------------------------------------------------------------------------------------ hyperparameters


def name_problem(name: str, allowed: dict[str, ParamRange], bounds: PlatformBounds, what: str) -> str | None:
    """Why ``name`` may not be set by a spec or the trigger form, or None when it may."""
    if name in bounds.platform_keys:
        return f"{name!r} is set by the platform, not the spec: {bounds.platform_keys[name]}"
    if name in allowed:
        return None
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown hyperparameter {name!r} for {what}{hint} (allowed: {', '.join(sorted(allowed))})"


def value_problem(name: str, value: Any, rng: ParamRange, what: str) -> str | None:
    """Why ``value`` is not allowed for ``name`` (type, finiteness, range or choices), or None."""
    expected = f"{what} {name} takes {rng.describe()}"
    if rng.type in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            hint = " (YAML reads 1e9 as text: write the digits, or 1.0e+9)" if _numeric_text(value) else ""
            return f"{value!r} is not a number: {expected}{hint}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{value!r} is not a finite number: {expected}"
        if rng.type == "int" and isinstance(value, float) and not value.is_integer():
            return f"{value!r} is not an integer: {expected}"
        if not rng.minimum <= value <= rng.maximum:
            return (f"{_num(value)} is outside the platform's range [{_num(rng.minimum)}, {_num(rng.maximum)}] "
                    f"for {what} {name}")
        return None
    want = bool if rng.type == "bool" else str
    if type(value) is not want or value not in rng.choices:
        note = f" ({rng.note})" if rng.note else ""
        return f"{_show(value)} is not allowed: {expected}{note}"
    return None


def _numeric_text(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def hyperparameter_problems(training: TrainingSpec, bounds: PlatformBounds) -> list[tuple[tuple, str]]:
    """(key path, message) for every hyperparameter and tunable the platform does not allow."""
    key = model_key(training)
    allowed = bounds.hyperparameters[key]
    what = key.replace("/", " ")
    out: list[tuple[tuple, str]] = []
    bad_names = set()
    for name, value in training.hyperparameters.items():
        where = ("spec", "training", "hyperparameters", name)
        problem = name_problem(name, allowed, bounds, what)
        if problem:
            bad_names.add(name)
            out.append((where, problem))
            continue
        problem = value_problem(name, value, allowed[name], what)
        if problem:
            out.append((where, problem))
    for name, tunable in training.tunable.items():
        where = ("spec", "training", "tunable", name)
        if name in bad_names:
            continue  # already reported at its value
        problem = name_problem(name, allowed, bounds, what)
        if problem:
            out.append((where, problem))
            continue
        rng = allowed[name]
        if tunable.choices is not None:
            for i, choice in enumerate(tunable.choices):
                problem = value_problem(name, choice, rng, what)
                if problem:
                    out.append((where + ("choices", i), problem))
            continue
        if rng.choices is not None:
            out.append((where, f"{name} takes choices ({rng.describe()}): give the tunable choices, not min and max"))
            continue
        lo, hi = tunable.minimum, tunable.maximum
        if not (math.isfinite(lo) and math.isfinite(hi)):
            out.append((where, f"tunable bounds [{lo}, {hi}] must be finite numbers"))
        elif rng.type == "int" and not (float(lo).is_integer() and float(hi).is_integer()):
            out.append((where, f"{name} is an integer: its tunable min and max must be whole numbers, got [{lo}, {hi}]"))
        elif lo < rng.minimum or hi > rng.maximum:
            out.append((where, f"tunable range [{_num(lo)}, {_num(hi)}] of {name} is outside the platform's range "
                               f"[{_num(rng.minimum)}, {_num(rng.maximum)}] for {what} {name}"))
    return out


def run_hyperparameters(spec: PipelineSpec, params: dict[str, Any], bounds: PlatformBounds | None = None) -> dict:
    """The hyperparameters a run trains with: the spec's, overridden by the trigger form's ``hp_<name>`` values.

    Checked again here, whatever the trigger form let through (Airflow's Param JSON schema lets NaN pass
    ``minimum``/``maximum``; the REST API or a conf edited by hand may skip the form): every value is of its
    type, finite, inside its tunable bounds and inside the platform's range. Raises HyperparameterError.
    """
    bounds = bounds or load_bounds()
    training = spec.spec.training
    key = model_key(training)
    allowed, what = bounds.hyperparameters[key], key.replace("/", " ")
    hp = dict(training.hyperparameters)
    for name, tunable in training.tunable.items():
        value = params.get(f"hp_{name}")
        if value is None:
            continue
        origin = f"hyperparameter {name}={value!r} from the trigger form"
        if tunable.choices is not None:
            if not any(_same_choice(value, c) for c in tunable.choices):
                raise HyperparameterError(f"{origin} is not one of its tunable choices {tunable.choices}")
        else:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise HyperparameterError(f"{origin} is not a number")
            if not math.isfinite(value):
                raise HyperparameterError(f"{origin} is not a finite number")
            if not tunable.minimum <= value <= tunable.maximum:
                raise HyperparameterError(f"{origin} is outside its tunable range "
                                          f"[{_num(tunable.minimum)}, {_num(tunable.maximum)}]")
        hp[name] = value
    for name, value in hp.items():
        problem = name_problem(name, allowed, bounds, what)
        if problem is None:
            problem = value_problem(name, value, allowed[name], what)
        if problem:
            raise HyperparameterError(f"hyperparameter {name}: {problem}")
        if allowed[name].type == "int" and isinstance(value, float):
            hp[name] = int(value)  # 3.0 from a JSON conf: the estimators want an int
    return hp


def _same_choice(value: Any, choice: Any) -> bool:
    """``value`` is ``choice``: strings and booleans by type and value, numbers by value (1 == 1.0, not True)."""
    if isinstance(value, bool | str) or isinstance(choice, bool | str):
        return type(value) is type(choice) and value == choice
    return isinstance(value, int | float) and value == choice


# ------------------------------------------------------------------------------------------ tenant limits


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's effective limits: its tenant file's quotas, else the platform defaults."""

    max_training_timeout: str
    min_schedule_interval: str
    schedule_presets: tuple[str, ...]
    max_serving_replicas: int

    @classmethod
    def of(cls, tenant: TenantFile, bounds: PlatformBounds) -> TenantLimits:
        q, d = tenant.spec.quotas, bounds.tenant_defaults
        pick = lambda name: getattr(q, name, None) if getattr(q, name, None) is not None else getattr(d, name)  # noqa: E731
        return cls(pick("max_training_timeout"), pick("min_schedule_interval"), tuple(pick("schedule_presets")),
                   pick("max_serving_replicas"))


def fmt_duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@lru_cache(maxsize=2048)
def min_cron_gap(expr: str) -> int | None:
    """Smallest gap in seconds between two runs of a valid 5-field cron (UTC); None when it never fires.

    Exact without walking every run: within a firing day the runs are every (hour, minute) pair, so the
    smallest gap is either between two of those, or across consecutive firing days (last run of one, first
    of the next); the firing days come from croniter on ``0 0 <dom> <month> <dow>`` over about a year.
    A cron that fires at most once in that year counts as a year.
    """
    from croniter import CroniterBadDateError, croniter

    fields = expr.split()
    start = datetime(2025, 12, 31, 23, 59)
    expanded = croniter(expr, start).expanded
    minutes, hours = _expand(expanded[0], 60), _expand(expanded[1], 24)
    if minutes is None or hours is None:  # an exotic field: walk the runs instead
        return _walk_gap(expr, start)
    times = sorted(h * 60 + m for h in hours for m in minutes)
    gaps = [b - a for a, b in zip(times, times[1:])]
    days = croniter(f"0 0 {fields[2]} {fields[3]} {fields[4]}", start)
    horizon = start + timedelta(days=370)
    fired, previous = False, None
    for _ in range(400):
        try:
            day = days.get_next(datetime)
        except CroniterBadDateError:
            break
        fired = True
        if previous is not None:
            gaps.append((day - previous).days * 1440 - (times[-1] - times[0]))
            if (day - previous).days == 1:
                break
        if day > horizon:
            break
        previous = day
    if not fired:
        return None
    return min(gaps) * 60 if gaps else 366 * 86400


def _expand(values: list, size: int) -> list[int] | None:
    if values == ["*"]:
        return list(range(size))
    return [int(v) for v in values] if all(isinstance(v, int) for v in values) else None


def _walk_gap(expr: str, start: datetime) -> int | None:
    from croniter import CroniterBadDateError, croniter

    it, previous, best = croniter(expr, start), None, None
    for _ in range(3000):
        try:
            t = it.get_next(datetime)
        except CroniterBadDateError:
            break
        if previous is not None:
            gap = int((t - previous).total_seconds())
            best = gap if best is None else min(best, gap)
        previous = t
    return best if best is not None else (None if previous is None else 366 * 86400)


def schedule_problem(value: str | None, limits: TenantLimits, tenant: str) -> str | None:
    """Why the tenant may not use this (syntactically valid) schedule, or None."""
    if value is None:
        return None
    if value.startswith("@"):
        if value not in limits.schedule_presets:
            return (f"schedule preset {value!r} is not allowed for tenant {tenant!r} "
                    f"(allowed: {', '.join(limits.schedule_presets)}; the platform team sets schedule_presets "
                    "in the tenant file)")
        cron = PRESETS.get(value)
        if cron is None:
            return None
    else:
        cron = value
    gap = min_cron_gap(cron)
    if gap is None:
        return f"{value!r} never fires (no date matches it)"
    least = duration_seconds(limits.min_schedule_interval)
    if gap < least:
        return (f"{value!r} runs {fmt_duration(gap)} apart at the closest; tenant {tenant!r} allows runs at "
                f"least {limits.min_schedule_interval} apart (min_schedule_interval in the tenant file)")
    return None


# ------------------------------------------------------------------------------------------ the parse-time check


def check_bounds(spec: PipelineSpec, located: Located, tenant: TenantFile) -> list[Problem]:
    """Every platform bound a spec breaks, at the spec's own lines (called by the loader's ``check_spec``)."""
    from mlplatform.spec.loader import check_schedule

    try:
        bounds = load_bounds()
    except SpecError as exc:  # fail closed: without the platform's ranges nothing can be checked
        return [located.problem(("spec", "training"), f"platform bounds unavailable: {exc.problems[0]}")]
    out: list[Problem] = []
    body = spec.spec
    training = body.training
    out += [located.problem(path, msg) for path, msg in hyperparameter_problems(training, bounds)]
    limits = TenantLimits.of(tenant, bounds)
    if duration_seconds(training.timeout) > duration_seconds(limits.max_training_timeout):
        out.append(located.problem(("spec", "training", "timeout"),
                                   f"timeout {training.timeout} is above the limit of tenant {tenant.name!r}: "
                                   f"{limits.max_training_timeout} (max_training_timeout in the tenant file)"))
    for path, value in ((("spec", "schedule"), body.schedule), (("spec", "monitoring", "schedule"), body.monitoring.schedule)):
        if check_schedule(value) is None:  # a syntax error is the loader's to report
            problem = schedule_problem(value, limits, tenant.name)
            if problem:
                out.append(located.problem(path, problem))
    views = body.features.views
    total = sum(len(v.features) for v in views)
    if total > MAX_VIEW_FEATURES:
        out.append(located.problem(("spec", "features", "views"),
                                   f"{total} features in all views together; at most {MAX_VIEW_FEATURES}"))
    out += _deployment_problems(spec, located, tenant, limits)
    return out


def _deployment_problems(spec: PipelineSpec, located: Located, tenant: TenantFile, limits: TenantLimits) -> list[Problem]:
    """KServe serving pods are the tenant's pods: same per-task limits, and at most max_serving_replicas."""
    d = spec.spec.deployment
    if d.target != "kserve":
        return []
    q, res, out = tenant.spec.quotas, d.resources, []
    base = ("spec", "deployment")
    if cpu_cores(res.cpu) > cpu_cores(q.max_cpu_per_task):
        out.append(located.problem(base + ("resources", "cpu"),
                                   f"cpu {res.cpu} is above the tenant's per-task limit {q.max_cpu_per_task}"))
    if memory_bytes(res.memory) > memory_bytes(q.max_memory_per_task):
        out.append(located.problem(base + ("resources", "memory"),
                                   f"memory {res.memory} is above the tenant's per-task limit {q.max_memory_per_task}"))
    if res.gpu > q.gpu_slots:
        out.append(located.problem(base + ("resources", "gpu"),
                                   f"{res.gpu} GPUs per replica but tenant {tenant.name!r} has a quota of {q.gpu_slots}"))
    for name in ("min_replicas", "max_replicas"):
        value = getattr(d, name)
        if value > limits.max_serving_replicas:
            out.append(located.problem(base + (name,),
                                       f"{name} {value} is above the limit of tenant {tenant.name!r}: "
                                       f"{limits.max_serving_replicas} serving replicas (max_serving_replicas in "
                                       "the tenant file)"))
    return out
