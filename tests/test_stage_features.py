"""The feature stage against real Feast (duckdb offline store; SQLite and, when reachable, Redis online)."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest

from mlplatform.config import load_config
from mlplatform.data import generate
from mlplatform.data.partitions import list_partitions, split_partitions
from mlplatform.spec.model import PipelineSpec, TenantFile
from mlplatform.stages.context import RunContext, StageFailed
from mlplatform.stages.features import build_features, feature_store, remove_pipeline_features

pytestmark = pytest.mark.filterwarnings("ignore:fetch_arrow_table:DeprecationWarning")

ENTITY, TS, LABEL = "customer_id", "event_timestamp", "churned"
FEATURES = ["tenure_months", "contract_months", "monthly_charges", "support_calls", "usage_gb", "late_payments"]
VIEWS = [
    {"name": "customer-profile", "features": FEATURES[:3], "ttl": "30d"},
    {"name": "customer-activity", "features": FEATURES[3:], "ttl": "7d"},
]
DAYS = generate.partition_dates()[:4]


def write_source(config, source: str, charges_offset: float = 0.0) -> pd.DataFrame:
    """Four small daily partitions of the churn example (customers recur across days)."""
    frames = []
    for i, day in enumerate(DAYS):
        df = generate.churn_partition(i, day)
        df = df[df[ENTITY] < 100_500].reset_index(drop=True)
        df["monthly_charges"] += charges_offset
        path = config.data_root / source / f"dt={day}" / "part-0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(path, index=False)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def make_ctx(config, tenant="acme", name="churn", views=VIEWS, run_id="manual__1", as_of=None, holdout=0.25):
    spec = PipelineSpec.model_validate({
        "apiVersion": "mlplatform.io/v1",
        "kind": "Pipeline",
        "metadata": {"name": name, "tenant": tenant},
        "spec": {
            "data": {"source": f"{tenant}/churn", "entity": ENTITY, "timestamp": TS, "label": LABEL},
            "features": {"views": views},
            "training": {"holdout_fraction": holdout},
        },
    })
    tenant_file = TenantFile.model_validate({
        "apiVersion": "mlplatform.io/v1",
        "kind": "Tenant",
        "metadata": {"name": tenant},
        "spec": {"owner": "team@example.com", "namespace": f"ml-{tenant}", "quotas": {"gpu_slots": 0, "cpu_slots": 2},
                 "data": {"allowed_prefixes": [f"{tenant}/"]}},
    })
    return RunContext(spec=spec, tenant=tenant_file, config=config, run_id=run_id, as_of=as_of)


def run(ctx: RunContext) -> dict:
    training, current = split_partitions(list_partitions(ctx.spec.spec.data.source, ctx.config), ctx.as_of)
    return build_features(ctx, [f for p in training for f in p.files], list(current.files))


def online(config, tenant: str, refs: list[str], ids: list[int]) -> pd.DataFrame:
    rows = [{ENTITY: i} for i in ids]
    return feature_store(config, tenant).get_online_features(features=refs, entity_rows=rows).to_df()


def latest(source: pd.DataFrame, ids: list[int]) -> pd.DataFrame:
    last = source.sort_values(TS).groupby(ENTITY).tail(1).set_index(ENTITY)
    return last.loc[ids, FEATURES].reset_index()


REFS = [f"customer_profile:{f}" for f in FEATURES[:3]] + [f"customer_activity:{f}" for f in FEATURES[3:]]


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path))
    for name in ("MLPLATFORM_DATA_ROOT", "MLPLATFORM_ARTIFACT_ROOT", "MLPLATFORM_FEAST_ONLINE_STORE",
                 "MLPLATFORM_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    return load_config()


@pytest.fixture
def source(config) -> pd.DataFrame:
    return write_source(config, "acme/churn")


def test_training_set_is_exact_and_point_in_time(config, source):
    out = run(make_ctx(config))
    training = source[source[TS] < pd.Timestamp(DAYS[-1], tz="UTC")]
    train, holdout = pd.read_parquet(out["train_path"]), pd.read_parquet(out["holdout_path"])

    assert out["rows"] == len(training) == out["train_rows"] + out["holdout_rows"]
    assert (len(train), len(holdout)) == (out["train_rows"], out["holdout_rows"])
    assert 0.15 < len(holdout) / len(training) < 0.35
    assert list(train.columns) == [ENTITY, TS, LABEL, *FEATURES] == list(holdout.columns)
    assert out["feature_columns"] == FEATURES
    assert out["feature_views"] == ["customer_profile", "customer_activity"]
    assert out["feast_project"] == "acme"
    assert out["fingerprint"].startswith("sha256:") and len(out["fingerprint"]) == 71
    assert (Path(out["train_path"]).parent / "source.parquet").exists()

    keys = [ENTITY, TS]
    assert not set(map(tuple, train[keys].values)) & set(map(tuple, holdout[keys].values))  # no leakage
    both = pd.concat([train, holdout])
    assert not both.duplicated(keys).any()
    joined = both.merge(training, on=keys, suffixes=("", "_src"), validate="one_to_one")
    assert len(joined) == len(training)  # every input row once, none from the current partition
    for column in [LABEL, *FEATURES]:
        assert (joined[column] == joined[f"{column}_src"]).all(), column
    assert training[ENTITY].duplicated().any()  # recurring customers: a point-in-time join was needed


def test_rerun_is_deterministic(config, source):
    first = run(make_ctx(config, run_id="manual__1"))
    second = run(make_ctx(config, run_id="manual__2"))
    assert first["train_path"] != second["train_path"]
    assert first["fingerprint"] == second["fingerprint"]
    pd.testing.assert_frame_equal(pd.read_parquet(first["holdout_path"]), pd.read_parquet(second["holdout_path"]))


def test_online_store_has_latest_values(config, source):
    out = run(make_ctx(config))
    assert out["online_check"] == 5
    ids = sorted(source[ENTITY].unique())[:20]
    got = online(config, "acme", REFS, ids)
    pd.testing.assert_frame_equal(got[[ENTITY, *FEATURES]], latest(source, ids), check_dtype=False)


def test_backfill_does_not_roll_online_store_back(config, source):
    run(make_ctx(config))
    backfill = run(make_ctx(config, run_id="backfill__1", as_of=DAYS[1]))
    assert backfill["rows"] == (source[TS] < pd.Timestamp(DAYS[1], tz="UTC")).sum()
    assert "materialize" not in backfill["timings"]
    ids = sorted(source[ENTITY].unique())[:20]
    pd.testing.assert_frame_equal(online(config, "acme", REFS, ids)[[ENTITY, *FEATURES]], latest(source, ids),
                                  check_dtype=False)


def test_default_view_holds_every_feature(config, source):
    out = run(make_ctx(config, name="churn-baseline", views=[]))
    assert out["feature_views"] == ["churn_baseline"]
    assert out["feature_columns"] == FEATURES
    assert out["online_check"] == 5


def test_tenants_with_same_view_names_do_not_clobber(config, source):
    other = write_source(config, "globex/churn", charges_offset=1000.0)
    run(make_ctx(config, tenant="acme"))
    run(make_ctx(config, tenant="globex"))
    ids = sorted(set(source[ENTITY]) & set(other[ENTITY]))[:10]
    for tenant, data in (("acme", source), ("globex", other)):
        got = online(config, tenant, REFS, ids)
        pd.testing.assert_frame_equal(got[[ENTITY, *FEATURES]], latest(data, ids), check_dtype=False)
        views = feature_store(config, tenant).list_feature_views()
        assert {v.name for v in views} == {"customer_profile", "customer_activity"}
        assert all(f"/{tenant}/churn/" in v.batch_source.path for v in views)
    assert (config.feast_root / "acme" / "registry.db").exists()
    assert (config.feast_root / "globex" / "online.db").exists()


def test_pipelines_of_a_tenant_keep_each_others_views(config, source):
    run(make_ctx(config, name="churn"))
    run(make_ctx(config, name="churn-baseline", views=[]))
    store = feature_store(config, "acme")
    assert {v.name for v in store.list_feature_views()} == {"customer_profile", "customer_activity", "churn_baseline"}

    assert remove_pipeline_features(config, "acme", ["churn-baseline", "no-such-view"]) == ["churn_baseline"]
    store = feature_store(config, "acme")
    assert {v.name for v in store.list_feature_views()} == {"customer_profile", "customer_activity"}
    assert {s.name for s in store.list_data_sources()} == {"churn_source"}
    assert online(config, "acme", REFS, [int(source[ENTITY].iloc[0])])[FEATURES].notna().all(axis=None)
    assert remove_pipeline_features(config, "acme", ["churn-baseline"]) == []


def test_view_owned_by_another_pipeline_is_refused(config, source):
    run(make_ctx(config, name="churn"))
    with pytest.raises(StageFailed, match="belongs to pipeline 'churn'"):
        run(make_ctx(config, name="churn-copy"))


@pytest.mark.parametrize(
    ("views", "message"),
    [
        ([{"name": "bad", "features": ["no_such_column"]}], "not in the source"),
        ([{"name": "leaky", "features": ["churned", "usage_gb"]}], "not a feature"),
        ([{"name": "one", "features": ["usage_gb"]}, {"name": "two", "features": ["usage_gb"]}], "more than one"),
    ],
)
def test_bad_views_fail_before_touching_feast(config, source, views, message):
    with pytest.raises(StageFailed, match=message):
        run(make_ctx(config, views=views))
    assert not (config.feast_root / "acme" / "registry.db").exists()


@pytest.mark.parametrize("column", ['x"; DROP TABLE t; --', "{{ conn.secret }}", "a b", "1st", "é", "x" * 65])
def test_hostile_column_names_in_the_data_are_refused(config, source, column):
    """Column names are data, not linted spec text: one that is no plain identifier never reaches Feast's SQL."""
    for day in DAYS:
        path = config.data_root / "acme/churn" / f"dt={day}" / "part-0.parquet"
        pd.read_parquet(path).assign(**{column: 1.0}).to_parquet(path, index=False)
    with pytest.raises(StageFailed, match="cannot be features: a feature name must be letters") as err:
        run(make_ctx(config, views=[]))
    assert column[:40] in str(err.value) or repr(column[:40]) in str(err.value)
    assert not (config.feast_root / "acme" / "registry.db").exists()


