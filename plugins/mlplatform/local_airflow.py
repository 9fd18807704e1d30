"""Run real Airflow components (api-server, scheduler, dag-processor, triggerer) as local processes.

Used by ``mlplatform demo`` and by the tests that need a real scheduler. Configuration is environment
variables only, so the same code runs against SQLite (the embedded default) or PostgreSQL, with the
LocalExecutor or (``celery_env`` + ``celery-worker-<name>`` components) the CeleryExecutor.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from mlplatform.config import REPO_ROOT

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def airflow_env(home: Path, port: int, sql_conn: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for one local Airflow installation rooted at ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    secret_file = home / "secret_key"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(32))
    secret = secret_file.read_text().strip()
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "8",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_conn or f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__SECRET_KEY": secret,
        "AIRFLOW__API_AUTH__JWT_SECRET": secret,
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "GIT_PYTHON_REFRESH": "quiet",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        # `airflow standalone` starts its components as `airflow` from PATH: this venv's, even when not activated
        "PATH": os.pathsep.join([str(BIN), *(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != str(BIN))]),
    })
    env.update(extra or {})
    return env


HOSTNAME_ENV = "MLPLATFORM_AIRFLOW_HOSTNAME"
CELERY_WORKER = "celery-worker-"
# What only the control plane needs (docker-compose.yaml does the same): Airflow 3 workers reach connections,
# variables and XComs through the execution API, and serve no logs here.
CONTROL_PLANE_ONLY = ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__FERNET_KEY",
                      "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY")


def worker_env(env: dict[str, str]) -> dict[str, str]:
    """A Celery worker's environment: without the control plane's secrets, unless Celery keeps its results in
    the metadata database (``db+...`` result backend), which the worker then has to reach."""
    if env.get("AIRFLOW__CELERY__RESULT_BACKEND", "").startswith("db+"):
        return dict(env)
    return {k: v for k, v in env.items() if k not in CONTROL_PLANE_ONLY}


def hostname() -> str:
    """``[core] hostname_callable`` for several workers on one machine: the name a worker was started with
    (``MLPLATFORM_AIRFLOW_HOSTNAME``, set per ``celery-worker-<name>`` component), else Airflow's default."""
    name = os.environ.get(HOSTNAME_ENV, "").strip()
    if name:
        return name
    from airflow.utils.net import getfqdn

    return getfqdn()


def celery_env(broker_url: str, result_backend: str, concurrency: int = 2,
               task_heartbeat_timeout: int | None = None) -> dict[str, str]:
    """Settings (``extra`` of ``airflow_env``) for the CeleryExecutor with ``celery-worker-<name>`` components.

    ``result_backend`` is a Celery URL (``redis://...``, or ``db+postgresql://...``, which then keeps the metadata
    DB URL in the workers' environment: see ``worker_env``). Each worker reports its component name as
    the task instances' hostname. ``task_heartbeat_timeout`` lowers ``[scheduler]
    task_instance_heartbeat_timeout``: how long a task of a dead worker stays "running" before the scheduler
    fails it and its retry is queued (300 s by default).
    """
    env = {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "mlplatform.local_airflow.hostname",
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": result_backend,
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(concurrency),
    }
    if task_heartbeat_timeout is not None:
        env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] = str(task_heartbeat_timeout)
        env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL"] = "5"
    return env


