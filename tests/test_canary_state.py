"""The stepped canary under real HTTP load on a loopback gateway, resumption after a crash, MLflow faults."""

from __future__ import annotations

import json

import pytest
from test_stage_deploy import (  # noqa: F401 - fixtures
    FEATURES,
    NAME,
    aliases,
    env,
    make_ctx,
    mlflow_template_db,
    register_raising,
    register_sklearn,
    tags,
)

from mlplatform.spec.model import PipelineSpec
from mlplatform.stages import registry
from mlplatform.stages.canary_state import SHARE_TAG, STATE_TAG, CanaryMachine
from mlplatform.stages.context import RunContext, StageFailed
from mlplatform.stages.deploy import EmbeddedTraffic, _holdout_rows, canary_deploy

STEPS = [0.1, 0.5, 1.0]


def stepped_ctx(env: dict, steps=STEPS, bake="2s", auto_rollback=True, **gates) -> RunContext:
    base = make_ctx(env)
    data = base.spec.model_dump(by_alias=True)
    data["spec"]["deployment"] = {
        "steps": steps, "bake_time": bake, "auto_rollback": auto_rollback,
        "gates": {"min_requests": 3, "max_p99_latency_ms": 1000, "max_error_rate": 0.01, **gates},
    }
    return RunContext(spec=PipelineSpec.model_validate(data), tenant=base.tenant, config=base.config,
                      run_id=base.run_id)


class Recording(EmbeddedTraffic):
    """The embedded gateway under replayed load at 300 requests/s, remembering the shares it was given."""

    def __init__(self, ctx, env, champion, challenger, fail_bake_at: float | None = None):
        super().__init__(ctx, NAME, champion, challenger, _holdout_rows(env["features"]), rps=300)
        self.shares: list[float] = []
        self.fail_bake_at = fail_bake_at
        self.baked: list[dict] = []

    def bake(self, share, seconds):
        self.shares.append(share)
        if share == self.fail_bake_at:
            raise KeyboardInterrupt("worker killed mid-bake")  # not an Exception: nothing may catch it
        stats, baked = super().bake(share, seconds)
        self.baked.append({"share": share, **{v: s["requests"] for v, s in stats.items()}})
        return stats, baked


def run(env, ctx, version, traffic=None, after_step=None) -> dict:
    return canary_deploy(ctx, {"model_name": NAME, "version": version}, env["features"], traffic=traffic,
                         after_step=after_step)


def machine(env, version) -> CanaryMachine:
    return CanaryMachine(env["client"], NAME, version, actor="test")


def test_good_challenger_is_promoted_through_every_step(env):
    v1, v2 = register_sklearn(env), register_sklearn(env, c=0.3)
    run(env, stepped_ctx(env), v1)
    ctx = stepped_ctx(env, max_p99_latency_ratio=20.0, max_prediction_shift=0.6)
    traffic = Recording(ctx, env, v1, v2)
    result = run(env, ctx, v2, traffic)

    assert result["decision"] == "promoted", (result["gates"], traffic.baked)
    assert traffic.shares == STEPS
    assert [s["gates"]["step"] for s in [{"gates": g} for g in result["step_gates"]]] == [1, 2, 3]
    for step, baked in zip(result["step_gates"], traffic.baked):
        assert step["passed"] and step["requests"] >= 3 and step["errors"] == 0
        assert step["requests"] == baked["challenger"]
    # load bounded at 300 requests/s for 2 s a step (fewer when the machine is busy); the share splits it
    first = traffic.baked[0]
    assert 40 <= first["champion"] + first["challenger"] <= 700, traffic.baked
    assert first["challenger"] < first["champion"] and traffic.baked[2]["champion"] == 0
    assert result["step_gates"][1]["prediction_shift"] is not None  # 50%: both variants have samples
    assert result["step_gates"][2]["p99_ratio"] is not None  # against the last step the champion served
    assert aliases(env) == {"champion": v2, "previous": v1}
    assert env["client"].get_registered_model(NAME).tags.get(SHARE_TAG) == "0"
    events = machine(env, v2).audit_events()
    assert [e["action"] for e in events] == ["start"] + ["step_started", "step_passed"] * 3 + ["promoted"]
    assert events[-1]["from_version"] == v1 and events[-1]["to_version"] == v2
    assert events[-1]["actor"].startswith("airflow:acme__churn/canary_deploy/")
    assert all(e["at"] for e in events) and events[2]["gates"]["requests"] >= 3
    audit_file = ctx.artifact_dir / "canary-audit.jsonl"
    logged = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert [e for e in logged if e["version"] == v2] == events
    assert [e["action"] for e in logged if e["version"] == v1] == ["promoted_first"]


