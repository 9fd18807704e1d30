"""Daily partitions of a source folder: ``<source>/dt=YYYY-MM-DD/*.parquet``.

The newest partition (or the one at the run's as-of date) is the *current* data the drift monitor
checks; every partition before it is training data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mlplatform.config import PlatformConfig
from mlplatform.stages.context import StageFailed

_PART_RE = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")


@dataclass(frozen=True)
class Partition:
    date: str
    files: tuple[Path, ...]


def source_dir(source: str, config: PlatformConfig) -> Path:
    if source.startswith("s3://"):
        raise StageFailed(f"{source}: s3:// sources need the S3 data backend, which this platform config does not enable")
    return config.data_root / source


def list_partitions(source: str, config: PlatformConfig) -> list[Partition]:
    root = source_dir(source, config)
    if not root.is_dir():
        raise StageFailed(f"data source {source!r} not found (looked in {root}); run `mlplatform data generate` "
                          "for the example data or check spec.data.source")
    parts = []
    for d in sorted(root.iterdir()):
        m = _PART_RE.match(d.name)
        if m and d.is_dir():
            files = tuple(sorted(d.glob("*.parquet")))
            if files:
                parts.append(Partition(m.group(1), files))
    if not parts:
        files = tuple(sorted(root.glob("*.parquet")))
        if not files:
            raise StageFailed(f"data source {source!r} holds no parquet files")
        parts.append(Partition("all", files))
    return parts


def split_partitions(parts: list[Partition], as_of: str | None) -> tuple[list[Partition], Partition]:
    """(training partitions, current partition) for a run as of ``as_of`` (default: the newest)."""
    if as_of is None:
        current = parts[-1]
    else:
        matches = [p for p in parts if p.date == as_of]
        if not matches:
            dates = ", ".join(p.date for p in parts)
            raise StageFailed(f"no partition dt={as_of} in the source (have: {dates})")
        current = matches[0]
    training = [p for p in parts if p.date < current.date]
    if not training:
        training = [current]
    return training, current
