"""The canary state machine: ``pending -> step(i) baking -> promoted | rolled_back | aborted``.

State lives in MLflow, next to what it governs, so any worker (or a re-run after a crash) resumes it:

- ``mlplatform.canary_state`` (tag on the challenger's model version): JSON ``{state, step, steps, champion,
  run_id, passed, baseline_p99_ms, reason}``. ``step`` is the index of the step baking or next to bake: a
  re-run after a crash starts at the recorded step and never replays earlier traffic shifts.
- ``mlplatform.canary_share`` (tag on the registered model): the challenger's current traffic share; the
  standalone gateway routes from it and from the ``champion`` / ``challenger`` aliases.
- ``mlplatform.audit.NNNN`` (tags on the model version): one JSON audit event per transition (who, when,
  from/to state and version, traffic share, gate figures, reason); every event is also logged.

Promotion order (state ``promoting`` first, then ``previous``, then ``champion``, then the challenger
alias) makes every crash point resumable; aliases are single-valued, so there is never a second champion.
An unreachable MLflow raises out of here and the task retries; nothing is half-recorded as a decision.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

STATE_TAG = "mlplatform.canary_state"
SHARE_TAG = "mlplatform.canary_share"
AUDIT_PREFIX = "mlplatform.audit."
# Decision tags read by the earlier single-step canary (kept for compatibility).
CANARY_TAG = "mlplatform.canary"
GATES_TAG = "mlplatform.canary_gates"
REASON_TAG = "mlplatform.canary_reason"
RUN_TAG = "mlplatform.dag_run_id"

PENDING, BAKING, HELD, PROMOTING = "pending", "baking", "held", "promoting"
PROMOTED, ROLLED_BACK, ABORTED = "promoted", "rolled_back", "aborted"
TERMINAL = frozenset({PROMOTED, ROLLED_BACK, ABORTED})
ACTIONS = ("promote_now", "abort", "rollback_to_previous")
TAG_LIMIT = 5000  # MLflow's model-version tag value limit


class CanaryHeld(Exception):
    """A gate failed with auto_rollback off: traffic is held at the step for a person to decide."""


class Traffic(Protocol):
    """Where the canary's traffic runs: the embedded gateway with replayed rows, or KServe."""

    url: str | None

    def bake(self, share: float, seconds: int) -> tuple[dict[str, dict[str, Any]], float]: ...

    def set_share(self, share: float) -> None: ...

    def close(self) -> None: ...


@dataclass
class CanaryState:
    state: str
    step: int
    steps: list[float]
    champion: str | None
    run_id: str = ""
    passed: list[dict[str, Any]] = field(default_factory=list)
    baseline_p99_ms: float | None = None
    reason: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        text = json.dumps(data, sort_keys=True)
        while len(text) > TAG_LIMIT and data["passed"]:  # keep the tag under MLflow's limit
            data["passed"] = data["passed"][1:]
            text = json.dumps(data, sort_keys=True)
        return text

    @classmethod
    def from_json(cls, text: str) -> CanaryState:
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


# ------------------------------------------------------------------------------------------------ gates


