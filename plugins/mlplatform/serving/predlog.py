"""Prediction logs: one entry per request (request id, time, variant, model version, inputs, outputs, latency).

``JsonlLog`` appends to ``<dir>/<tenant>.<pipeline>.jsonl`` (the embedded default). ``PostgresLog`` writes to
table ``mlplatform_predictions`` from a background thread in batches, so a request never waits on the
database; entries are dropped (and counted) only when the queue of unwritten entries is full.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path
from typing import Any, Protocol, TextIO

log = logging.getLogger(__name__)

TABLE = "mlplatform_predictions"
DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    request_id   text PRIMARY KEY,
    time         timestamptz NOT NULL,
    model        text NOT NULL,
    variant      text NOT NULL,
    model_version text NOT NULL,
    n_instances  integer NOT NULL,
    inputs       jsonb,
    outputs      jsonb,
    latency_ms   double precision NOT NULL,
    status       text NOT NULL,
    error        text
);
CREATE INDEX IF NOT EXISTS {TABLE}_model_time ON {TABLE} (model, time);
"""
COLUMNS = ("request_id", "time", "model", "variant", "model_version", "n_instances", "inputs", "outputs",
           "latency_ms", "status", "error")


class PredictionLog(Protocol):
    def write(self, name: str, entry: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlLog:
    """Line-buffered JSONL file per model under ``log_dir``."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, TextIO] = {}
        self._lock = threading.Lock()

    def write(self, name: str, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, default=str) + "\n"
        with self._lock:
            handle = self._files.get(name)
            if handle is None:
                handle = self._files[name] = (self.log_dir / f"{name}.jsonl").open("a", buffering=1, encoding="utf-8")
            handle.write(line)

    def close(self) -> None:
        with self._lock:
            for handle in self._files.values():
                handle.close()
            self._files.clear()


class PostgresLog:
    """Batched inserts into PostgreSQL (``postgresql://user:pass@host:port/db``) with psycopg 3."""

    def __init__(self, url: str, batch_size: int = 500, flush_seconds: float = 0.2, max_queue: int = 100_000):
        import psycopg

        self.url = url
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.dropped = 0
        self.written = 0
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._stop = threading.Event()
        _ensure_database(url)
        with psycopg.connect(url, autocommit=True) as conn:  # fail fast on a wrong URL
            conn.execute(DDL)
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def write(self, name: str, entry: dict[str, Any]) -> None:
        row = (
            entry["request_id"], entry["time"], name, entry["variant"], str(entry["model_version"]),
            entry.get("n_instances", 0), _json(entry.get("inputs")), _json(entry.get("outputs")),
            entry["latency_ms"], entry["status"], entry.get("error"),
        )
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self.dropped += 1

    def _drain(self, first_wait: float) -> list[tuple]:
        rows = []
        try:
            rows.append(self._queue.get(timeout=first_wait))
            while len(rows) < self.batch_size:
                rows.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return rows

    def _run(self) -> None:
        import psycopg

        conn = None
        pending: list[tuple] = []
        sql = (f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))}) "
               "ON CONFLICT (request_id) DO NOTHING")
        while True:
            stopping = self._stop.is_set()
            pending += self._drain(0.0 if stopping else self.flush_seconds)
            if pending:
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(self.url, autocommit=True)
                    with conn.cursor() as cur:
                        cur.executemany(sql, pending)
                    self.written += len(pending)
                    pending = []
                except Exception:  # noqa: BLE001 - keep serving; retry the batch on the next round
                    log.exception("prediction log: could not write %d entries, retrying", len(pending))
                    conn = None
                    if stopping:
                        break
                    self._stop.wait(1.0)
            elif stopping:
                break
        if conn is not None:
            conn.close()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued entry is written (tests, shutdown)."""
        import time

        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(self.flush_seconds + 0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def _ensure_database(url: str) -> None:
    """Create the log's database when it does not exist yet (the compose stack names one per purpose)."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        psycopg.connect(url, connect_timeout=10).close()
        return
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise
    params = conninfo_to_dict(url)
    name = params.get("dbname")
    with psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True, connect_timeout=10) as conn:
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            log.info("created prediction-log database %s", name)
        except psycopg.errors.DuplicateDatabase:
            pass


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str)


def open_log(url_or_dir: str | Path) -> PredictionLog:
    """``postgresql://...`` -> PostgresLog; anything else is a local folder for JSONL files."""
    text = str(url_or_dir)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresLog(text)
    return JsonlLog(text)


def default_location(home: str | Path) -> str:
    """Where the standalone gateway logs: ``MLPLATFORM_PREDICTION_LOG_URL``, else ``<home>/gateway/predictions``."""
    import os

    return os.environ.get("MLPLATFORM_PREDICTION_LOG_URL", "").strip() or str(Path(home) / "gateway" / "predictions")


def read_window(url_or_dir: str | Path, name: str, since, until) -> list[dict[str, Any]]:
    """Successful entries of model ``name`` logged in ``[since, until)`` (aware datetimes), oldest first.

    Each entry has ``time``, ``variant``, ``model_version``, ``inputs`` (list of row dicts) and ``outputs``.
    A missing log (no gateway, or no request yet) is an empty window.
    """
    from datetime import datetime

    text = str(url_or_dir)
    if text.startswith(("postgresql://", "postgres://")):
        import psycopg
        from psycopg.rows import dict_row

        try:
            with psycopg.connect(text, connect_timeout=10, row_factory=dict_row) as conn:
                rows = conn.execute(
                    f"SELECT time, variant, model_version, inputs, outputs FROM {TABLE} WHERE model = %s "
                    "AND status = 'ok' AND time >= %s AND time < %s ORDER BY time", (name, since, until)).fetchall()
        except psycopg.errors.UndefinedTable:
            return []
        return [dict(r, time=r["time"].isoformat()) for r in rows]
    path = Path(text) / f"{name}.jsonl"
    if not path.is_file():
        return []
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
                at = datetime.fromisoformat(entry["time"])
            except (ValueError, KeyError):
                continue  # a torn last line while the gateway writes
            if entry.get("status") == "ok" and since <= at < until:
                out.append(entry)
    return out
