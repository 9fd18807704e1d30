"""``mlplatform demo``: one pipeline end to end on real Airflow components, results printed.

Starts api-server, scheduler and dag-processor (LocalExecutor, SQLite metadata DB under .airflow/),
triggers the DAG through the REST API, follows its tasks, then prints what each stage produced.
"""

from __future__ import annotations

import time

from mlplatform.config import REPO_ROOT, get_config
from mlplatform.local_airflow import running_airflow


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(dag_id: str, timeout: int = 900) -> int:
    from mlplatform.data.generate import generate_all

    config = get_config()
    for source, rows in generate_all(config).items():
        _say(f"example data {source}: {rows} rows")
    started = time.monotonic()
    _say("starting Airflow: api-server, scheduler, dag-processor (LocalExecutor, SQLite) ...")
    with running_airflow(REPO_ROOT / ".airflow") as (env, api, procs):
        _say(f"Airflow is up at {procs.base_url} ({time.monotonic() - started:.0f}s); waiting for {dag_id} to be parsed")
        api.wait_for_dag(dag_id)
        errors = api.import_errors()
        if errors:
            _say(f"import errors: {errors}")
        run_id, run_type = api.start(dag_id)
        _say(f"unpaused {dag_id}: following its {run_type} run {run_id}")
        seen: dict[str, str | None] = {}

        def tick(states: dict[str, str | None]) -> None:
            for task, state in states.items():
                if state != seen.get(task) and state not in (None, "scheduled", "queued"):
                    _say(f"  {time.monotonic() - started:6.0f}s  {task:14} {state}")
                    seen[task] = state
            procs.check_alive()

        run = api.wait_for_run(dag_id, run_id, timeout=timeout, on_tick=tick)
        results = {t: api.xcom(dag_id, run_id, t) for t in api.task_states(dag_id, run_id)}
    _print_results(dag_id, run, results, time.monotonic() - started, config)
    return 0 if run["state"] == "success" else 1


def _print_results(dag_id: str, run: dict, r: dict, seconds: float, config) -> None:
    _say("")
    _say(f"=== {dag_id}: run {run['state'].upper()} in {seconds:.0f}s ===")
    v = r.get("validate") or {}
    if v:
        _say(f"validation : passed, {v.get('rows')} rows, {v.get('evaluated')} expectations, "
             f"{len(v.get('warnings', []))} warning(s); full result {v.get('result_path')}")
    f = r.get("features") or {}
    if f:
        _say(f"features   : Feast project {f.get('feast_project')}, {f.get('train_rows')} train / "
             f"{f.get('holdout_rows')} holdout rows, fingerprint {str(f.get('fingerprint'))[:23]}...")
    t = r.get("train") or {}
    if t:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted((t.get("metrics") or {}).items()) if isinstance(v, float))
        _say(f"train      : MLflow run {t.get('run_id')} ({metrics})")
    e = r.get("evaluate") or {}
    if e:
        champ = f", champion v{e['champion_version']} {e['champion_value']:.4f}" if e.get("champion_version") else ""
        _say(f"evaluate   : {e.get('decision')} ({e.get('metric')}={e.get('value', 0):.4f}{champ}): {e.get('reason')}")
    g = r.get("register") or {}
    _say(f"register   : model {g.get('model_name')} version {g.get('version')}" if g else "register   : skipped")
    c = r.get("canary_deploy") or {}
    if c:
        gates = c.get("gates") or {}
        figures = (f" after {gates.get('requests')} challenger requests, error rate {gates.get('error_rate')}, "
                   f"p99 {gates.get('p99_ms')} ms") if gates else ""
        _say(f"canary     : {c.get('decision')}{figures}; champion is version {c.get('champion_version')}")
    d = r.get("drift_monitor") or {}
    if d:
        cols = ", ".join(x["column"] for x in d.get("drifted_columns", []))
        _say(f"drift      : {d.get('drift_share', 0):.0%} of columns drifted ({cols or 'none'}); "
             f"{'asset event emitted' if d.get('event_emitted') else 'no event'}")
        _say(f"drift report: {d.get('html')}")
    _say(f"MLflow     : {config.tracking_uri}")
    _say("See it in the UI: `make ui` (airflow standalone on http://127.0.0.1:8080).")
