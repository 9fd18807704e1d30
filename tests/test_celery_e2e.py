"""The production-like topology natively: docker-compose.yaml's stack as local processes on loopback.

Airflow with the CeleryExecutor (api-server, scheduler, dag-processor, triggerer and two Celery workers,
`celery-worker-a` and `celery-worker-b`, which hold no metadata DB URL, Fernet key, JWT or API secret), the
metadata DB on the local PostgreSQL (a fresh database per test), broker and Celery results on the local Redis
(db 3 and 5), Feast's online store on the same Redis (db 4), an
MLflow tracking server process (backend store: a second fresh PostgreSQL database; artifacts proxied to a
real S3-compatible server over HTTP, moto's server mode). Nothing is mocked.

1. The example pipeline runs end to end, its tasks spread over both workers.
2. One worker is SIGKILLed (with every process it started, as if its host died) while it runs the train
   task; the scheduler notices the missing heartbeats, the task is retried on the other worker, and the
   run still finishes with exactly one model version for it.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO
from helpers_services import free_port, moto_server, mlflow_server, s3_client

pytestmark = pytest.mark.slow

DAG_ID = "acme__churn-xgb"
WORKERS = ("celery-worker-a", "celery-worker-b")
REDIS = ("127.0.0.1", 6379)
BROKER_DB, FEAST_DB, RESULT_DB = 3, 4, 5
HEARTBEAT_TIMEOUT = 20  # [scheduler] task_instance_heartbeat_timeout in this installation (default 300 s)
MLFLOW_BUCKET = "mlflow"


@dataclass
class Stack:
    api: object
    procs: object
    env: dict
    tracking_uri: str
    s3_endpoint: str
    airflow_db: str
    mlflow_db: str
    root: Path
    started: float


def _redis(db: int):
    import redis

    return redis.Redis(host=REDIS[0], port=REDIS[1], db=db, socket_connect_timeout=3)


@pytest.fixture
def celery_stack(tmp_path, new_postgres_db, monkeypatch):
    import redis

    from mlplatform.config import get_config, load_config
    from mlplatform.data.generate import generate_all
    from mlplatform.local_airflow import celery_env, running_airflow

    try:
        _redis(BROKER_DB).ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis on {REDIS[0]}:{REDIS[1]}: {exc}")
    started = time.monotonic()
    for db in (BROKER_DB, FEAST_DB, RESULT_DB):
        _redis(db).flushdb()
    specs = tmp_path / "specs" / "acme"
    specs.mkdir(parents=True)
    shutil.copy(REPO / "dags" / "specs" / "acme" / "churn-xgb.yaml", specs)
    airflow_db, mlflow_db = new_postgres_db("mlplatform_celery_airflow"), new_postgres_db("mlplatform_celery_mlflow")
    logs = tmp_path / "service-logs"
    try:
        with ExitStack() as stack:
            s3 = stack.enter_context(moto_server(logs, buckets=(MLFLOW_BUCKET,)))
            tracking = stack.enter_context(mlflow_server(mlflow_db, f"s3://{MLFLOW_BUCKET}/", s3, logs))
            env = {
                "MLPLATFORM_HOME": str(tmp_path / "home"),
                "MLPLATFORM_SPECS_DIR": str(tmp_path / "specs"),
                "MLFLOW_TRACKING_URI": tracking,
                "MLPLATFORM_FEAST_ONLINE_STORE": "redis",
                "MLPLATFORM_REDIS_URL": f"{REDIS[0]}:{REDIS[1]},db={FEAST_DB}",
                # The triggerer serves its logs on 8794 by default: another stack's triggerer may hold it.
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                **celery_env(f"redis://{REDIS[0]}:{REDIS[1]}/{BROKER_DB}", f"redis://{REDIS[0]}:{REDIS[1]}/{RESULT_DB}",
                             concurrency=2, task_heartbeat_timeout=HEARTBEAT_TIMEOUT),
            }
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            get_config.cache_clear()
            generate_all(load_config())
            aenv, api, procs = stack.enter_context(running_airflow(
                tmp_path / "airflow", sql_conn=airflow_db, extra=env,
                components=("api-server", "scheduler", "dag-processor", "triggerer", *WORKERS)))
            api.wait_for_dag(DAG_ID)
            print(f"\n[celery-e2e] stack up in {time.monotonic() - started:.0f}s "
                  f"(Airflow {procs.base_url}, MLflow {tracking}, S3 {s3})", flush=True)
            yield Stack(api, procs, aenv, tracking, s3, airflow_db, mlflow_db, tmp_path, started)
    finally:
        for db in (BROKER_DB, FEAST_DB, RESULT_DB):
            _redis(db).flushdb()
        get_config.cache_clear()


def _task_instances(stack: Stack, run_id: str) -> dict[str, dict]:
    r = stack.api.http.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
    r.raise_for_status()
    return {ti["task_id"]: ti for ti in r.json()["task_instances"]}


def _tries(stack: Stack, run_id: str, task_id: str) -> list[dict]:
    r = stack.api.http.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/tries")
    r.raise_for_status()
    return sorted(r.json()["task_instances"], key=lambda t: t["try_number"])


def _wait(stack: Stack, run_id: str) -> dict:
    return stack.api.wait_for_run(DAG_ID, run_id, timeout=1500, on_tick=lambda _: stack.procs.check_alive())


def _versions_of_run(stack: Stack, run_id: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(stack.tracking_uri, registry_uri=stack.tracking_uri)
    return [v for v in client.search_model_versions("name = 'acme.churn-xgb'")
            if v.tags.get("mlplatform.run_key") == f"{DAG_ID}/{run_id}"]


def test_pipeline_end_to_end_on_celery_postgres_redis_s3(celery_stack):
    import psycopg
    from mlflow import MlflowClient

    stack = celery_stack
    t0 = time.monotonic()
    run_id, _ = stack.api.start(DAG_ID)  # the cron DAG's latest slot: the only run, no manual one beside it
    run = _wait(stack, run_id)
    tis = _task_instances(stack, run_id)
    print(f"[celery-e2e] pipeline run {run['state']} in {time.monotonic() - t0:.0f}s; hosts "
          f"{ {t: ti['hostname'] for t, ti in tis.items()} }", flush=True)
    assert run["state"] == "success", {t: ti["state"] for t, ti in tis.items()}
    assert {ti["state"] for ti in tis.values()} == {"success"}
    # Every task ran on one of the two Celery workers (their task-instance hostname is the worker's name).
    assert {ti["hostname"] for ti in tis.values()} <= set(WORKERS)

    r = {t: stack.api.xcom(DAG_ID, run_id, t) for t in tis}
    assert r["validate"]["success"] is True
    assert r["features"]["online_check"] > 0
    assert r["evaluate"]["decision"] == "accepted"
    assert r["register"]["version"] == "1"
    assert r["canary_deploy"]["decision"] == "promoted_first"

    # Feast: the features were materialized into Redis db 4.
    assert _redis(FEAST_DB).dbsize() > 0

    # MLflow over HTTP: the run's model is in S3 (moto, over HTTP) behind the server's artifact proxy, and
    # the registry lives in the MLflow PostgreSQL database.
    client = MlflowClient(stack.tracking_uri, registry_uri=stack.tracking_uri)
    train_run = client.get_run(r["train"]["run_id"])
    assert train_run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert [v.version for v in _versions_of_run(stack, run_id)] == ["1"]
    version = client.get_model_version("acme.churn-xgb", "1")
    assert version.run_id == train_run.info.run_id and version.source.startswith("models:/m-"), version
    model_id = version.source.removeprefix("models:/")  # the run's logged model (MLflow 3)
    keys = [o["Key"] for o in s3_client(stack.s3_endpoint).list_objects_v2(Bucket=MLFLOW_BUCKET).get("Contents", [])]
    assert f"{train_run.info.experiment_id}/models/{model_id}/artifacts/MLmodel" in keys, keys
    assert str(client.get_model_version_by_alias("acme.churn-xgb", "champion").version) == "1"
    with psycopg.connect(stack.mlflow_db) as db:
        assert db.execute("SELECT count(*) FROM model_versions WHERE name = 'acme.churn-xgb'").fetchone()[0] == 1

    # Celery: each task went through the broker; its result is in Redis (result backend), not in the database.
    assert len(_redis(RESULT_DB).keys("celery-task-meta-*")) >= len(tis)

    # The workers ran all of it without the control plane's secrets (docker-compose.yaml does the same).
    from mlplatform.local_airflow import CONTROL_PLANE_ONLY

    for worker in WORKERS:
        environ = Path(f"/proc/{stack.procs.procs[worker].pid}/environ").read_bytes().decode()
        names = {item.split("=", 1)[0] for item in environ.split("\0") if item}
        assert not names & set(CONTROL_PLANE_ONLY), (worker, names & set(CONTROL_PLANE_ONLY))
        assert stack.airflow_db not in environ


def _train_process_running(stack: Stack, worker: str) -> bool:
    """The trainer (include/trainer/train.py) is running under ``worker``'s process tree."""
    import psutil

    proc = stack.procs.procs[worker]
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            if any(part.endswith("trainer/train.py") for part in child.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def test_killed_worker_task_is_retried_on_the_other_worker(celery_stack):
    stack = celery_stack
    t0 = time.monotonic()
    run_id, _ = stack.api.start(DAG_ID)

    # Wait until a worker runs the train task and its trainer process is up, then kill that worker's host.
    victim = None
    deadline = time.monotonic() + 900
    while victim is None:
        assert time.monotonic() < deadline, "train never started"
        stack.procs.check_alive()
        train = _task_instances(stack, run_id).get("train") or {}
        assert train.get("state") not in ("success", "failed", "upstream_failed"), train
        host = train.get("hostname")
        if train.get("state") == "running" and host in WORKERS and _train_process_running(stack, host):
            victim = host
        else:
            time.sleep(0.5)
    survivor = next(w for w in WORKERS if w != victim)
    stack.procs.kill(victim, tree=True)
    killed_at = time.monotonic()
    del stack.procs.procs[victim]  # stays dead: check_alive() watches the others
    print(f"[celery-e2e] SIGKILLed {victim} (and its task processes) while it ran train, "
          f"{killed_at - t0:.0f}s into the run", flush=True)

    # The scheduler fails the heartbeat-less try and queues a retry, which only the survivor can take.
    detected_at = retry_running_at = None
    while retry_running_at is None:
        assert time.monotonic() < killed_at + 600, "train was not retried"
        stack.procs.check_alive()
        train = _task_instances(stack, run_id)["train"]
        if detected_at is None and (train["try_number"] > 1 or train["state"] in ("up_for_retry", "failed")):
            detected_at = time.monotonic()
        if train["try_number"] > 1 and train["state"] in ("running", "success"):
            retry_running_at = time.monotonic()
        time.sleep(1)
    print(f"[celery-e2e] killed try marked failed/up_for_retry after {detected_at - killed_at:.0f}s; "
          f"retry running on {train['hostname']} after {retry_running_at - killed_at:.0f}s", flush=True)

    run = _wait(stack, run_id)
    tis = _task_instances(stack, run_id)
    print(f"[celery-e2e] run {run['state']} after {time.monotonic() - t0:.0f}s", flush=True)
    assert run["state"] == "success", {t: ti["state"] for t, ti in tis.items()}
    assert {ti["state"] for ti in tis.values()} == {"success"}

    tries = _tries(stack, run_id, "train")
    print("[celery-e2e] train tries: " + "; ".join(f"{t['try_number']}: {t['hostname']} {t['state']}" for t in tries),
          flush=True)
    assert [t["try_number"] for t in tries] == [1, 2]
    assert tries[0]["hostname"] == victim and tries[0]["state"] != "success"
    assert tries[1]["hostname"] == survivor and tries[1]["state"] == "success"
    assert tis["train"]["try_number"] == 2 and tis["train"]["hostname"] == survivor
    # Tasks after the kill ran on the survivor only.
    for task in ("evaluate", "register", "canary_deploy", "drift_monitor"):
        assert tis[task]["hostname"] == survivor, (task, tis[task]["hostname"])

    events = stack.api.http.get("/eventLogs", params={"dag_id": DAG_ID, "event": "heartbeat timeout"}).json()
    assert any(e.get("task_id") == "train" for e in events["event_logs"]), events

    versions = _versions_of_run(stack, run_id)
    assert len(versions) == 1, [(v.version, v.run_id) for v in versions]
    assert versions[0].run_id == stack.api.xcom(DAG_ID, run_id, "train")["run_id"]
