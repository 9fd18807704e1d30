"""Deterministic example data: ``acme/churn`` (last day drifted) and ``globex/accounts``.

Each source gets eight daily partitions ``<data_root>/<source>/dt=YYYY-MM-DD/part-0.parquet``. Values come
from numpy Generators with fixed seeds, so every rerun writes the same rows.
"""

from __future__ import annotations

import argparse
import os
from datetime import date, timedelta
from pathlib import Path

from mlplatform.config import PlatformConfig, load_config

FIRST_DAY = date(2026, 11, 1)
DAYS = 8
CHURN_SOURCE = "acme/churn"
ACCOUNTS_SOURCE = "globex/accounts"


def partition_dates() -> list[str]:
    """The example partitions' dates (ISO), oldest first."""
    return [(FIRST_DAY + timedelta(days=i)).isoformat() for i in range(DAYS)]


def _sigmoid(x):
    import numpy as np

    return 1.0 / (1.0 + np.exp(-x))


def _day_frame(rng, day: str, ids, rows: int, id_col: str):
    """Sample ``rows`` distinct ids (each at most once a day) with event timestamps inside ``day``."""
    import numpy as np
    import pandas as pd

    picked = np.sort(rng.choice(len(ids), size=rows, replace=False))
    seconds = rng.integers(0, 86_400, size=rows)
    ts = pd.Timestamp(day, tz="UTC") + pd.to_timedelta(seconds, unit="s")
    return picked, pd.DataFrame({id_col: ids[picked].astype("int64"), "event_timestamp": ts})


def churn_partition(index: int, day: str):
    """One day of acme/churn; the last day has shifted charges, usage and support calls."""
    import numpy as np

    base = np.random.default_rng(1101)
    n_customers = 6_000
    ids = np.arange(100_000, 100_000 + n_customers)
    tenure0 = base.integers(1, 72, size=n_customers)
    contract = base.choice([1, 12, 24], size=n_customers, p=[0.5, 0.3, 0.2])
    charges0 = base.normal(70.0, 20.0, size=n_customers).clip(18.0, 150.0)
    usage0 = base.gamma(2.0, 10.0, size=n_customers)

    rng = np.random.default_rng([1101, index])
    rows = 2_500 + int(rng.integers(-100, 101))
    picked, df = _day_frame(rng, day, ids, rows, "customer_id")
    drifted = index == DAYS - 1
    charges = charges0[picked] + rng.normal(0.0, 3.0, rows) + (30.0 if drifted else 0.0)
    usage = usage0[picked] * rng.uniform(0.8, 1.2, rows) * (1.8 if drifted else 1.0)
    calls = rng.poisson(1.0 + (2.0 if drifted else 0.0), rows)
    late = rng.poisson(0.4, rows)
    tenure = tenure0[picked]
    df["tenure_months"] = tenure.astype("int64")
    df["contract_months"] = contract[picked].astype("int64")
    df["monthly_charges"] = charges.round(2)
    df["support_calls"] = calls.astype("int64")
    df["usage_gb"] = usage.round(3)
    df["late_payments"] = late.astype("int64")
    logit = (0.2 - 0.05 * tenure - 0.08 * contract[picked] + 0.035 * (charges0[picked] - 70.0)
             + 0.45 * (calls - 1.0) + 0.8 * late - 0.03 * (usage0[picked] - 20.0))
    df["churned"] = (rng.random(rows) < _sigmoid(logit)).astype("int64")
    return df


def accounts_partition(index: int, day: str):
    """One day of globex/accounts (no drift)."""
    import numpy as np

    base = np.random.default_rng(2202)
    n_accounts = 4_000
    ids = np.arange(500_000, 500_000 + n_accounts)
    seats0 = np.ceil(base.lognormal(2.5, 1.0, size=n_accounts)).clip(1, 500)
    price = base.uniform(8.0, 25.0, size=n_accounts)
    activity = base.gamma(3.0, 1.0, size=n_accounts)
    tenure0 = base.integers(1, 60, size=n_accounts)

    rng = np.random.default_rng([2202, index])
    rows = 1_500 + int(rng.integers(-60, 61))
    picked, df = _day_frame(rng, day, ids, rows, "account_id")
    seats = seats0[picked]
    logins = rng.poisson(seats * activity[picked])
    tickets = rng.poisson(0.5 + 0.05 * np.sqrt(seats))
    df["seats"] = seats.astype("int64")
    df["monthly_spend"] = (seats * price[picked] * rng.uniform(0.95, 1.05, rows)).round(2)
    df["logins_30d"] = logins.astype("int64")
    df["tickets_30d"] = tickets.astype("int64")
    df["tenure_months"] = tenure0[picked].astype("int64")
    logit = (-1.5 + 1.2 * (activity[picked] - 3.0) + 0.4 * np.log(seats) - 0.06 * price[picked]
             + 0.3 * tickets - 0.02 * tenure0[picked])
    df["upgraded"] = (rng.random(rows) < _sigmoid(logit)).astype("int64")
    return df


SOURCES = {CHURN_SOURCE: churn_partition, ACCOUNTS_SOURCE: accounts_partition}


def _present(root: Path) -> bool:
    return any(root.glob("dt=*/*.parquet"))


def _write(df, path: Path) -> None:
    """Write atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)


def generate_source(config: PlatformConfig, source: str) -> int:
    """Write every partition of one example source; returns the rows written."""
    root = config.data_root / source
    total = 0
    for i, day in enumerate(partition_dates()):
        df = SOURCES[source](i, day)
        _write(df, root / f"dt={day}" / "part-0.parquet")
        total += len(df)
    return total


def generate_all(config: PlatformConfig, force: bool = False) -> dict[str, int]:
    """Write the example sources (source -> rows written; 0 for a source already present unless ``force``)."""
    return {
        source: generate_source(config, source) if force or not _present(config.data_root / source) else 0
        for source in SOURCES
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlplatform.data.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rewrite sources that already exist")
    args = parser.parse_args(argv)
    config = load_config()
    for source, rows in generate_all(config, force=args.force).items():
        state = f"{rows} rows written" if rows else "already present (use --force to rewrite)"
        print(f"{config.data_root / source}: {state}")


if __name__ == "__main__":
    main()