def ks_statistic(a: list[float], b: list[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (max distance between the empirical CDFs)."""
    a, b = sorted(a), sorted(b)
    i = j = 0
    d = 0.0
    while i < len(a) and j < len(b):
        x = min(a[i], b[j])
        while i < len(a) and a[i] <= x:
            i += 1
        while j < len(b) and b[j] <= x:
            j += 1
        d = max(d, abs(i / len(a) - j / len(b)))
    return d


MIN_SHIFT_SAMPLES = 20


def check_gates(stats: dict[str, Any], gates: Any, champion: dict[str, Any] | None = None,
                baseline_p99_ms: float | None = None) -> dict[str, Any]:
    """The challenger's gate verdict from its gateway stats, relative gates against the champion's."""
    failed, skipped = [], []
    if stats["requests"] < gates.min_requests:
        failed.append(f"requests {stats['requests']} < min_requests {gates.min_requests}")
    if stats["error_rate"] > gates.max_error_rate:
        failed.append(f"error_rate {stats['error_rate']:.4f} > max_error_rate {gates.max_error_rate}")
    p99 = stats.get("p99_ms")
    if p99 is not None and p99 > gates.max_p99_latency_ms:
        failed.append(f"p99 {p99:.1f}ms > max_p99_latency_ms {gates.max_p99_latency_ms}")
    champ_p99 = (champion or {}).get("p99_ms") or baseline_p99_ms
    ratio = None
    if p99 is not None and champ_p99:
        ratio = round(p99 / champ_p99, 3)
    if getattr(gates, "max_p99_latency_ratio", None) is not None:
        if ratio is None:
            skipped.append("p99_ratio: no champion latency to compare with")
        elif ratio > gates.max_p99_latency_ratio:
            failed.append(f"p99_ratio {ratio:.2f} > max_p99_latency_ratio {gates.max_p99_latency_ratio} "
                          f"(champion p99 {champ_p99:.1f}ms)")
    shift = None
    ours, theirs = stats.get("predictions") or [], (champion or {}).get("predictions") or []
    if len(ours) >= MIN_SHIFT_SAMPLES and len(theirs) >= MIN_SHIFT_SAMPLES:
        shift = round(ks_statistic(ours, theirs), 4)
    if getattr(gates, "max_prediction_shift", None) is not None:
        if shift is None:
            skipped.append("prediction_shift: too few predictions of both variants")
        elif shift > gates.max_prediction_shift:
            failed.append(f"prediction_shift {shift:.3f} > max_prediction_shift {gates.max_prediction_shift}")
    return {
        "requests": stats["requests"], "errors": stats["errors"], "error_rate": stats["error_rate"],
        "p99_ms": p99, "champion_p99_ms": champ_p99, "p99_ratio": ratio, "prediction_shift": shift,
        "passed": not failed, "failed": failed, "skipped": skipped,
    }


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _public(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """Stats without the raw prediction sample (for results, tags and logs)."""
    return None if stats is None else {k: _finite(v) for k, v in stats.items() if k != "predictions"}


# ---------------------------------------------------------------------------------------------- machine


class CanaryMachine:
    """One model version's canary, driven by the deploy stage or by a person through the control DAG."""

    def __init__(self, client: Any, name: str, version: str, *, actor: str, run_id: str = "",
                 audit_file: Path | None = None):
        self.client = client
        self.name = name
        self.version = str(version)
        self.actor = actor
        self.run_id = run_id
        self.audit_file = audit_file

    # -- registry reads and writes
    def aliases(self) -> dict[str, str]:
        return {a: str(v) for a, v in self.client.get_registered_model(self.name).aliases.items()}

    def tags(self, version: str | None = None) -> dict[str, str]:
        return dict(self.client.get_model_version(self.name, version or self.version).tags)

    def load(self) -> CanaryState | None:
        text = self.tags().get(STATE_TAG)
        return CanaryState.from_json(text) if text else None

    def save(self, st: CanaryState) -> None:
        self.client.set_model_version_tag(self.name, self.version, STATE_TAG, st.to_json())

    def set_share(self, share: float) -> None:
        self.client.set_registered_model_tag(self.name, SHARE_TAG, f"{share:g}")

    def event(self, action: str, from_state: str | None, to_state: str, *, version: str | None = None,
              **fields: Any) -> dict[str, Any]:
        """Record one audit event as a model-version tag, in the run's audit file and in the task log."""
        version = str(version or self.version)
        tags = self.tags(version)
        seq = 1 + max([int(k[len(AUDIT_PREFIX):]) for k in tags if k.startswith(AUDIT_PREFIX)
                       and k[len(AUDIT_PREFIX):].isdigit()] or [0])
        event = {
            "seq": seq, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "actor": self.actor,
            "action": action, "model": self.name, "version": version, "from_state": from_state,
            "to_state": to_state, "run_id": self.run_id, **{k: v for k, v in fields.items() if v is not None},
        }
        text = json.dumps(event, sort_keys=True, default=str)
        if len(text) > TAG_LIMIT:
            event.pop("gates", None)
            event["truncated"] = True
            text = json.dumps(event, sort_keys=True, default=str)
        self.client.set_model_version_tag(self.name, version, f"{AUDIT_PREFIX}{seq:04d}", text)
        if self.audit_file is not None:
            with self.audit_file.open("a", encoding="utf-8") as fh:
                fh.write(text + "\n")
        log.info("canary audit: %s", text)
        return event

    def audit_events(self, version: str | None = None) -> list[dict[str, Any]]:
        tags = self.tags(version)
        keys = sorted(k for k in tags if k.startswith(AUDIT_PREFIX))
        return [json.loads(tags[k]) for k in keys]

    def record_decision(self, decision: str, gates: dict[str, Any] | None) -> None:
        """The compatibility decision tags, written before any alias moves (a retry reads them back)."""
        tags = {CANARY_TAG: decision, RUN_TAG: self.run_id}
        if gates is not None:
            tags[GATES_TAG] = json.dumps(gates)[:TAG_LIMIT]
            if gates.get("failed"):
                tags[REASON_TAG] = "; ".join(gates["failed"])[:4000]
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, self.version, key, value)

    # -- the deploy stage's run
    def start(self, champion: str | None, steps: list[float]) -> CanaryState:
        """The recorded state, or a new ``pending`` canary against ``champion``."""
        st = self.load()
        if st is not None:
            return st
        st = CanaryState(PENDING, 0, list(steps), champion, self.run_id)
        self.client.set_registered_model_alias(self.name, "challenger", self.version)
        self.save(st)
        self.event("start", None, PENDING, champion=champion, challenger=self.version, steps=steps)
        return st

    def run(self, deployment: Any, champion: str | None, traffic: Traffic, bake_seconds: int,
            after_step: Callable[[int, CanaryState], None] | None = None) -> dict[str, Any]:
        """Drive the canary from its recorded state to a decision, baking each step on ``traffic`` in this
        process (the blocking form of ``begin_step`` / ``finish_step``); returns the deploy stage's result."""
        champion_stats, total_baked = None, 0.0
        kind, value = self.begin_step(deployment, champion)
        if kind == "bake" and value[0] > 0:
            log.info("resuming the canary of %s v%s at step %d (share %.0f%%) from its recorded state",
                     self.name, self.version, value[0] + 1, 100 * value[1])
        while kind == "bake":
            i, share = value
            traffic.set_share(share)
            stats, baked = traffic.bake(share, bake_seconds)
            total_baked += baked
            champion_stats = stats.get("champion")
            kind, value = self.finish_step(deployment, stats, baked)  # may raise CanaryHeld
            if kind == "next":
                if after_step is not None:
                    after_step(i, self.load())
                kind, value = self.begin_step(deployment, champion)
        if value.get("state") not in (PROMOTED, PROMOTING):  # rolled back, or aborted by a person mid-bake
            traffic.set_share(0.0)
        elif hasattr(traffic, "promoted"):
            traffic.promoted()
        return {**value, "champion_stats": _public(champion_stats), "bake_seconds": round(total_baked, 2),
                "gateway_url": traffic.url}

    # -- the deferrable form: one step per task resumption (the bake waits in a trigger, not a worker slot)
    def begin_step(self, deployment: Any, champion: str | None) -> tuple[str, Any]:
        """Move traffic to the recorded step: ``("bake", (step index, share))`` or ``("done", result)``."""
        st = self.start(champion, deployment.traffic_steps)
        if st.state in TERMINAL:
            return "done", self.result(st)
        if st.state == PROMOTING or st.step >= len(st.steps):
            return "done", self.promote(st, "promoted", last_gates(st))
        if st.state == HELD:
            raise CanaryHeld(f"{self.name} v{self.version} is held at step {st.step + 1}: {st.reason} "
                             "(promote or abort it from the control DAG)")
        i, share = st.step, st.steps[st.step]
        self.set_share(share)
        previous = st.state
        st.state = BAKING
        self.save(st)
        self.event("step_started", previous, BAKING, step=i + 1, share=share, champion=st.champion,
                   challenger=self.version)
        return "bake", (i, share)

    def finish_step(self, deployment: Any, stats: dict[str, dict[str, Any]], baked: float = 0.0) -> tuple[str, Any]:
        """Judge the baked step: ``("next", verdict)``, or ``("done", result)`` when decided."""
        st = self.load()
        if st is None or st.state in TERMINAL | {PROMOTING}:
            return "done", self.result(st) if st else {}
        i, share = st.step, st.steps[st.step]
        champion_stats = stats.get("champion")
        verdict = check_gates(stats["challenger"], deployment.gates, champion_stats, st.baseline_p99_ms)
        verdict.update(step=i + 1, share=share, bake_seconds=round(baked, 2))
        if not verdict["passed"]:
            reason = "; ".join(verdict["failed"])
            if deployment.auto_rollback:
                return "done", self.rollback(st, verdict, reason) | {"champion_stats": _public(champion_stats)}
            st.state, st.reason = HELD, reason
            self.save(st)
            self.event("gate_failed_held", BAKING, HELD, step=i + 1, share=share, gates=verdict, reason=reason)
            raise CanaryHeld(f"gate failed at step {i + 1} with auto_rollback off, traffic held at "
                             f"{share:.0%}: {reason}")
        if champion_stats and champion_stats.get("p99_ms"):
            st.baseline_p99_ms = champion_stats["p99_ms"]
        st.passed.append(verdict)
        st.step = i + 1
        self.save(st)
        self.event("step_passed", BAKING, BAKING if i + 1 < len(st.steps) else PROMOTING, step=i + 1,
                   share=share, gates=verdict)
        if st.step >= len(st.steps):
            return "done", self.promote(st, "promoted", verdict) | {"champion_stats": _public(champion_stats)}
        return "next", verdict

    # -- transitions shared with the control DAG
    def promote(self, st: CanaryState, decision: str, gates: dict[str, Any] | None) -> dict[str, Any]:
        previous_state = st.state
        if st.state != PROMOTING:
            st.state = PROMOTING
            self.save(st)
        self.record_decision(decision, gates)
        aliases = self.aliases()
        old = aliases.get("champion")
        if old is not None and old != self.version:
            self.client.set_registered_model_alias(self.name, "previous", old)
            st.champion = old
        elif old is None and st.champion is not None and st.champion != self.version:
            self.client.set_registered_model_alias(self.name, "previous", st.champion)
        if old != self.version:
            self.client.set_registered_model_alias(self.name, "champion", self.version)
        if self.aliases().get("challenger") == self.version:
            self.client.delete_registered_model_alias(self.name, "challenger")
        self.set_share(0.0)
        st.state, st.reason = PROMOTED, None if decision == "promoted" else decision
        self.save(st)
        self.event(decision, previous_state, PROMOTED, from_version=st.champion, to_version=self.version,
                   gates=gates)
        return self.result(st, gates=gates, decision=decision)

    def rollback(self, st: CanaryState, gates: dict[str, Any] | None, reason: str,
                 decision: str = ROLLED_BACK) -> dict[str, Any]:
        """Traffic back to the champion at once; the challenger alias stays for inspection."""
        self.set_share(0.0)
        previous_state = st.state
        st.state, st.reason = decision, reason
        self.record_decision(decision, gates)
        self.save(st)
        self.event(decision, previous_state, decision, step=st.step + 1, from_version=self.version,
                   to_version=st.champion, gates=gates, reason=reason)
        return self.result(st, gates=gates)

    def result(self, st: CanaryState, gates: dict[str, Any] | None = None, decision: str | None = None,
               **extra: Any) -> dict[str, Any]:
        """The deploy stage's result dict for a recorded state."""
        tags = self.tags()
        decision = decision or tags.get(CANARY_TAG) or st.state
        if gates is None and GATES_TAG in tags:
            gates = json.loads(tags[GATES_TAG])
        aliases = self.aliases()
        promoted = st.state == PROMOTED
        return {
            "decision": decision, "state": st.state, "step": st.step, "steps": st.steps,
            "champion_version": self.version if promoted else aliases.get("champion", st.champion),
            "previous_version": aliases.get("previous"), "challenger_version": self.version,
            "gates": gates, "step_gates": st.passed, "reason": st.reason,
            "champion_stats": None, "bake_seconds": 0, "gateway_url": None, **extra,
        }


def last_gates(st: CanaryState) -> dict[str, Any] | None:
    return st.passed[-1] if st.passed else None


# ------------------------------------------------------------------------------------ operator actions


def apply_action(client: Any, name: str, action: str, *, actor: str, reason: str = "", run_id: str = "",
                 audit_file: Path | None = None) -> dict[str, Any]:
    """promote_now | abort | rollback_to_previous, through the same transitions as the deploy stage."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
    aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    if action == "rollback_to_previous":
        return rollback_to_previous(client, name, aliases, actor=actor, reason=reason, run_id=run_id,
                                    audit_file=audit_file)
    challenger = aliases.get("challenger")
    if challenger is None:
        raise LookupError(f"{name} has no challenger alias: there is no canary to {action.replace('_', ' ')}")
    machine = CanaryMachine(client, name, challenger, actor=actor, run_id=run_id, audit_file=audit_file)
    st = machine.load() or CanaryState(PENDING, 0, [], aliases.get("champion"), run_id)
    if action == "promote_now":
        if st.state == PROMOTED:
            return machine.result(st) | {"action": action, "changed": False}
        gates = last_gates(st)
        result = machine.promote(st, "promoted_by_operator", gates)
        if reason:
            machine.event("operator_reason", PROMOTED, PROMOTED, reason=reason)
        return result | {"action": action, "changed": True}
    # abort
    if st.state in TERMINAL:
        return machine.result(st) | {"action": action, "changed": False}
    result = machine.rollback(st, last_gates(st), reason or f"aborted by {actor}", decision=ABORTED)
    return result | {"action": action, "changed": True}


def rollback_to_previous(client: Any, name: str, aliases: dict[str, str], *, actor: str, reason: str = "",
                         run_id: str = "", audit_file: Path | None = None) -> dict[str, Any]:
    """``champion`` back to ``previous`` (one step); ``previous`` is then cleared so it cannot flip-flop."""
    champion, previous = aliases.get("champion"), aliases.get("previous")
    if previous is None:
        raise LookupError(f"{name} has no previous alias to roll back to")
    machine = CanaryMachine(client, name, previous, actor=actor, run_id=run_id, audit_file=audit_file)
    if champion != previous:  # (equal: a retry after the champion moved)
        client.set_registered_model_alias(name, "champion", previous)
    client.delete_registered_model_alias(name, "previous")
    if aliases.get("challenger") is not None:
        client.set_registered_model_tag(name, SHARE_TAG, "0")
    fields = {"from_version": champion, "to_version": previous, "reason": reason or None}
    machine.event("rollback_to_previous", "champion" if champion != previous else None, "champion", **fields)
    if champion is not None and champion != previous:
        machine.event("rollback_to_previous", "champion", "demoted", version=champion, **fields)
    return {"action": "rollback_to_previous", "changed": champion != previous, "champion_version": previous,
            "previous_version": None, "demoted_version": champion}
