"""Load tenant files, templates and pipeline specs into one catalog, collecting every problem.

Nothing here raises for a bad file: a broken spec becomes a ``BrokenSpec`` with its problems, so one
tenant's typo can never hide another tenant's DAGs. Runs at DAG-parse time: no ML imports.
"""

from __future__ import annotations

import difflib
import posixpath
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from mlplatform.config import REPO_ROOT, PlatformConfig
from mlplatform.spec.errors import Problem, SpecError
from mlplatform.spec.model import (
    NAME_RE,
    RESERVED_NAMES,
    PipelineSpec,
    TenantFile,
    cpu_cores,
    dag_id_for,
    memory_bytes,
)
from mlplatform.spec.expectations import expectation_problems
from mlplatform.spec.safetext import find_unsafe_text
from mlplatform.spec.secrets import find_secrets, redact
from mlplatform.spec.template import PipelineTemplate
from mlplatform.spec.yamlsafe import Located, dotted, load_file

SPEC_SUFFIXES = (".yaml", ".yml")


@dataclass
class LoadedSpec:
    path: Path
    display: str
    spec: PipelineSpec
    located: Located
    sha256: str
    warnings: list[Problem] = field(default_factory=list)

    @property
    def dag_id(self) -> str:
        return self.spec.dag_id


@dataclass
class BrokenSpec:
    path: Path
    display: str
    tenant: str
    name: str
    problems: list[Problem]

    @property
    def dag_id(self) -> str:
        return dag_id_for(self.tenant, self.name)


@dataclass
class Catalog:
    tenants: dict[str, TenantFile] = field(default_factory=dict)
    templates: dict[str, PipelineTemplate] = field(default_factory=dict)
    specs: list[LoadedSpec] = field(default_factory=list)
    broken: list[BrokenSpec] = field(default_factory=list)
    platform_problems: list[Problem] = field(default_factory=list)

    @property
    def problems(self) -> list[Problem]:
        out = list(self.platform_problems)
        for b in self.broken:
            out.extend(b.problems)
        return out