@pytest.mark.parametrize("kind", ["erroring", "slow"])
def test_bad_challenger_is_rolled_back_at_the_first_gate(env, kind):
    v1 = register_sklearn(env)
    run(env, stepped_ctx(env), v1)
    if kind == "erroring":
        v2 = register_raising(env)
        ctx = stepped_ctx(env)
    else:
        v2 = register_slow(env)
        ctx = stepped_ctx(env, steps=[0.3, 0.6, 1.0], max_p99_latency_ratio=3.0, min_requests=3)
    traffic = Recording(ctx, env, v1, v2)
    result = run(env, ctx, v2, traffic)

    assert result["decision"] == "rolled_back"
    assert traffic.shares == ctx.spec.spec.deployment.traffic_steps[:1], "rolled back at the first step's gate"
    gate = "error_rate" if kind == "erroring" else "p99_ratio"
    assert [f.split()[0] for f in result["gates"]["failed"]] == [gate], (result["gates"], traffic.baked)
    assert aliases(env) == {"champion": v1, "challenger": v2}  # challenger kept for inspection
    assert env["client"].get_registered_model(NAME).tags[SHARE_TAG] == "0"
    assert tags(env, v2)["mlplatform.canary"] == "rolled_back" and gate in tags(env, v2)["mlplatform.canary_reason"]
    last = machine(env, v2).audit_events()[-1]
    assert last["action"] == "rolled_back" and last["to_version"] == v1 and gate in last["reason"]
    # a retry reads the decision back and sends no traffic
    again = run(env, ctx, v2, Recording(ctx, env, v1, v2, fail_bake_at=traffic.shares[0]))
    assert again["decision"] == "rolled_back"


def register_slow(env: dict) -> str:
    import mlflow

    class Slow(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            import time

            time.sleep(0.4)
            return [0.5] * len(model_input)

    with mlflow.start_run(experiment_id=env["experiment"]):
        info = mlflow.pyfunc.log_model(name="model", python_model=Slow(), registered_model_name=NAME,
                                       pip_requirements=[])
    return str(info.registered_model_version)


def test_task_killed_mid_canary_resumes_at_the_recorded_step(env):
    v1, v2 = register_sklearn(env), register_sklearn(env, c=0.3)
    ctx = stepped_ctx(env, steps=[0.25, 0.5, 1.0], min_requests=3)
    run(env, ctx, v1)

    def crash_after_first_step(i, state):
        if i == 0:
            raise KeyboardInterrupt("worker killed after step 1")

    first = Recording(ctx, env, v1, v2)
    with pytest.raises(KeyboardInterrupt):
        print(run(env, ctx, v2, first, after_step=crash_after_first_step)["gates"], first.baked)
    state = json.loads(tags(env, v2)[STATE_TAG])
    assert (state["state"], state["step"]) == ("baking", 1)
    assert env["client"].get_registered_model(NAME).tags[SHARE_TAG] == "0.25"  # traffic left where it was
    assert aliases(env) == {"champion": v1, "challenger": v2}

    # second try: killed in the middle of step 2's bake
    second = Recording(ctx, env, v1, v2, fail_bake_at=0.5)
    with pytest.raises(KeyboardInterrupt):
        run(env, ctx, v2, second)
    assert second.shares == [0.5], "resumed at step 2, not from step 1"

    third = Recording(ctx, env, v1, v2)
    result = run(env, ctx, v2, third)
    assert third.shares == [0.5, 1.0]
    assert result["decision"] == "promoted" and [g["step"] for g in result["step_gates"]] == [1, 2, 3]
    assert aliases(env) == {"champion": v2, "previous": v1}
    started = [e["step"] for e in machine(env, v2).audit_events() if e["action"] == "step_started"]
    assert started == [1, 2, 2, 3]


class FlakyClient:
    """An MlflowClient whose server goes down for one call: moving the champion alias."""

    def __init__(self, client):
        self._client = client
        self.failures = 1

    def __getattr__(self, name):
        return getattr(self._client, name)

    def set_registered_model_alias(self, name, alias, version):
        if alias == "champion" and self.failures:
            self.failures -= 1
            raise ConnectionError("MLflow server unreachable")
        return self._client.set_registered_model_alias(name, alias, version)


def test_mlflow_down_during_promotion_retries_without_two_champions(env, monkeypatch):
    v1, v2 = register_sklearn(env), register_sklearn(env, c=0.3)
    ctx = stepped_ctx(env, steps=[0.5], min_requests=3)
    run(env, ctx, v1)
    flaky = FlakyClient(registry.client(ctx))
    monkeypatch.setattr(registry, "client", lambda _: flaky)

    with pytest.raises(ConnectionError):  # the task fails and Airflow retries it
        run(env, ctx, v2, Recording(ctx, env, v1, v2))
    assert aliases(env) == {"champion": v1, "previous": v1, "challenger": v2}
    assert json.loads(tags(env, v2)[STATE_TAG])["state"] == "promoting"

    retry = Recording(ctx, env, v1, v2, fail_bake_at=0.5)  # a retry must not bake again
    result = run(env, ctx, v2, retry)
    assert result["decision"] == "promoted" and retry.shares == []
    assert aliases(env) == {"champion": v2, "previous": v1}


def test_failing_gate_without_auto_rollback_holds_traffic(env):
    v1 = register_sklearn(env)
    run(env, stepped_ctx(env), v1)
    v2 = register_raising(env)
    ctx = stepped_ctx(env, bake="1s", auto_rollback=False, min_requests=5)
    with pytest.raises(StageFailed, match="held"):
        run(env, ctx, v2, Recording(ctx, env, v1, v2))
    assert json.loads(tags(env, v2)[STATE_TAG])["state"] == "held"
    assert env["client"].get_registered_model(NAME).tags[SHARE_TAG] == "0.1"
    with pytest.raises(StageFailed, match="control DAG"):
        run(env, ctx, v2, Recording(ctx, env, v1, v2, fail_bake_at=0.1))
