"""Deploy stage: a canary on the embedded gateway, then promote or roll back with MLflow aliases.

The challenger bakes next to the champion while held-out rows are replayed through the gateway over
real HTTP; its gates (requests, error rate, p99 latency) are checked on the challenger's own traffic.
The decision is recorded as model version tags, so a retry after promotion does not redeploy.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mlplatform.spec.model import Gates, duration_seconds
from mlplatform.stages import registry
from mlplatform.stages.context import RunContext

REPLAY_THREADS = 4
MAX_REPLAY_ROWS = 10_000
REQUEST_TIMEOUT_S = 10.0
CANARY_TAG = "mlplatform.canary"
GATES_TAG = "mlplatform.canary_gates"
REASON_TAG = "mlplatform.canary_reason"
RUN_TAG = "mlplatform.dag_run_id"


def canary_deploy(ctx: RunContext, registered: dict, features: dict) -> dict:
    """Promote ``registered["version"]`` to champion, through a canary when a champion exists.

    ``previous_version`` is the ``previous`` alias after the decision (the replaced champion on promotion).
    """
    client = registry.client(ctx)
    name, version = registered["model_name"], str(registered["version"])
    aliases = _aliases(client, name)
    champion = aliases.get("champion")
    if champion == version:
        result = _already_promoted(client, name, version, aliases)
    elif champion is None or ctx.params.get("skip_canary"):
        result = _promote_now(ctx, client, name, version, champion,
                              "promoted_first" if champion is None else "promoted_skip_canary")
    else:
        result = _run_canary(ctx, client, name, version, champion, features)
    (ctx.artifact_dir / "canary.json").write_text(json.dumps(result, indent=2))
    return result


def promote_without_canary(ctx: RunContext, registered: dict) -> dict:
    """For templates with no online canary (batch scoring): the registered version becomes champion."""
    client = registry.client(ctx)
    name, version = registered["model_name"], str(registered["version"])
    aliases = _aliases(client, name)
    if aliases.get("champion") == version:
        return _already_promoted(client, name, version, aliases)
    return _promote_now(ctx, client, name, version, aliases.get("champion"), "promoted_batch")


def _promote_now(ctx: RunContext, client: Any, name: str, version: str, champion: str | None, decision: str) -> dict:
    result = _result(decision, version, champion, version)
    _record(ctx, client, name, version, result)
    _promote(client, name, version, champion)
    return result


def _aliases(client: Any, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def _result(decision: str, champion: str, previous: str | None, challenger: str, **extra: Any) -> dict:
    base = {"gates": None, "champion_stats": None, "bake_seconds": 0, "gateway_url": None}
    return {
        "decision": decision, "champion_version": champion, "previous_version": previous,
        "challenger_version": challenger, **base, **extra,
    }


def _already_promoted(client: Any, name: str, version: str, aliases: dict[str, str]) -> dict:
    """A retry after promotion: report what was recorded, finish the alias cleanup, deploy nothing."""
    tags = client.get_model_version(name, version).tags
    if aliases.get("challenger") == version:
        client.delete_registered_model_alias(name, "challenger")
    recorded = tags.get(CANARY_TAG, "")
    decision = recorded if recorded.startswith("promoted") else "promoted"
    gates = json.loads(tags[GATES_TAG]) if GATES_TAG in tags else None
    return _result(decision, version, aliases.get("previous"), version, gates=gates)


def _promote(client: Any, name: str, version: str, old_champion: str | None) -> None:
    if old_champion is not None:
        client.set_registered_model_alias(name, "previous", old_champion)
    client.set_registered_model_alias(name, "champion", version)
    if _aliases(client, name).get("challenger") is not None:
        client.delete_registered_model_alias(name, "challenger")


def _record(ctx: RunContext, client: Any, name: str, version: str, result: dict) -> None:
    """Tag the version with the decision first, so a retry after the alias move reads it back."""
    tags = {CANARY_TAG: result["decision"], RUN_TAG: ctx.run_id}
    if result["gates"] is not None:
        tags[GATES_TAG] = json.dumps(result["gates"])
        if result["gates"]["failed"]:
            tags[REASON_TAG] = "; ".join(result["gates"]["failed"])[:4000]
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _run_canary(ctx: RunContext, client: Any, name: str, version: str, champion: str, features: dict) -> dict:
    from mlplatform.serving.gateway import CHALLENGER, CHAMPION, GatewayServer, Route, RoutingTable, create_app

    deployment = ctx.spec.spec.deployment
    client.set_registered_model_alias(name, "challenger", version)
    rows = _holdout_rows(features)
    routes = RoutingTable({name: Route(champion, version, deployment.canary_traffic)})
    app = create_app(ctx.config.tracking_uri, routes, ctx.artifact_dir / "predictions")
    with GatewayServer(app) as server:
        bake_seconds = _replay(server.url, name, rows, duration_seconds(deployment.bake_time))
        stats = server.gateway.stats(name)
    gates = check_gates(stats[CHALLENGER], deployment.gates)
    if gates["passed"]:
        result = _result("promoted", version, champion, version, gates=gates)
    else:
        result = _result("rolled_back", champion, _aliases(client, name).get("previous"), version, gates=gates)
    result.update(champion_stats=stats[CHAMPION], bake_seconds=bake_seconds, gateway_url=server.url)
    _record(ctx, client, name, version, result)
    if gates["passed"]:
        _promote(client, name, version, champion)
    return result


def _holdout_rows(features: dict) -> list[dict[str, Any]]:
    import pandas as pd

    frame = pd.read_parquet(features["holdout_path"], columns=list(features["feature_columns"]))
    if frame.empty:
        raise ValueError(f"holdout {features['holdout_path']} has no rows to replay")
    return frame.head(MAX_REPLAY_ROWS).to_dict("records")


def _replay(url: str, name: str, rows: list[dict[str, Any]], bake_seconds: int) -> float:
    """Send single-row requests from a few threads until the bake time is over; returns seconds baked."""
    import httpx

    tenant, _, pipeline = name.partition(".")
    endpoint = f"{url}/v1/models/{tenant}/{pipeline}:predict"
    started = time.monotonic()
    deadline = started + bake_seconds

    def worker(offset: int) -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
            i = offset
            while time.monotonic() < deadline:
                http.post(endpoint, json={"inputs": rows[i % len(rows)]})
                i += REPLAY_THREADS

    with ThreadPoolExecutor(REPLAY_THREADS, thread_name_prefix="canary-replay") as pool:
        for future in [pool.submit(worker, n) for n in range(REPLAY_THREADS)]:
            future.result()
    return round(time.monotonic() - started, 2)


def check_gates(stats: dict[str, Any], gates: Gates) -> dict[str, Any]:
    """The challenger's gate verdict from its gateway stats."""
    failed = []
    if stats["requests"] < gates.min_requests:
        failed.append(f"requests {stats['requests']} < min_requests {gates.min_requests}")
    if stats["error_rate"] > gates.max_error_rate:
        failed.append(f"error_rate {stats['error_rate']:.4f} > max_error_rate {gates.max_error_rate}")
    if stats["p99_ms"] is not None and stats["p99_ms"] > gates.max_p99_latency_ms:
        failed.append(f"p99 {stats['p99_ms']:.1f}ms > max_p99_latency_ms {gates.max_p99_latency_ms}")
    return {
        "requests": stats["requests"], "errors": stats["errors"], "error_rate": stats["error_rate"],
        "p99_ms": stats["p99_ms"], "passed": not failed, "failed": failed,
    }
