"""Deploy stage: a stepped canary (``mlplatform.stages.canary_state``), then promote or roll back.

Embedded target: the challenger is served next to the champion by an in-process gateway on loopback while
held-out rows are replayed through it over real HTTP at a bounded rate; each step's gates are checked on
that step's own traffic. The state machine's state is recorded in MLflow, so a retry after promotion does
not redeploy and a retry after a crash mid-canary resumes at the recorded step.

The bake blocks the worker slot (it has to: the embedded gateway and its replayed traffic live in the task's
process). A deferrable bake needs traffic that outlives the task, i.e. the standalone gateway or KServe.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mlplatform.spec.model import duration_seconds
from mlplatform.stages import registry
from mlplatform.stages.canary_state import (  # noqa: F401 - re-exported for callers of the old module
    CANARY_TAG,
    GATES_TAG,
    REASON_TAG,
    RUN_TAG,
    CanaryHeld,
    CanaryMachine,
    CanaryState,
    check_gates,
)
from mlplatform.stages.context import RunContext, StageFailed

log = logging.getLogger(__name__)

REPLAY_THREADS = 4
REPLAY_RPS = 300.0  # bounded load: replayed requests per second over all threads
MAX_REPLAY_ROWS = 10_000
REQUEST_TIMEOUT_S = 10.0


def task_actor(ctx: RunContext) -> str:
    return f"airflow:{ctx.dag_id}/canary_deploy/{ctx.run_id}"


def canary_deploy(ctx: RunContext, registered: dict, features: dict, *, traffic: Any = None,
                  after_step: Callable[[int, CanaryState], None] | None = None) -> dict:
    """Promote ``registered["version"]`` to champion, through a canary when a champion exists.

    ``previous_version`` is the ``previous`` alias after the decision (the replaced champion on promotion).
    ``traffic`` replaces the embedded gateway (tests, KServe); ``after_step`` runs after each passed step.
    """
    client = registry.client(ctx)
    name, version = registered["model_name"], str(registered["version"])
    aliases = _aliases(client, name)
    champion = aliases.get("champion")
    machine = CanaryMachine(client, name, version, actor=task_actor(ctx), run_id=ctx.run_id,
                            audit_file=ctx.artifact_dir / "canary-audit.jsonl")
    state = machine.load()
    if champion == version:
        result = _already_promoted(client, name, version, aliases)
    elif state is not None and state.state in ("promoted", "rolled_back", "aborted", "promoting"):
        result = machine.result(state) if state.state != "promoting" else machine.promote(state, "promoted", None)
    elif champion is None or (ctx.params.get("skip_canary") and state is None):
        result = _promote_now(ctx, machine, champion,
                              "promoted_first" if champion is None else "promoted_skip_canary")
    else:
        result = _run_canary(ctx, machine, champion, features, traffic, after_step)
    (ctx.artifact_dir / "canary.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def promote_without_canary(ctx: RunContext, registered: dict) -> dict:
    """For templates with no online canary (batch scoring): the registered version becomes champion."""
    client = registry.client(ctx)
    name, version = registered["model_name"], str(registered["version"])
    aliases = _aliases(client, name)
    if aliases.get("champion") == version:
        return _already_promoted(client, name, version, aliases)
    machine = CanaryMachine(client, name, version, actor=task_actor(ctx), run_id=ctx.run_id)
    return _promote_now(ctx, machine, aliases.get("champion"), "promoted_batch")


def _promote_now(ctx: RunContext, machine: CanaryMachine, champion: str | None, decision: str) -> dict:
    st = machine.load() or CanaryState("pending", 0, [], champion, ctx.run_id)
    result = machine.promote(st, decision, None)
    return {**result, "champion_version": machine.version, "previous_version": champion}


def _aliases(client: Any, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def _already_promoted(client: Any, name: str, version: str, aliases: dict[str, str]) -> dict:
    """A retry after promotion: report what was recorded, finish the alias cleanup, deploy nothing."""
    tags = client.get_model_version(name, version).tags
    if aliases.get("challenger") == version:
        client.delete_registered_model_alias(name, "challenger")
    recorded = tags.get(CANARY_TAG, "")
    decision = recorded if recorded.startswith("promoted") else "promoted"
    gates = json.loads(tags[GATES_TAG]) if GATES_TAG in tags else None
    return {"decision": decision, "state": "promoted", "champion_version": version,
            "previous_version": aliases.get("previous"), "challenger_version": version, "gates": gates,
            "champion_stats": None, "bake_seconds": 0, "gateway_url": None}


def _run_canary(ctx: RunContext, machine: CanaryMachine, champion: str, features: dict, traffic: Any,
                after_step: Callable | None) -> dict:
    deployment = ctx.spec.spec.deployment
    if traffic is None:
        if deployment.target == "kserve":
            traffic = _kserve_traffic(ctx, machine, champion)
        else:
            traffic = EmbeddedTraffic(ctx, machine.name, champion, machine.version, _holdout_rows(features))
    try:
        return machine.run(deployment, champion, traffic, duration_seconds(deployment.bake_time), after_step)
    except CanaryHeld as exc:
        raise StageFailed(str(exc)) from None
    finally:
        traffic.close()


def _kserve_traffic(ctx: RunContext, machine: CanaryMachine, champion: str):
    """KServe: the InferenceService carries the canary; gate figures come from Prometheus."""
    from mlplatform.k8s.kserve import PROMETHEUS_CONN_ID, KServeTraffic, kserve_target, prometheus_fetch, storage_uri

    deployer, manifest_for = kserve_target(ctx, machine.client, machine.name)
    if deployer.get() is None:  # first canary since the target changed: serve the champion first
        deployer.apply(manifest_for(champion))
    return KServeTraffic(
        deployer, prometheus_fetch(PROMETHEUS_CONN_ID),
        challenger_storage=storage_uri(machine.client, machine.name, machine.version),
        challenger_version=machine.version,
        champion_storage=storage_uri(machine.client, machine.name, champion), champion_version=champion)


class EmbeddedTraffic:
    """An in-process gateway serving champion + challenger, with held-out rows replayed through it."""

    def __init__(self, ctx: RunContext, name: str, champion: str, challenger: str, rows: list[dict[str, Any]],
                 rps: float = REPLAY_RPS, threads: int = REPLAY_THREADS):
        self.ctx, self.name, self.champion, self.challenger = ctx, name, champion, challenger
        self.rows, self.rps, self.threads = rows, rps, threads
        self.server = None
        self.url: str | None = None

    def _ensure_server(self, share: float):
        if self.server is None:
            from mlplatform.serving.gateway import GatewayServer, Route, RoutingTable, create_app

            routes = RoutingTable({self.name: Route(self.champion, self.challenger, share)})
            app = create_app(self.ctx.config.tracking_uri, routes, self.ctx.artifact_dir / "predictions")
            self.server = GatewayServer(app).__enter__()
            self.url = self.server.url
        return self.server

    def set_share(self, share: float) -> None:
        if self.server is not None:
            self.server.set_route(self.name, self.champion, self.challenger if share > 0 else None, share)

    def bake(self, share: float, seconds: int) -> tuple[dict[str, dict[str, Any]], float]:
        server = self._ensure_server(share)
        server.set_route(self.name, self.champion, self.challenger, share)
        server.gateway.reset_stats(self.name)
        baked = replay(server.url, self.name, self.rows, seconds, self.rps, self.threads)
        return server.gateway.stats(self.name, with_predictions=True), baked

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def _holdout_rows(features: dict) -> list[dict[str, Any]]:
    import pandas as pd

    frame = pd.read_parquet(features["holdout_path"], columns=list(features["feature_columns"]))
    if frame.empty:
        raise ValueError(f"holdout {features['holdout_path']} has no rows to replay")
    return frame.head(MAX_REPLAY_ROWS).to_dict("records")


def replay(url: str, name: str, rows: list[dict[str, Any]], bake_seconds: float, rps: float = REPLAY_RPS,
           threads: int = REPLAY_THREADS, headers: dict[str, str] | None = None) -> float:
    """Single-row requests from a few threads at about ``rps`` in total until the bake is over."""
    import httpx

    tenant, _, pipeline = name.partition(".")
    endpoint = f"{url}/v1/models/{tenant}/{pipeline}:predict"
    started = time.monotonic()
    deadline = started + bake_seconds
    interval = threads / rps if rps > 0 else 0.0

    def worker(offset: int) -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S, headers=headers) as http:
            i = offset
            next_at = time.monotonic() + offset * interval / threads
            while time.monotonic() < deadline:
                pause = next_at - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                next_at += interval
                try:
                    http.post(endpoint, json={"inputs": rows[i % len(rows)]})
                except httpx.HTTPError:
                    pass  # a timeout is the challenger's problem, counted by the gateway when it answers
                i += threads

    with ThreadPoolExecutor(threads, thread_name_prefix="canary-replay") as pool:
        for future in [pool.submit(worker, n) for n in range(threads)]:
            future.result()
    return round(time.monotonic() - started, 2)
