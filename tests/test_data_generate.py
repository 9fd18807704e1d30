"""The example data: deterministic, the documented schema, a drifted last churn partition, learnable labels."""

from __future__ import annotations

import pandas as pd
import pytest

from mlplatform.config import load_config
from mlplatform.data import generate
from mlplatform.data.partitions import list_partitions

CHURN_COLUMNS = ["customer_id", "event_timestamp", "tenure_months", "contract_months", "monthly_charges",
                 "support_calls", "usage_gb", "late_payments", "churned"]
ACCOUNT_COLUMNS = ["account_id", "event_timestamp", "seats", "monthly_spend", "logins_30d", "tickets_30d",
                   "tenure_months", "upgraded"]


@pytest.fixture(scope="module")
def churn() -> list[pd.DataFrame]:
    return [generate.churn_partition(i, day) for i, day in enumerate(generate.partition_dates())]


@pytest.fixture(scope="module")
def accounts() -> list[pd.DataFrame]:
    return [generate.accounts_partition(i, day) for i, day in enumerate(generate.partition_dates())]


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path))
    monkeypatch.delenv("MLPLATFORM_DATA_ROOT", raising=False)
    return load_config()


def test_partition_dates():
    dates = generate.partition_dates()
    assert dates[0] == "2026-11-01" and dates[-1] == "2026-11-08" and len(dates) == 8


@pytest.mark.parametrize("make", [generate.churn_partition, generate.accounts_partition])
def test_partitions_are_deterministic(make):
    pd.testing.assert_frame_equal(make(3, "2026-11-04"), make(3, "2026-11-04"))
    assert not make(3, "2026-11-04").equals(make(4, "2026-11-05"))


def test_generate_all_writes_skips_and_forces(config):
    assert generate.generate_all(config) == {"acme/churn": sum(len(generate.churn_partition(i, d)) for i, d in
                                                               enumerate(generate.partition_dates())),
                                             "globex/accounts": pytest.approx(12_000, rel=0.05)}
    first = pd.read_parquet(config.data_root / "acme/churn/dt=2026-11-03/part-0.parquet")
    assert generate.generate_all(config) == {"acme/churn": 0, "globex/accounts": 0}
    rows = generate.generate_all(config, force=True)
    assert rows["acme/churn"] > 0 and rows["globex/accounts"] > 0
    pd.testing.assert_frame_equal(first, pd.read_parquet(config.data_root / "acme/churn/dt=2026-11-03/part-0.parquet"))
    parts = list_partitions("acme/churn", config)
    assert [p.date for p in parts] == generate.partition_dates()
    assert all(len(p.files) == 1 and p.files[0].name == "part-0.parquet" for p in parts)


def test_main(config, capsys):
    generate.main([])
    out = capsys.readouterr().out
    assert "acme/churn: " in out and "rows written" in out
    generate.main([])
    assert "already present" in capsys.readouterr().out


def _check_schema(parts: list[pd.DataFrame], columns: list[str], entity: str, label: str, rows: int) -> None:
    for day, df in zip(generate.partition_dates(), parts, strict=True):
        assert list(df.columns) == columns
        assert abs(len(df) - rows) <= 0.05 * rows
        assert str(df["event_timestamp"].dtype).endswith("UTC]")
        assert (df["event_timestamp"].dt.strftime("%Y-%m-%d") == day).all()
        assert df[entity].dtype == "int64" and df[entity].is_unique  # an entity at most once a day
        assert set(df[label].unique()) == {0, 1}
        assert not df.isna().any().any()
        assert all(pd.api.types.is_numeric_dtype(df[c]) for c in columns if c != "event_timestamp")
    first, second = set(parts[0][entity]), set(parts[1][entity])
    assert len(first & second) > rows // 4  # entities recur across days


def test_churn_schema(churn):
    _check_schema(churn, CHURN_COLUMNS, "customer_id", "churned", 2_500)


def test_accounts_schema(accounts):
    _check_schema(accounts, ACCOUNT_COLUMNS, "account_id", "upgraded", 1_500)


def test_last_churn_partition_is_drifted(churn):
    before = pd.concat(churn[:-1])
    last = churn[-1]
    for column in ["monthly_charges", "usage_gb", "support_calls"]:
        assert last[column].mean() > before[column].mean() + 0.4 * before[column].std()
    for day in churn[:-1]:
        assert abs(day["monthly_charges"].mean() - before["monthly_charges"].mean()) < 2.0
    assert abs(last["tenure_months"].mean() - before["tenure_months"].mean()) < 3.0


def test_accounts_are_not_drifted(accounts):
    before = pd.concat(accounts[:-1])
    for column in ["seats", "monthly_spend", "logins_30d", "tenure_months"]:
        assert abs(accounts[-1][column].mean() - before[column].mean()) < 0.15 * before[column].mean()


@pytest.mark.parametrize("source", ["churn", "accounts"])
def test_labels_are_learnable(source, request):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    parts = request.getfixturevalue(source)
    label = "churned" if source == "churn" else "upgraded"
    features = [c for c in parts[0].columns if c not in {"customer_id", "account_id", "event_timestamp", label}]
    train, test = pd.concat(parts[:5]), parts[6]
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(train[features], train[label])
    auc = roc_auc_score(test[label], model.predict_proba(test[features])[:, 1])
    assert 0.75 <= auc <= 0.95
    assert 0.1 < train[label].mean() < 0.4


def test_symlink_into_another_tenants_data_is_refused(config):
    """The spec check is lexical; at run time a link under acme/ that leads to globex's data fails clearly."""
    from mlplatform.stages.context import StageFailed

    generate.generate_all(config)
    allowed = ["acme/", "s3://mlplatform-data/acme/"]
    assert len(list_partitions("acme/churn", config, allowed)) == len(generate.partition_dates())
    (config.data_root / "acme" / "sneaky").symlink_to(config.data_root / "globex" / "accounts")
    with pytest.raises(StageFailed, match="outside the tenant's allowed data prefixes"):
        list_partitions("acme/sneaky", config, allowed)
    part = config.data_root / "acme" / "churn" / "dt=2026-11-03"
    (part / "part-1.parquet").symlink_to(next((config.data_root / "globex" / "accounts").glob("dt=*/*.parquet")))
    with pytest.raises(StageFailed, match="resolves to .*globex"):
        list_partitions("acme/churn", config, allowed)


def test_missing_as_of_partition_names_the_nearest_partitions_and_the_count():
    """Issue 12: not every partition of the source on one line, the neighbours of the asked date."""
    from pathlib import Path

    import pytest

    from mlplatform.data.partitions import Partition, split_partitions
    from mlplatform.stages.context import StageFailed

    parts = [Partition(f"2026-{m:02d}-{d:02d}", (Path("x.parquet"),)) for m in range(1, 13) for d in (1, 15)]
    with pytest.raises(StageFailed) as exc:
        split_partitions(parts, "2026-06-07")
    assert str(exc.value) == (
        "no partition dt=2026-06-07 in the source (nearest before: dt=2026-06-01; nearest after: dt=2026-06-15; "
        "24 partition(s), from dt=2026-01-01 to dt=2026-12-15): trigger with one of its partition dates as as_of, "
        "or leave as_of empty for the newest")
    with pytest.raises(StageFailed, match=r"\(none before it; nearest after: dt=2026-01-01; 24 partition"):
        split_partitions(parts, "2025-01-01")
    with pytest.raises(StageFailed, match=r"nearest before: dt=2026-12-15; none after it;"):
        split_partitions(parts, "2027-01-01")
    assert split_partitions(parts, "2026-06-15")[1].date == "2026-06-15"