def airflow(env: dict[str, str], *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one ``airflow`` CLI command."""
    return subprocess.run([str(BIN / "airflow"), *args], env=env, check=check, capture_output=True, text=True,
                          timeout=timeout)


class AirflowProcesses:
    """Starts components, waits for the api-server, and stops them all (process groups) on exit."""

    def __init__(self, env: dict[str, str], components: tuple[str, ...] = ("api-server", "scheduler", "dag-processor")):
        self.env = env
        self.components = components
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_dir = Path(env["AIRFLOW_HOME"]) / "process-logs"
        self.base_url = env["AIRFLOW__API__BASE_URL"]

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in self.components:
            self.spawn(name)
        self.wait_for_api()

    def spawn(self, name: str) -> None:
        """Start one component (again, after ``kill``) in its own process group, logging to its file.

        ``celery-worker-<name>``: an ``airflow celery worker`` whose Celery node and task-instance hostname
        are the component name (serving no logs: the components share the log folder).
        """
        env = self.env
        if name == "api-server":
            args = ["api-server", "--port", self.env["AIRFLOW__API__PORT"], "--host", "127.0.0.1"]
        elif name.startswith(CELERY_WORKER):
            args = ["celery", "worker", "--celery-hostname", f"{name}@%h", "--skip-serve-logs",
                    "--concurrency", self.env.get("AIRFLOW__CELERY__WORKER_CONCURRENCY", "2")]
            env = worker_env({**self.env, HOSTNAME_ENV: name})
        else:
            args = [name]
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen([str(BIN / "airflow"), *args], env=env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, name: str, tree: bool = False) -> None:
        """SIGKILL one component's whole process group, as a crash or an OOM kill would.

        ``tree``: also every process group its descendants started, as when the host or container dies (the
        task SDK puts each task process in a group of its own, which the component's group does not reach).
        """
        proc = self.procs[name]
        groups = [proc.pid]
        if tree and proc.poll() is None:
            import psutil

            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    groups.append(os.getpgid(child.pid))
                except ProcessLookupError:
                    pass
        for group in dict.fromkeys(groups):
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()

    def wait_for_api(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"api-server not healthy after {timeout}s; see {self.log_dir}/api-server.log")

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"airflow {name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __enter__(self) -> AirflowProcesses:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ApiClient:
    """The few REST calls the demo and tests make (all admins on the local simple auth manager)."""

    def __init__(self, base_url: str, token: str | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=f"{base_url}/api/v2", timeout=30, headers=headers)

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.http.get(f"/dags/{dag_id}")
            if r.status_code == 200:
                return r.json()
            time.sleep(2)
        raise TimeoutError(f"DAG {dag_id} did not appear within {timeout}s")

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        """Unpause and start a manual run; returns its run id."""
        self.http.patch(f"/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
        r = self.http.post(f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        r.raise_for_status()
        return r.json()["dag_run_id"]

    def start(self, dag_id: str, wait_for_scheduled: float = 45) -> tuple[str, str]:
        """Unpause a paused DAG and return (run id, run type) of its first run.

        With catchup off, unpausing a cron DAG makes the scheduler run the latest cron slot at once; that
        scheduled run is followed rather than racing it with a manual one. Other DAGs get a manual run.
        """
        dag = self.http.get(f"/dags/{dag_id}").json()
        self.http.patch(f"/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
        if dag.get("is_paused") and dag.get("next_dagrun_run_after"):  # time-based: the scheduler starts one
            deadline = time.monotonic() + wait_for_scheduled
            while time.monotonic() < deadline:
                runs = self.http.get(f"/dags/{dag_id}/dagRuns").json().get("dag_runs", [])
                if runs:
                    return runs[0]["dag_run_id"], runs[0]["run_type"]
                time.sleep(1)
        return self.trigger(dag_id), "manual"

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float, on_tick=None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.http.get(f"/dags/{dag_id}/dagRuns/{run_id}").json()
            if on_tick:
                on_tick(self.task_states(dag_id, run_id))
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(3)
        raise TimeoutError(f"run {run_id} of {dag_id} not finished within {timeout}s")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        r = self.http.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        return {ti["task_id"]: ti["state"] for ti in r.json().get("task_instances", [])}

    def xcom(self, dag_id: str, run_id: str, task_id: str):
        r = self.http.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
                          params={"deserialize": True})
        return r.json().get("value") if r.status_code == 200 else None

    def import_errors(self) -> list[dict]:
        return self.http.get("/importErrors").json().get("import_errors", [])

    def dag_ids(self) -> list[str]:
        return [d["dag_id"] for d in self.http.get("/dags", params={"limit": 1000}).json()["dags"]]


@contextmanager
def running_airflow(home: Path, sql_conn: str | None = None, extra: dict[str, str] | None = None,
                    components: tuple[str, ...] = ("api-server", "scheduler", "dag-processor")):
    """Migrate the metadata DB, sync pools, start the components; yields (env, ApiClient)."""
    port = free_port()
    env = airflow_env(home, port, sql_conn, extra)
    airflow(env, "db", "migrate")
    subprocess.run([str(BIN / "mlplatform"), "sync-pools"], env=env, check=True, capture_output=True, text=True)
    with AirflowProcesses(env, components) as procs:
        yield env, ApiClient(procs.base_url), procs
