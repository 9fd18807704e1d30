"""Retrain policy: cooldown, daily cap, running retrain, same data; the locked JSON state."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone

from mlplatform.stages.retrain_policy import check_and_record, decide, state_path

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
H = timedelta(hours=1)


def _state(*hours_ago, key=None):
    return {"emits": [{"at": (T0 - h * H).isoformat(), "key": key} for h in hours_ago]}


def test_first_drift_is_allowed():
    d = decide({}, T0, cooldown=6 * H, max_per_day=2, retrain_running=False, data_key="a")
    assert d.emit and d.reason == "allowed"


def test_running_retrain_blocks_before_anything_else():
    d = decide({}, T0, cooldown=6 * H, max_per_day=2, retrain_running=True)
    assert not d.emit and d.reason == "retrain_running"


def test_cooldown_blocks_until_it_ends():
    d = decide(_state(2), T0, cooldown=6 * H, max_per_day=5, retrain_running=False)
    assert not d.emit and d.reason == "cooldown"
    assert d.retry_after == (T0 + 4 * H).isoformat()
    assert decide(_state(6), T0, cooldown=6 * H, max_per_day=5, retrain_running=False).emit


def test_daily_cap_counts_the_last_24_hours():
    d = decide(_state(20, 10), T0, cooldown=H, max_per_day=2, retrain_running=False)
    assert not d.emit and d.reason == "daily_cap" and d.retry_after == (T0 + 4 * H).isoformat()
    assert decide(_state(25, 10), T0, cooldown=H, max_per_day=2, retrain_running=False).emit
    assert decide({}, T0, cooldown=H, max_per_day=0, retrain_running=False).reason == "daily_cap"


def test_same_data_is_not_retrained_twice():
    d = decide(_state(30, key="cur|ref"), T0, cooldown=H, max_per_day=2, retrain_running=False, data_key="cur|ref")
    assert not d.emit and d.reason == "same_data"
    assert decide(_state(30, key="cur|ref"), T0, cooldown=H, max_per_day=2, retrain_running=False,
                  data_key="new|ref").emit


def test_check_and_record_persists_and_emits_once(tmp_path):
    path = state_path(tmp_path, "acme", "churn")
    calls = []
    first = check_and_record(path, T0, cooldown=6 * H, max_per_day=2, retrain_running=False, data_key="k1",
                             run_id="r1", emit_fn=lambda: calls.append(1))
    second = check_and_record(path, T0 + H, cooldown=6 * H, max_per_day=2, retrain_running=False, data_key="k2",
                              run_id="r2", emit_fn=lambda: calls.append(2))
    assert first.emit and not second.emit and second.reason == "cooldown" and calls == [1]
    state = json.loads(path.read_text())
    assert [e["run_id"] for e in state["emits"]] == ["r1"]
    assert state["last_decision"]["reason"] == "cooldown" and state["last_decision"]["run_id"] == "r2"


def test_concurrent_checks_emit_once(tmp_path):
    path = state_path(tmp_path, "acme", "churn")
    emitted = []
    lock = threading.Lock()

    def worker(i):
        def emit():
            with lock:
                emitted.append(i)
        check_and_record(path, T0, cooldown=6 * H, max_per_day=2, retrain_running=False, run_id=str(i), emit_fn=emit)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(emitted) == 1
    assert len(json.loads(path.read_text())["emits"]) == 1
