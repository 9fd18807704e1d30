"""Feature stage: register the pipeline's feature views in its tenant's Feast project, build the training set
with a point-in-time join, and load the newest values into the online store.

Each tenant has its own Feast registry file and project; the repo is defined in code, never in YAML. Every
Feast call that writes the registry runs under a per-tenant file lock, because the file registry is a
read-modify-write of one file and two runs of the same tenant would otherwise lose each other's views.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from mlplatform.config import PlatformConfig
from mlplatform.spec.model import COLUMN_RE, duration_seconds
from mlplatform.stages.context import RunContext, StageFailed

log = logging.getLogger(__name__)

ROW_ID = "_mlp_row_id"
PIPELINE_TAG = "mlplatform.pipeline"
ONLINE_CHECK_ENTITIES = 5


def feast_name(name: str) -> str:
    """Spec name -> Feast object name (Feast allows letters, digits and underscores)."""
    return name.replace("-", "_")


def tenant_dir(config: PlatformConfig, tenant: str) -> Path:
    path = config.feast_root / tenant
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def tenant_lock(config: PlatformConfig, tenant: str) -> Iterator[None]:
    """Serialise registry writers of one tenant (file registry: whole-file read-modify-write)."""
    with open(tenant_dir(config, tenant) / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def repo_config(config: PlatformConfig, tenant: str):
    """The tenant's Feast repo, entirely in code: file registry, duckdb offline store, SQLite or Redis online."""
    from feast import RepoConfig
    from feast.infra.offline_stores.duckdb import DuckDBOfflineStoreConfig
    from feast.repo_config import RegistryConfig

    root = tenant_dir(config, tenant)
    if config.feast_online_store == "redis":
        from feast.infra.online_stores.redis import RedisOnlineStoreConfig

        online = RedisOnlineStoreConfig(connection_string=config.redis_url)
    elif config.feast_online_store == "sqlite":
        from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig

        online = SqliteOnlineStoreConfig(path=str(root / "online.db"))
    else:
        raise ValueError(f"MLPLATFORM_FEAST_ONLINE_STORE={config.feast_online_store!r}: use sqlite or redis")
    registry = RegistryConfig(path=str(root / "registry.db"))
    return RepoConfig(project=feast_name(tenant), provider="local", registry=registry,
                      offline_store=DuckDBOfflineStoreConfig(), online_store=online)


def feature_store(config: PlatformConfig, tenant: str):
    """A FeatureStore on the tenant's project (also what an online reader should use)."""
    from feast import FeatureStore

    return FeatureStore(config=repo_config(config, tenant))


# ------------------------------------------------------------------------------------------ definitions


def _view_plan(ctx: RunContext, columns: list[str]) -> list[tuple[str, list[str], int]]:
    """(Feast view name, features, ttl seconds) per view; checks the columns exist and do not overlap."""
    d = ctx.spec.spec.data
    declared = ctx.spec.spec.features.views
    if declared:
        plan = [(feast_name(v.name), list(v.features), duration_seconds(v.ttl)) for v in declared]
    else:
        plan = [(feast_name(ctx.spec.metadata.name), data_feature_columns(ctx, columns), duration_seconds("30d"))]
    seen: set[str] = set()
    for view, features, _ in plan:
        for f in features:
            if f not in columns:
                raise StageFailed(f"feature view {view}: column {f!r} is not in the source (columns: {', '.join(columns)})")
            if f in {d.entity, d.timestamp, d.label}:
                raise StageFailed(f"feature view {view}: {f!r} is the entity, timestamp or label, not a feature")
            if f in seen:
                raise StageFailed(f"feature {f!r} appears in more than one feature view")
            seen.add(f)
    if not seen:
        raise StageFailed("no feature columns: the source holds only the entity, timestamp and label")
    return plan