def test_partition_missing_a_column_fails(config, source):
    path = config.data_root / "acme/churn" / f"dt={DAYS[1]}" / "part-0.parquet"
    pd.read_parquet(path).drop(columns=["usage_gb"]).to_parquet(path, index=False)
    with pytest.raises(StageFailed, match="has no column usage_gb"):
        run(make_ctx(config))


def test_modules_import_no_data_library():
    code = ("import sys, mlplatform.stages.features, mlplatform.data.generate; "
            "print(sorted({'feast', 'pandas', 'numpy', 'pyarrow'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------- Redis


def redis_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not redis_up(), reason="no Redis at 127.0.0.1:6379")
def test_redis_online_store(config, monkeypatch):
    import redis

    db = 11
    tenant = f"rt-{uuid.uuid4().hex[:8]}"  # a project of its own: keys end in the project name
    project = tenant.replace("-", "_").encode()
    monkeypatch.setenv("MLPLATFORM_FEAST_ONLINE_STORE", "redis")
    monkeypatch.setenv("MLPLATFORM_REDIS_URL", f"127.0.0.1:6379,db={db}")
    config = load_config()
    data = write_source(config, f"{tenant}/churn")
    client = redis.Redis(host="127.0.0.1", port=6379, db=db)
    try:
        out = run(make_ctx(config, tenant=tenant))
        assert out["online_check"] == 5
        ids = sorted(data[ENTITY].unique())[:20]
        pd.testing.assert_frame_equal(online(config, tenant, REFS, ids)[[ENTITY, *FEATURES]], latest(data, ids),
                                      check_dtype=False)
        assert any(client.scan_iter(b"*" + project))
        remove_pipeline_features(config, tenant, ["customer-profile", "customer-activity"])
        assert not any(client.scan_iter(b"*" + project))
    finally:
        for key in client.scan_iter(b"*" + project):
            client.delete(key)
        client.close()
