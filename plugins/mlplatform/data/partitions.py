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


def _confined(path: Path, roots: list[Path], source: str) -> Path:
    """``path`` when, symlinks resolved, it stays inside one of ``roots``; else a StageFailed (the spec
    check is lexical, so a link under the tenant's prefix must not lead into another tenant's data)."""
    real = path.resolve()
    if not any(real == root or real.is_relative_to(root) for root in roots):
        raise StageFailed(f"data source {source!r}: {path} resolves to {real}, outside the tenant's allowed "
                          "data prefixes (a symbolic link?); ask the platform team to fix the data layout")
    return path


def list_partitions(source: str, config: PlatformConfig, allowed_prefixes: list[str] | None = None) -> list[Partition]:
    """The source's partitions; with ``allowed_prefixes`` (the tenant's) every folder and file must resolve
    inside them."""
    root = source_dir(source, config)
    if not root.is_dir():
        raise StageFailed(f"data source {source!r} not found (looked in {root}); run `mlplatform data generate` "
                          "for the example data or check spec.data.source")
    roots = [(config.data_root / p.strip("/")).resolve() for p in allowed_prefixes or [] if not p.startswith("s3://")]

    def check(path: Path) -> Path:
        return _confined(path, roots, source) if allowed_prefixes is not None else path

    check(root)
    parts = []
    for d in sorted(root.iterdir()):
        m = _PART_RE.match(d.name)
        if m and d.is_dir():
            files = tuple(check(f) for f in sorted(check(d).glob("*.parquet")))
            if files:
                parts.append(Partition(m.group(1), files))
    if not parts:
        files = tuple(check(f) for f in sorted(root.glob("*.parquet")))
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
            raise StageFailed(missing_partition_message(parts, as_of))
        current = matches[0]
    training = [p for p in parts if p.date < current.date]
    if not training:
        training = [current]
    return training, current


def missing_partition_message(parts: list[Partition], as_of: str) -> str:
    """Why ``as_of`` has no partition: the nearest partitions before and after it and how many there are (a
    source with years of daily partitions would otherwise print them all on one line)."""
    dates = sorted(p.date for p in parts)
    before = [d for d in dates if d < as_of]
    after = [d for d in dates if d > as_of]
    near = [f"nearest before: dt={before[-1]}" if before else "none before it",
            f"nearest after: dt={after[0]}" if after else "none after it"]
    span = f", from dt={dates[0]} to dt={dates[-1]}" if dates else ""
    return (f"no partition dt={as_of} in the source ({'; '.join(near)}; {len(dates)} partition(s){span}): "
            "trigger with one of its partition dates as as_of, or leave as_of empty for the newest")