def data_feature_columns(ctx: RunContext, columns: list[str]) -> list[str]:
    """The default features (every other column of the data), refused unless each name is a plain identifier.

    Column names come from the tenant's data, not the linted spec: they reach Feast's SQL, MLflow signatures
    and reports, so they get the same rule as the spec's own column fields.
    """
    features = ctx.spec.feature_columns(columns)
    bad = [c for c in features if not (len(c) <= 64 and re.match(COLUMN_RE, c))]
    if bad:
        shown = ", ".join(repr(c[:40]) for c in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise StageFailed(f"column name(s) {shown} of the source cannot be features: a feature name must be letters, "
                          "digits and underscores, starting with a letter or underscore, at most 64 characters; "
                          "rename the columns or list the features in spec.data.features")
    return features


def _feast_dtype(name: str, pa_type):
    import pyarrow as pa
    from feast import types as ft

    checks = [(pa.types.is_boolean, ft.Bool), (pa.types.is_integer, ft.Int64), (pa.types.is_float32, ft.Float32),
              (pa.types.is_floating, ft.Float64), (pa.types.is_string, ft.String),
              (pa.types.is_large_string, ft.String)]
    for check, dtype in checks:
        if check(pa_type):
            return dtype
    raise StageFailed(f"column {name!r} has type {pa_type}; features must be numbers, booleans or strings")


def _definitions(ctx: RunContext, plan, schema, source_path: Path):
    """The Feast entity and feature views of this pipeline over the run's source snapshot."""
    from feast import Entity, FeatureView, Field, FileSource, ValueType

    d = ctx.spec.spec.data
    entity_dtype = _feast_dtype(d.entity, schema.field(d.entity).type)
    if entity_dtype.to_value_type() not in (ValueType.INT64, ValueType.STRING):
        raise StageFailed(f"entity column {d.entity!r} must hold integers or strings")
    entity = Entity(name=d.entity, join_keys=[d.entity], value_type=entity_dtype.to_value_type())
    pipeline = ctx.spec.metadata.name
    source = FileSource(name=f"{feast_name(pipeline)}_source", path=str(source_path), timestamp_field=d.timestamp)
    views = [
        FeatureView(
            name=name,
            entities=[entity],
            ttl=timedelta(seconds=ttl),
            schema=[Field(name=d.entity, dtype=entity_dtype)]
            + [Field(name=f, dtype=_feast_dtype(f, schema.field(f).type)) for f in features],
            source=source,
            tags={PIPELINE_TAG: pipeline},
        )
        for name, features, ttl in plan
    ]
    return entity, views


def _check_ownership(store, views, pipeline: str) -> None:
    """Refuse to overwrite a view another pipeline of the same tenant registered."""
    from feast.errors import FeatureViewNotFoundException

    for view in views:
        try:
            owner = store.get_feature_view(view.name).tags.get(PIPELINE_TAG)
        except FeatureViewNotFoundException:
            continue
        if owner not in (None, pipeline):
            raise StageFailed(f"feature view {view.name!r} belongs to pipeline {owner!r} of this tenant; "
                              "rename it in spec.features.views")


# ----------------------------------------------------------------------------------------------- data


def _read(files: list[Path], columns: list[str], timestamp: str):
    """Concatenate parquet files (selected columns) with the timestamp as UTC nanoseconds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        missing = [c for c in columns if c not in pq.read_schema(f).names]
        if missing:
            raise StageFailed(f"{f} has no column {', '.join(missing)}")
    try:
        table = pa.concat_tables([pq.read_table(f, columns=columns) for f in files], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise StageFailed(f"the source partitions do not share one schema: {exc}") from exc
    ts_type = table.schema.field(timestamp).type
    if not pa.types.is_timestamp(ts_type):
        raise StageFailed(f"timestamp column {timestamp!r} has type {ts_type}, not a timestamp")
    i = table.schema.get_field_index(timestamp)
    table = table.set_column(i, timestamp, table.column(i).cast(pa.timestamp("ns", tz="UTC")))
    return table


def _write_snapshot(ctx: RunContext, files: list[Path], columns: list[str]):
    """Write entity, timestamp and feature columns of every input partition to ``source.parquet``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    d = ctx.spec.spec.data
    table = _read(files, [d.entity, d.timestamp, *columns], d.timestamp)
    for key in (d.entity, d.timestamp):
        if table.column(key).null_count:
            raise StageFailed(f"{table.column(key).null_count} rows have no {key}; Feast cannot join them")
    path = ctx.artifact_dir.resolve() / "source.parquet"
    pq.write_table(table, path)
    bounds = pc.min_max(table.column(d.timestamp))
    return path, table.schema, bounds["min"].as_py(), bounds["max"].as_py()


def _entity_frame(ctx: RunContext, files: list[Path]):
    """(row id, entity, timestamp, label) of the training partitions, in file order."""
    import numpy as np

    d = ctx.spec.spec.data
    df = _read(files, [d.entity, d.timestamp, d.label], d.timestamp).to_pandas()
    df.insert(0, ROW_ID, np.arange(len(df), dtype="int64"))
    return df


def _training_set(store, entity_df, refs: list[str], features: list[str]):
    """Point-in-time join, joined back on the row id so order and count equal the input's."""
    result = store.get_historical_features(entity_df=entity_df, features=refs).to_df()
    ids = result[ROW_ID]
    if len(result) != len(entity_df) or ids.duplicated().any() or not ids.isin(entity_df[ROW_ID]).all():
        raise StageFailed(f"Feast returned {len(result)} rows ({ids.nunique()} distinct) for "
                          f"{len(entity_df)} input rows")
    return entity_df.merge(result[[ROW_ID, *features]], on=ROW_ID, how="left", validate="one_to_one")


def holdout_mask(df, entity: str, timestamp: str, fraction: float):
    """True for held-out rows: a fixed hash of (entity, timestamp), so a row keeps its side on every run."""
    import pandas as pd

    key = pd.DataFrame({"e": df[entity].values, "t": df[timestamp].astype("datetime64[ns, UTC]").astype("int64")})
    buckets = pd.util.hash_pandas_object(key, index=False).to_numpy() % 1_000_000
    return buckets < round(fraction * 1_000_000)


def dataset_fingerprint(df, sort_by: list[str]) -> str:
    """``sha256:`` of a data set's content, independent of row order."""
    import pandas as pd

    ordered = df.sort_values(sort_by + [c for c in df.columns if c not in sort_by], kind="mergesort")
    digest = hashlib.sha256(repr([(c, str(t)) for c, t in ordered.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(ordered, index=False).to_numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


# ------------------------------------------------------------------------------------------- online


def _views_to_load(store, names: list[str], end) -> list[str]:
    """Views whose online values are older than ``end`` (a backfill must not roll the online store back)."""
    from feast.feature_view import FeatureViewState

    stale = []
    for name in names:
        view = store.get_feature_view(name)
        last = view.most_recent_end_time
        if last is None or last <= end or view.state != FeatureViewState.AVAILABLE_ONLINE:
            stale.append(name)
    return stale


def _online_check(store, refs: list[str], features: list[str], entity: str, ids: list) -> int:
    """How many of ``ids`` have every feature in the online store."""
    rows = store.get_online_features(features=refs, entity_rows=[{entity: i} for i in ids]).to_dict()
    return sum(all(rows[f][k] is not None for f in features) for k in range(len(ids)))


def _latest_ids(table, entity: str, timestamp: str) -> list:
    """A few entities of the newest rows (to read back from the online store)."""
    import pyarrow.compute as pc

    idx = pc.select_k_unstable(table, ONLINE_CHECK_ENTITIES, [(timestamp, "descending")])
    return list(dict.fromkeys(table.column(entity).take(idx).to_pylist()))


# -------------------------------------------------------------------------------------------- stage


def _timed(timings: dict, name: str, fn, *args, **kwargs):
    start = time.monotonic()
    out = fn(*args, **kwargs)
    timings[name] = round(time.monotonic() - start, 3)
    return out


def build_features(ctx: RunContext, training_files: list[Path], current_files: list[Path]) -> dict:
    """Apply the pipeline's views, write train/holdout parquet and materialize the data's time range."""
    import pyarrow.parquet as pq

    d = ctx.spec.spec.data
    files = list(dict.fromkeys([*training_files, *current_files]))
    plan = _view_plan(ctx, pq.read_schema(training_files[0]).names)
    features = [f for _, fs, _ in plan for f in fs]
    refs = [f"{view}:{f}" for view, fs, _ in plan for f in fs]
    names = [view for view, _, _ in plan]
    source_path, schema, start, end = _write_snapshot(ctx, files, features)
    entity, views = _definitions(ctx, plan, schema, source_path)
    entity_df = _entity_frame(ctx, list(training_files))
    timings: dict[str, float] = {}
    tenant = ctx.spec.metadata.tenant
    with tenant_lock(ctx.config, tenant):
        store = feature_store(ctx.config, tenant)
        _check_ownership(store, views, ctx.spec.metadata.name)
        _timed(timings, "apply", store.apply, [entity, *views])
        data = _timed(timings, "historical", _training_set, store, entity_df, refs, features)
        to_load = _views_to_load(store, names, end)
        if to_load:
            _timed(timings, "materialize", store.materialize, start, end + timedelta(seconds=1),
                   feature_views=to_load)
    ids = _latest_ids(pq.read_table(source_path, columns=[d.entity, d.timestamp]), d.entity, d.timestamp)
    online = _online_check(store, refs, features, d.entity, ids)
    if to_load and online < len(ids):
        raise RuntimeError(f"materialized {to_load}, yet only {online} of {len(ids)} entities read back online")
    log.info("feast %s/%s: %s rows, timings %s, online check %d", ctx.feast_project, names, len(data), timings, online)
    return _write_sets(ctx, data, features) | {
        "feature_columns": features,
        "feast_project": ctx.feast_project,
        "feature_views": names,
        "online_check": online,
        "timings": timings,
    }


def _write_sets(ctx: RunContext, data, features: list[str]) -> dict:
    """Split by key hash, write train.parquet and holdout.parquet, fingerprint the whole set."""
    d = ctx.spec.spec.data
    data = data[[d.entity, d.timestamp, d.label, *features]]
    mask = holdout_mask(data, d.entity, d.timestamp, ctx.spec.spec.training.holdout_fraction)
    train, holdout = data[~mask].reset_index(drop=True), data[mask].reset_index(drop=True)
    if train.empty or holdout.empty:
        raise StageFailed(f"{len(data)} training rows split into {len(train)} train and {len(holdout)} holdout; "
                          "need more data or another holdout_fraction")
    train_path, holdout_path = ctx.artifact_dir / "train.parquet", ctx.artifact_dir / "holdout.parquet"
    train.to_parquet(train_path, index=False)
    holdout.to_parquet(holdout_path, index=False)
    return {
        "train_path": str(train_path),
        "holdout_path": str(holdout_path),
        "rows": len(data),
        "train_rows": len(train),
        "holdout_rows": len(holdout),
        "fingerprint": dataset_fingerprint(data, [d.entity, d.timestamp]),
    }


def remove_pipeline_features(config: PlatformConfig, tenant: str, view_names: list[str]) -> list[str]:
    """Delete only these views of the tenant (and their now unused sources); returns the names removed."""
    from feast.errors import FeatureViewNotFoundException

    with tenant_lock(config, tenant):
        store = feature_store(config, tenant)
        doomed = []
        for name in dict.fromkeys(feast_name(n) for n in view_names):
            try:
                doomed.append(store.get_feature_view(name))
            except FeatureViewNotFoundException:
                continue
        if not doomed:
            return []
        kept = [v for v in store.list_feature_views() if v.name not in {d.name for d in doomed}]
        used = {v.batch_source.name for v in kept}
        sources = {v.batch_source.name: v.batch_source for v in doomed if v.batch_source.name not in used}
        store.apply([], objects_to_delete=[*doomed, *sources.values()], partial=False)
    return [v.name for v in doomed]
