"""When may drift start a retrain? Cooldown, a cap per 24 hours, no second retrain while one runs.

The monitor asks before it emits the drift Asset event; a "no" emits nothing, so the training DAG never
sees the event. The state is a small JSON file per pipeline in the artifact store,
``<artifact_root>/<tenant>/<pipeline>/_monitor/retrain_policy.json``, read and written under a file lock
so two monitor runs cannot both pass the check. Checks, in order:

1. ``retrain_running``: the training DAG has a queued or running run (scheduled, manual or drift-triggered).
2. ``cooldown``: the last drift-triggered retrain was requested less than ``monitoring.cooldown`` ago.
3. ``daily_cap``: ``monitoring.max_retrains_per_day`` retrains were already requested in the last 24 hours.
4. ``same_data``: a retrain was already requested for this very current data against this very reference
   (retraining again on unchanged data cannot remove the drift).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

DAY = timedelta(hours=24)
KEEP = 100  # emits remembered


@dataclass(frozen=True)
class Decision:
    emit: bool
    reason: str  # "allowed" | "retrain_running" | "cooldown" | "daily_cap" | "same_data"
    message: str
    retry_after: str | None = None  # ISO time after which the cooldown or cap no longer blocks

    def as_dict(self) -> dict:
        return {"emit": self.emit, "reason": self.reason, "message": self.message, "retry_after": self.retry_after}


def _parse(ts: str) -> datetime:
    value = datetime.fromisoformat(ts)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def decide(state: dict, now: datetime, *, cooldown: timedelta, max_per_day: int, retrain_running: bool,
           data_key: str | None = None) -> Decision:
    """Pure decision from the recorded emits (``state["emits"]``: list of ``{"at": iso, "key": ...}``)."""
    emits = sorted(state.get("emits", []), key=lambda e: e["at"])
    if retrain_running:
        return Decision(False, "retrain_running", "a training run is already queued or running; its result is "
                        "awaited instead of queueing a second retrain")
    if emits:
        last = _parse(emits[-1]["at"])
        if now - last < cooldown:
            until = last + cooldown
            return Decision(False, "cooldown", f"last drift-triggered retrain requested at {last.isoformat()}, "
                            f"cooldown {cooldown} runs until {until.isoformat()}", until.isoformat())
    recent = [_parse(e["at"]) for e in emits if now - _parse(e["at"]) < DAY]
    if len(recent) >= max_per_day:
        until = (min(recent) + DAY).isoformat() if recent else None
        return Decision(False, "daily_cap", f"{len(recent)} drift-triggered retrain(s) in the last 24h reach the "
                        f"cap of {max_per_day} per day", until)
    if data_key is not None and any(e.get("key") == data_key for e in emits):
        return Decision(False, "same_data", "a retrain was already requested for this current data against this "
                        "reference; it cannot remove the drift again")
    return Decision(True, "allowed", "retrain requested")


def state_path(artifact_root: str | Path, tenant: str, pipeline: str) -> Path:
    return Path(artifact_root) / tenant / pipeline / "_monitor" / "retrain_policy.json"


@contextmanager
def locked_state(path: Path) -> Iterator[dict]:
    """The policy state under an exclusive lock; changes to the yielded dict are written back atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = json.loads(path.read_text()) if path.exists() else {}
            state.setdefault("emits", [])
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
                tmp.replace(path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_and_record(path: Path, now: datetime, *, cooldown: timedelta, max_per_day: int, retrain_running: bool,
                     data_key: str | None = None, run_id: str = "", emit_fn=None) -> Decision:
    """Decide under the lock; when allowed, call ``emit_fn()`` (if given) and record the emit."""
    with locked_state(path) as state:
        decision = decide(state, now, cooldown=cooldown, max_per_day=max_per_day, retrain_running=retrain_running,
                          data_key=data_key)
        if decision.emit:
            if emit_fn is not None:
                emit_fn()
            state["emits"] = (state["emits"] + [{"at": now.isoformat(), "key": data_key, "run_id": run_id}])[-KEEP:]
        state["last_decision"] = {"at": now.isoformat(), "run_id": run_id, **decision.as_dict()}
    return decision