# ------------------------------------------------------------------------------------ pydantic -> lines


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the last key of ``loc`` (for "did you mean")."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        by_alias = {(f.alias or n): f for n, f in current.model_fields.items()}
        f = by_alias.get(part) or current.model_fields.get(part)
        if f is None:
            return None
        current = _inner_model(f.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def validation_problems(exc: ValidationError, located: Located, model: type[BaseModel]) -> list[Problem]:
    """Turn pydantic errors into problems at the spec's own lines, with suggestions for typos."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            key = loc[-1]
            parent = _model_at(model, loc[:-1])
            known = sorted((f.alias or n) for n, f in parent.model_fields.items()) if parent else []
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            msg = f"unknown field {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")
            if known:
                msg += f" (allowed: {', '.join(known)})"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] in ("literal_error", "enum"):
            msg = f"{err.get('input')!r} is not allowed; expected {err['ctx']['expected']}"
        elif err["type"] == "string_pattern_mismatch":
            msg = f"{err.get('input')!r} does not match {err['ctx']['pattern']}"
        problems.append(located.problem(loc, msg))
    return problems


# ----------------------------------------------------------------------------------------- platform files


def _load_model(path: Path, display: str, model: type[BaseModel], allow_symlinks: bool = True) -> tuple[Any, Located]:
    located = load_file(path, display, allow_symlinks=allow_symlinks)
    if not isinstance(located.data, dict):
        raise SpecError([located.problem((), "expected a mapping with apiVersion, kind, metadata and spec")])
    try:
        return model.model_validate(located.data), located
    except ValidationError as exc:
        raise SpecError(validation_problems(exc, located, model)) from None


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    # Every entry with a spec suffix but directories that are real directories: symlinks, pipes and the like
    # are listed so that loading refuses them with an error (lstat, never following a link).
    return sorted(p for p in folder.iterdir() if p.suffix in SPEC_SUFFIXES and (p.is_symlink() or not p.is_dir()))


def _load_platform_files(folder: Path, model: type[BaseModel], kind: str, config: PlatformConfig,
                         catalog: Catalog, names: Collection[str] | None = None) -> dict[str, Any]:
    """Tenant or template files of ``folder`` by name (only ``names`` when given); problems go to the catalog,
    never raise."""
    loaded: dict[str, Any] = {}
    for path in _files(folder):
        if names is not None and path.stem not in names:
            continue
        try:
            obj, located = _load_model(path, _display(path, config), model)
        except SpecError as exc:
            catalog.platform_problems.extend(exc.problems)
            continue
        if obj.metadata.name != path.stem:
            catalog.platform_problems.append(located.problem(
                ("metadata", "name"), f"{kind} name {obj.metadata.name!r} must equal the file name {path.stem!r}"))
            continue
        loaded[obj.metadata.name] = obj
    return loaded


def _display(path: Path, config: PlatformConfig) -> str:
    """The name errors use: relative to the repo when inside it, else to the folder above the specs."""
    resolved = path.absolute()
    for root in (REPO_ROOT, config.specs_dir.parent.absolute()):
        if resolved.is_relative_to(root):
            return str(resolved.relative_to(root))
    return str(path)


# ------------------------------------------------------------------------------------------------ specs


def load_catalog(config: PlatformConfig, only: list[Path] | None = None, *, tenants: Collection[str] | None = None) -> Catalog:
    """Load everything; ``only`` restricts the specs checked (templates are always loaded, tenant files too
    unless ``tenants`` names the ones to read: a tenant's DAG file reads only its own)."""
    catalog = platform_catalog(config, tenants)
    for _ in load_specs(catalog, config, only):
        pass
    return catalog


def platform_catalog(config: PlatformConfig, tenants: Collection[str] | None = None) -> Catalog:
    """A catalog of the tenant files (only ``tenants`` when given) and templates, without specs yet."""
    catalog = Catalog()
    catalog.tenants.update(_load_platform_files(config.tenants_dir, TenantFile, "tenant", config, catalog, tenants))
    catalog.templates.update(_load_platform_files(config.templates_dir, PipelineTemplate, "template", config, catalog))
    return catalog


def load_specs(catalog: Catalog, config: PlatformConfig, only: list[Path] | None = None,
               budget: Any = None) -> Iterator[LoadedSpec | BrokenSpec]:
    """Load the specs (``only``, else every spec) one at a time into ``catalog``, yielding each as it is added,
    so a DAG file can build each one before the next file is read.

    ``budget`` (``factory.budget.ParseBudget``): once spent, the remaining files are not read; each becomes
    the budget's stand-in.
    """
    paths = only if only is not None else spec_paths(config)
    seen: dict[str, str] = {}
    for path in paths:
        if budget is not None and budget.exceeded():
            stand_in = budget.stand_in(path, _display(path, config))
            if stand_in is not None:
                catalog.broken.append(stand_in)
                yield stand_in
            continue
        result = load_spec(path, config, catalog)
        if isinstance(result, LoadedSpec):
            if result.dag_id in seen:
                problem = result.located.problem(
                    ("metadata", "name"), f"pipeline {result.spec.metadata.name!r} is already defined in {seen[result.dag_id]}"
                )
                result = BrokenSpec(path, result.display, result.spec.metadata.tenant, result.spec.metadata.name, [problem])
                catalog.broken.append(result)
                yield result
                continue
            seen[result.dag_id] = result.display
            catalog.specs.append(result)
        else:
            catalog.broken.append(result)
        yield result


def spec_paths(config: PlatformConfig) -> list[Path]:
    """``<specs_dir>/<tenant>/<pipeline>.yaml`` for every tenant folder."""
    if not config.specs_dir.is_dir():
        return []
    return [p for d in sorted(config.specs_dir.iterdir()) if d.is_dir() for p in _files(d)]


def load_spec(path: Path, config: PlatformConfig, catalog: Catalog) -> LoadedSpec | BrokenSpec:
    display = _display(path, config)
    tenant_dir, stem = path.parent.name, path.stem
    # A broken spec keeps a stable DAG id from its location, so its DAG shows the error instead of vanishing.
    fallback_name = stem if re.match(NAME_RE, stem) else re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-") or "invalid"
    fallback_tenant = tenant_dir if re.match(NAME_RE, tenant_dir) else "invalid"
    if fallback_name in RESERVED_NAMES:  # the stand-in must not take the platform's own DAG id
        fallback_name += "-reserved-name"

    def broken(problems: list[Problem]) -> BrokenSpec:
        # Messages echo values and keys (a pattern mismatch, an unknown field): never a credential's text.
        problems = [replace(p, field=redact(p.field), message=redact(p.message)) for p in problems]
        return BrokenSpec(path, display, fallback_tenant, fallback_name, problems)

    try:
        located = load_file(path, display, allow_symlinks=False)
    except SpecError as exc:
        return broken(exc.problems)
    except OSError as exc:
        return broken([Problem(display, 1, 1, "", f"cannot read file: {exc.strerror}")])
    if not isinstance(located.data, dict):
        return broken([located.problem((), "expected a mapping with apiVersion, kind, metadata and spec")])
    try:
        spec = PipelineSpec.model_validate(located.data)
    except ValidationError as exc:
        # One pass reports everything: the checks that can run on the raw data run despite the schema errors.
        problems = validation_problems(exc, located, PipelineSpec)
        shown = {str(p) for p in problems}
        for extra in raw_problems(located, catalog, tenant_dir, stem):
            if str(extra) not in shown:
                shown.add(str(extra))
                problems.append(extra)
        return broken(sorted(problems, key=lambda p: (p.line, p.col)))
    problems, warnings = check_spec(spec, located, catalog, tenant_dir, stem, config)
    if problems:
        return broken(problems)
    return LoadedSpec(path, display, spec, located, located.sha256, warnings)


def _mapping(value: Any, *keys: str) -> dict:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, dict) else {}


def _name_problem(name: str, stem: str) -> str | None:
    return f"name {name!r} must equal the file name {stem!r}" if name != stem else None


def _tenant_problem(tenant: str, tenant_dir: str, catalog: Catalog) -> str | None:
    if tenant != tenant_dir:
        return f"tenant {tenant!r} does not match the folder {tenant_dir!r}: a tenant's specs live in dags/specs/<tenant>/"
    if tenant not in catalog.tenants:
        close = difflib.get_close_matches(tenant, list(catalog.tenants), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown tenant {tenant!r}{hint}: the platform team adds tenants in include/tenants/<tenant>.yaml"
    return None


def raw_problems(located: Located, catalog: Catalog, tenant_dir: str, stem: str) -> list[Problem]:
    """The semantic checks that need no valid schema, on the raw data of a spec whose schema failed: secrets,
    template text, name and tenant against the file and folder, the tenant's data prefixes, cron syntax, the
    expectation allowlist, and the platform bounds on a ``spec.training`` that validates on its own."""
    data = located.data
    p = [located.problem(path, msg) for path, msg in find_secrets(data)]
    p += [located.problem(path, msg) for path, msg in find_unsafe_text(data)]
    md, body = _mapping(data, "metadata"), _mapping(data, "spec")
    if isinstance(md.get("name"), str) and (msg := _name_problem(md["name"], stem)):
        p.append(located.problem(("metadata", "name"), msg))
    tenant = None
    if isinstance(md.get("tenant"), str):
        msg = _tenant_problem(md["tenant"], tenant_dir, catalog)
        if msg:
            p.append(located.problem(("metadata", "tenant"), msg))
        else:
            tenant = catalog.tenants[md["tenant"]]
    source = _mapping(body, "data").get("source")
    if tenant is not None and isinstance(source, str) and (msg := check_data_source(source, tenant)):
        p.append(located.problem(("spec", "data", "source"), msg))
    for at, value in ((("spec", "schedule"), body.get("schedule")),
                      (("spec", "monitoring", "schedule"), _mapping(body, "monitoring").get("schedule"))):
        if isinstance(value, str) and (msg := check_schedule(value)):
            p.append(located.problem(at, msg))
    expectations = _mapping(body, "validation").get("expectations")
    for i, e in enumerate(expectations if isinstance(expectations, list) else []):
        if isinstance(e, dict) and isinstance(e.get("type"), str) and isinstance(e.get("kwargs", {}), dict):
            at = ("spec", "validation", "expectations", i)
            p += [located.problem(at + sub, msg)
                  for sub, msg in expectation_problems(e["type"], e.get("kwargs", {}), e.get("where") is not None)]
    if "training" in body:
        from mlplatform.spec.bounds import hyperparameter_problems, load_bounds
        from mlplatform.spec.model import TrainingSpec

        try:
            training = TrainingSpec.model_validate(body["training"])
            bounds = load_bounds()
        except (ValidationError, SpecError):
            pass  # the schema errors already say what is wrong there
        else:
            p += [located.problem(path, msg) for path, msg in hyperparameter_problems(training, bounds)]
    return p


def check_spec(
    spec: PipelineSpec, located: Located, catalog: Catalog, tenant_dir: str, stem: str, config: PlatformConfig
) -> tuple[list[Problem], list[Problem]]:
    """Checks that need more than one field: tenant, quota, template, paths, connections, secrets."""
    p: list[Problem] = []
    body = spec.spec
    md = spec.metadata
    p += [located.problem(path, msg) for path, msg in find_secrets(located.data)]
    p += [located.problem(path, msg) for path, msg in find_unsafe_text(located.data)]
    if msg := _name_problem(md.name, stem):
        p.append(located.problem(("metadata", "name"), msg))
    if msg := _tenant_problem(md.tenant, tenant_dir, catalog):
        # not checked against another tenant's quotas (a tenant's DAG file reads only its own file)
        p.append(located.problem(("metadata", "tenant"), msg))
        return p, []
    tenant = catalog.tenants[md.tenant]
    if body.template not in catalog.templates:
        close = difflib.get_close_matches(body.template, list(catalog.templates), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        p.append(located.problem(("spec", "template"), f"unknown template {body.template!r}; {hint}"
                                 f"available: {', '.join(sorted(catalog.templates))}"))
    q = tenant.spec.quotas
    res = body.training.resources
    if res.gpu > q.gpu_slots:
        p.append(located.problem(
            ("spec", "training", "resources", "gpu"),
            f"{res.gpu} GPUs requested but tenant {tenant.name!r} has a quota of {q.gpu_slots}: "
            f"ask for at most {q.gpu_slots} or ask the platform team to raise the quota",
        ))
    if cpu_cores(res.cpu) > cpu_cores(q.max_cpu_per_task):
        p.append(located.problem(("spec", "training", "resources", "cpu"),
                                 f"cpu {res.cpu} is above the tenant's per-task limit {q.max_cpu_per_task}"))
    if memory_bytes(res.memory) > memory_bytes(q.max_memory_per_task):
        p.append(located.problem(("spec", "training", "resources", "memory"),
                                 f"memory {res.memory} is above the tenant's per-task limit {q.max_memory_per_task}"))
    problem = check_data_source(body.data.source, tenant)
    if problem:
        p.append(located.problem(("spec", "data", "source"), problem))
    conn = body.data.connection_id
    if conn is not None and conn not in tenant.spec.connections:
        allowed = ", ".join(tenant.spec.connections) or "none"
        p.append(located.problem(("spec", "data", "connection_id"),
                                 f"connection {conn!r} is not allowed for tenant {tenant.name!r} (allowed: {allowed})"))
    for key in ("schedule",):
        problem = check_schedule(getattr(body, key))
        if problem:
            p.append(located.problem(("spec", key), problem))
    problem = check_schedule(body.monitoring.schedule)
    if problem:
        p.append(located.problem(("spec", "monitoring", "schedule"), problem))
    p += _check_columns(spec, located)
    p += _check_tunable(spec, located)
    from mlplatform.spec.bounds import check_bounds  # platform ranges, tenant limits (spec/bounds.py)

    p += check_bounds(spec, located, tenant)
    p += _check_expectations(spec, located)
    return p, []


def feast_view_names(spec: PipelineSpec) -> list[tuple[tuple[Any, ...], str]]:
    """(key path, Feast view name) of every view a pipeline registers in its tenant's Feast project (the
    features stage's names: ``-`` becomes ``_``; no views declared means one view named after the pipeline)."""
    views = spec.spec.features.views
    if views:
        return [(("spec", "features", "views", i, "name"), v.name.replace("-", "_")) for i, v in enumerate(views)]
    return [(("metadata", "name"), spec.metadata.name.replace("-", "_"))]


def feature_view_clashes(checked: list[LoadedSpec], others: list[LoadedSpec] = ()) -> list[Problem]:
    """A problem on every checked spec reusing a feature view name of another pipeline of its tenant (Feast
    views are per tenant project, so the second pipeline's features stage would fail at run time)."""
    owners: dict[tuple[str, str], list[LoadedSpec]] = {}
    everyone = {id(s): s for s in [*checked, *others]}.values()
    for loaded in everyone:
        for name in {n for _, n in feast_view_names(loaded.spec)}:
            owners.setdefault((loaded.spec.metadata.tenant, name), []).append(loaded)
    out = []
    for loaded in checked:
        for path, name in feast_view_names(loaded.spec):
            rivals = [o.display for o in owners[(loaded.spec.metadata.tenant, name)] if o is not loaded]
            if rivals:
                out.append(loaded.located.problem(path, (
                    f"feature view {name!r} is also registered by {', '.join(sorted(rivals))}: feature views are "
                    f"per tenant (one Feast project per tenant), so rename one in spec.features.views")))
    return out


def check_data_source(source: str, tenant: TenantFile) -> str | None:
    """None when ``source`` is inside one of the tenant's allowed prefixes, else why not."""
    normalised = normalise_source(source)
    if normalised is None:
        return (f"{source!r} is not a data path: use a path under the platform data root such as "
                f"{tenant.spec.data.allowed_prefixes[0]}... or an s3:// URI; no '..', '~', '\\', or absolute paths")
    for prefix in tenant.spec.data.allowed_prefixes:
        prefix_n = normalise_source(prefix.rstrip("/")) or ""
        if normalised == prefix_n or normalised.startswith(prefix_n + "/"):
            return None
    return (f"{source!r} is outside the allowed data prefixes of tenant {tenant.name!r} "
            f"({', '.join(tenant.spec.data.allowed_prefixes)})")


def normalise_source(source: str) -> str | None:
    """Canonical form of a data source, or None when it tries to escape (``..``, ``~``, odd schemes)."""
    s = source.strip()
    if any(ch in s for ch in ("\\", "\x00", "~", "%", "?", "#", "@")) or any(ord(c) < 32 or ord(c) > 126 for c in s):
        return None
    if s.startswith("s3://"):
        bucket_key = s[len("s3://"):]
        if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/|$)", bucket_key):
            return None
        scheme, rest = "s3://", bucket_key
    elif "://" in s or s.startswith("/") or ":" in s:
        return None
    else:
        scheme, rest = "", s
    parts = rest.split("/")
    if any(part in ("..", ".") for part in parts):
        return None
    norm = posixpath.normpath(rest).rstrip("/")
    return scheme + norm if norm not in ("", ".") else None


@lru_cache(maxsize=1024)
def check_schedule(value: str | None) -> str | None:
    """None for a valid cron expression or preset, else why not (cached: specs share a few schedules)."""
    if value is None:
        return None
    presets = {"@once", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly", "@annually", "@continuous"}
    if value.startswith("@"):
        return None if value in presets else f"unknown schedule preset {value!r}; use one of {', '.join(sorted(presets))}"
    from croniter import croniter  # already imported by Airflow's cron timetables

    if len(value.split()) != 5 or not croniter.is_valid(value):
        return f"{value!r} is not a valid cron expression (five fields: minute hour day month weekday)"
    return None


def _check_columns(spec: PipelineSpec, located: Located) -> list[Problem]:
    d = spec.spec.data
    out = []
    reserved = {d.entity, d.timestamp, d.label}
    if len(reserved) != 3:
        out.append(located.problem(("spec", "data"), "entity, timestamp and label must be three different columns"))
    if d.features:
        for i, col in enumerate(d.features):
            if col in reserved:
                out.append(located.problem(("spec", "data", "features", i), f"{col!r} is the entity, timestamp or label"))
    views = spec.spec.features.views
    names = [v.name for v in views]
    for i, v in enumerate(views):
        if names.count(v.name) > 1:
            out.append(located.problem(("spec", "features", "views", i, "name"), f"feature view {v.name!r} is defined twice"))
        for j, col in enumerate(v.features):
            if col in reserved:
                out.append(located.problem(("spec", "features", "views", i, "features", j),
                                           f"{col!r} is the entity, timestamp or label, not a feature"))
            elif d.features and col not in d.features:
                out.append(located.problem(("spec", "features", "views", i, "features", j),
                                           f"{col!r} is not one of spec.data.features"))
    return out


def _check_tunable(spec: PipelineSpec, located: Located) -> list[Problem]:
    """Every tunable hyperparameter has a default inside its bounds (it becomes a trigger-form Param)."""
    training = spec.spec.training
    out = []
    for name, bounds in training.tunable.items():
        where = ("spec", "training", "hyperparameters", name)
        if name not in training.hyperparameters:
            out.append(located.problem(("spec", "training", "tunable", name),
                                       f"tunable {name!r} needs a default value in spec.training.hyperparameters"))
            continue
        value = training.hyperparameters[name]
        if bounds.choices is not None:
            if value not in bounds.choices:
                out.append(located.problem(where, f"{value!r} is not one of its tunable choices {bounds.choices}"))
        elif isinstance(value, bool) or not isinstance(value, int | float):
            out.append(located.problem(where, f"{value!r} must be a number to have a tunable min/max"))
        elif not bounds.minimum <= value <= bounds.maximum:
            out.append(located.problem(where, f"{value} is outside its tunable range [{bounds.minimum:g}, {bounds.maximum:g}]"))
    return out


def _check_expectations(spec: PipelineSpec, located: Located) -> list[Problem]:
    """Expectation types and kwargs against the allowlist exported from Great Expectations (spec/expectations.py)."""
    out = []
    for i, e in enumerate(spec.spec.validation.expectations):
        at = ("spec", "validation", "expectations", i)
        out += [located.problem(at + sub, msg) for sub, msg in expectation_problems(e.type, e.kwargs, e.where is not None)]
    return out


__all__ = ["feature_view_clashes", "Catalog", "LoadedSpec", "BrokenSpec", "load_catalog", "load_spec", "spec_paths", "dotted"]
