"""Deferrable bakes: the deploy task defers to a trigger while the standalone gateway serves real traffic."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from test_stage_deploy import NAME, aliases, env, make_ctx, mlflow_template_db, register_sklearn  # noqa: F401

from mlplatform.spec.model import PipelineSpec
from mlplatform.stages.canary_state import CanaryMachine
from mlplatform.stages.context import RunContext
from mlplatform.stages.deploy import _holdout_rows, canary_deploy

STEPS = [0.2, 0.5, 1.0]


def spec_ctx(env) -> RunContext:
    base = make_ctx(env)
    data = base.spec.model_dump(by_alias=True)
    data["spec"]["deployment"] = {"steps": STEPS, "bake_time": "1s",
                                  "gates": {"min_requests": 3, "max_p99_latency_ms": 1000}}
    return RunContext(spec=PipelineSpec.model_validate(data), tenant=base.tenant, config=base.config,
                      run_id=base.run_id)


class FakeTI:
    try_number = 1

    def __init__(self, xcoms):
        self.xcoms = xcoms

    def xcom_pull(self, task_ids):
        return self.xcoms.get(task_ids)


async def first_event(trigger):
    async for event in trigger.run():
        return event


@pytest.fixture
def standalone_gateway(env, tmp_path):
    """The standalone gateway's parts in-process: routes from MLflow, a fast registry watcher, real load."""
    from mlflow import MlflowClient

    from mlplatform.serving.gateway import GatewayServer, RoutingTable, create_app
    from mlplatform.serving.registry_sync import RegistryWatcher, routes_from_registry

    uri = env["config"].tracking_uri
    client = MlflowClient(uri, uri)
    watchers = []

    def start(gateway):
        w = RegistryWatcher(gateway, client, interval=0.2)
        watchers.append(w)
        w.start()

    app = create_app(uri, RoutingTable(routes_from_registry(client)), tmp_path / "gw-predictions", on_startup=start)
    with GatewayServer(app) as server:
        stop = threading.Event()
        rows = _holdout_rows(env["features"])

        def load():  # ~100 requests/s of "real" client traffic
            with httpx.Client(base_url=server.url, timeout=10) as http:
                i = 0
                while not stop.wait(0.01):
                    try:
                        http.post("/v1/models/acme/churn:predict", json={"inputs": rows[i % len(rows)]})
                    except httpx.HTTPError:
                        pass
                    i += 1

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        yield server
        stop.set()
        for t in threads:
            t.join(timeout=10)
        for w in watchers:
            w.stop()


def test_deferred_canary_promotes_step_by_step(env, standalone_gateway):
    from airflow.sdk.exceptions import TaskDeferred

    from mlplatform.config import get_config
    from mlplatform.operators.canary import DeferrableCanaryDeployOperator

    get_config.cache_clear()
    v1, v2 = register_sklearn(env), register_sklearn(env, c=0.3)
    ctx = spec_ctx(env)
    canary_deploy(ctx, {"model_name": NAME, "version": v1}, env["features"])
    op = DeferrableCanaryDeployOperator.for_spec(spec=ctx.spec, tenant=ctx.tenant, spec_sha256="x",
                                                 task_id="canary_deploy",
                                                 extra={"gateway_url": standalone_gateway.url})
    context = {"run_id": ctx.run_id, "params": {},
               "ti": FakeTI({"register": {"model_name": NAME, "version": v2}, "features": env["features"]})}
    shares, stats_seen = [], []
    try:
        op.execute(context)
        pytest.fail("the first step must defer")
    except TaskDeferred as deferred:
        pending = deferred
    for _ in range(len(STEPS)):
        shares.append(pending.trigger.share)
        assert pending.method_name == "execute_complete"
        event = asyncio.run(asyncio.wait_for(first_event(pending.trigger), 60))
        assert event.payload["status"] == "baked", event.payload
        stats_seen.append({v: s["requests"] for v, s in event.payload["stats"].items()})
        try:
            result = op.execute_complete(context, event.payload, **pending.kwargs)
            break
        except TaskDeferred as again:
            pending = again
    assert shares == STEPS
    assert result["decision"] == "promoted", result
    assert aliases(env) == {"champion": v2, "previous": v1}
    assert all(s["challenger"] >= 3 for s in stats_seen), stats_seen
    assert stats_seen[-1]["champion"] == 0  # 100% step: the gateway followed the share
    actions = [e["action"] for e in CanaryMachine(env["client"], NAME, v2, actor="t").audit_events()]
    assert actions == ["start"] + ["step_started", "step_passed"] * 3 + ["promoted"]
    assert json.loads((ctx.artifact_dir / "canary.json").read_text())["decision"] == "promoted"
    # the gateway serves the new champion alone once it re-reads the registry
    import time

    deadline = time.monotonic() + 30
    while httpx.get(standalone_gateway.url + "/v1/routes").json()["routes"][NAME] != {
            "champion": v2, "challenger": None, "share": 0.0}:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_trigger_serializes_and_reports_a_gateway_that_never_serves_the_step():
    from mlplatform.triggers.canary import GatewayBakeTrigger

    trigger = GatewayBakeTrigger("http://127.0.0.1:9", NAME, "1", "2", 0.1, 5, token="t",
                                 route_timeout=0.3, poll_interval=0.1)
    path, kwargs = trigger.serialize()
    assert path == "mlplatform.triggers.canary.GatewayBakeTrigger"
    assert GatewayBakeTrigger(**kwargs).serialize() == (path, kwargs)
    event = asyncio.run(asyncio.wait_for(first_event(trigger), 30))
    assert event.payload["status"] == "error" and "did not serve" in event.payload["message"]
