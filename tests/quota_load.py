"""Quota load harness shared by tests/test_quota_load.py and bench/quota_bench.py.

Real components only: ``airflow db migrate`` on a PostgreSQL database, ``mlplatform sync-pools`` from
test tenant files, then api-server, scheduler, dag-processor and triggerer (LocalExecutor) on loopback.

The DAGs: the platform's own pipeline DAGs (seven stages with Great Expectations, Feast, MLflow, ...) are
far too heavy to run dozens of times on two shared cores, so each tenant gets two small pipelines whose
train task takes exactly the pool, ``pool_slots`` and ``max_active_runs`` that the platform's DAG factory
assigns to the train task of a spec with the same tenant and ``training.resources.gpu`` (built here with
``mlplatform.factory.build.build_dag`` from real spec files):

- ``<tenant>__train-local``: ``features`` (CPU pool, sleeping) then a plain GPU ``train`` task
  (``BashOperator`` sleeping, like the local trainer process);
- ``<tenant>__train-pod``: a deferrable GPU ``train`` task that starts, defers to a ``TimeDeltaTrigger`` in
  the triggerer and finishes on a worker (``execute_complete``), the shape of the deferrable train pod.

Both use ``weight_rule="upstream"`` (finish runs that are further along first), so a local train task
that became ready while a pod task was deferred outranks the pod task when its trigger fires: exactly the
moment apache/airflow#69187 is about (the resumed task is back in ``scheduled`` and not counted).

Observation: besides Airflow's own records (task_instance start/end/queued/scheduled times, the ``log``
table's running/deferred/success events), a PostgreSQL trigger added to the test database after migration
logs every task_instance state change with ``clock_timestamp()`` into ``mlplatform_ti_audit``. It changes
nothing Airflow does; it gives the exact moments a task was ready and waiting, which Airflow overwrites.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from mlplatform.tenants.occupancy import Hold, excesses, peaks, replay

QUOTAS = {"small": 1, "medium": 2, "large": 4}

AUDIT_SQL = """
CREATE TABLE mlplatform_ti_audit (
    id bigserial PRIMARY KEY,
    ti_id uuid, dag_id text, run_id text, task_id text, map_index int,
    pool text, pool_slots int, old_state text, new_state text,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION mlplatform_ti_audit_fn() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.state IS DISTINCT FROM OLD.state THEN
        INSERT INTO mlplatform_ti_audit (ti_id, dag_id, run_id, task_id, map_index, pool, pool_slots,
                                         old_state, new_state)
        VALUES (NEW.id, NEW.dag_id, NEW.run_id, NEW.task_id, NEW.map_index, NEW.pool, NEW.pool_slots,
                CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE OLD.state END, NEW.state);
    END IF;
    RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER mlplatform_ti_audit AFTER INSERT OR UPDATE ON task_instance
    FOR EACH ROW EXECUTE FUNCTION mlplatform_ti_audit_fn();
"""

DAG_FILE = '''"""Quota load DAGs (airflow DAG file written by tests/quota_load.py)."""
from datetime import datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
from airflow.sdk import DAG, BaseOperator


class DeferredTrain(BaseOperator):
    """Starts, waits in the triggerer, finishes on a worker: the shape of the deferrable train pod."""

    def __init__(self, *, seconds, **kwargs):
        super().__init__(**kwargs)
        self.seconds = seconds

    def execute(self, context):
        self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=self.seconds)), method_name="execute_complete")

    def execute_complete(self, context, event=None):
        return "trained"


PIPELINES = {pipelines!r}

# weight_rule="upstream": Airflow's setting to finish the runs that are further along first.
for dag_id, kind, pool, slots, max_runs, cpu_pool in PIPELINES:
    with DAG(dag_id, schedule=None, start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=max_runs,
             tags=["quota-load"], default_args={{"weight_rule": "upstream", "retries": 0}}):
        if kind == "plain":
            features = BashOperator(task_id="features", bash_command="sleep {features_seconds}", pool=cpu_pool)
            features >> BashOperator(task_id="train", bash_command="sleep {plain_seconds}", pool=pool,
                                     pool_slots=slots)
        else:
            DeferredTrain(task_id="train", seconds={defer_seconds}, pool=pool, pool_slots=slots)
'''


@dataclasses.dataclass(frozen=True)
class Pipeline:
    dag_id: str
    tenant: str
    kind: str  # plain | deferred
    pool: str
    pool_slots: int
    max_active_runs: int
    cpu_pool: str


def write_tenants(folder: Path, quotas: dict[str, int] = QUOTAS, max_active_runs: int = 16) -> Path:
    """Test-only tenant files (validated by the same TenantFile model as include/tenants/)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, gpus in quotas.items():
        (folder / f"{name}.yaml").write_text(f"""apiVersion: mlplatform.io/v1
kind: Tenant
metadata: {{name: {name}}}
spec:
  owner: ml-{name}@example.com
  namespace: ml-{name}
  quotas: {{gpu_slots: {gpus}, cpu_slots: 2, max_active_runs: {max_active_runs}}}
  data: {{allowed_prefixes: [{name}/]}}
""")
    return folder


def factory_pipelines(tenants_dir: Path, specs_dir: Path, quotas: dict[str, int] = QUOTAS) -> list[Pipeline]:
    """Write two specs per tenant and read pool, pool_slots and max_active_runs off the factory's DAGs."""
    from mlplatform.config import load_config
    from mlplatform.factory.build import build_dag
    from mlplatform.spec.loader import load_catalog

    wanted = {}
    for tenant, gpus in quotas.items():
        folder = specs_dir / tenant
        folder.mkdir(parents=True, exist_ok=True)
        for name, kind, gpu in (("train-local", "plain", 1), ("train-pod", "deferred", min(gpus, 2))):
            (folder / f"{name}.yaml").write_text(f"""apiVersion: mlplatform.io/v1
kind: Pipeline
metadata: {{name: {name}, tenant: {tenant}}}
spec:
  data: {{source: {tenant}/churn, entity: customer_id, timestamp: event_timestamp, label: churned}}
  training: {{framework: xgboost, model: gradient_boosting, resources: {{gpu: {gpu}}}}}
""")
            wanted[f"{tenant}__{name}"] = (tenant, kind)
    config = dataclasses.replace(load_config(), tenants_dir=tenants_dir, specs_dir=specs_dir)
    catalog = load_catalog(config)
    problems = list(catalog.problems) + list(catalog.platform_problems)
    assert not problems, problems
    out = []
    for loaded in catalog.specs:
        tenant, kind = wanted[loaded.dag_id]
        dag = build_dag(loaded, catalog, config)
        train = dag.get_task("train")
        out.append(Pipeline(dag.dag_id, tenant, kind, train.pool, train.pool_slots, dag.max_active_runs,
                            dag.get_task("features").pool))
    return sorted(out, key=lambda p: p.dag_id)


def write_dag_file(folder: Path, pipelines: list[Pipeline], plain_seconds: int, defer_seconds: int,
                   features_seconds: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(p.dag_id, p.kind, p.pool, p.pool_slots, p.max_active_runs, p.cpu_pool) for p in pipelines]
    path = folder / "quota_load_dags.py"
    path.write_text(DAG_FILE.format(pipelines=rows, plain_seconds=plain_seconds, defer_seconds=defer_seconds,
                                    features_seconds=features_seconds))
    return path


class StatsdReceiver:
    """A UDP StatsD listener on loopback that keeps every metric line Airflow sends."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.time()
            self.lines.extend((now, line) for line in data.decode(errors="replace").splitlines() if line)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def gauges(self, name: str) -> list[float]:
        """Values of gauge ``name`` (e.g. ``airflow.pool.open_slots.small__gpu``), in arrival order."""
        out = []
        for _, line in self.lines:
            metric, _, rest = line.partition(":")
            if metric == name and rest.endswith("|g"):
                out.append(float(rest[:-2]))
        return out

    def names(self) -> set[str]:
        return {line.partition(":")[0] for _, line in self.lines}


def pg_url(sql_conn: str) -> str:
    """The psycopg URL of an Airflow SQLAlchemy URL."""
    return "postgresql://" + sql_conn.split("://", 1)[1]


def run_load(workdir: Path, sql_conn: str, pipelines_fn=factory_pipelines, *, runs_per_pipeline: int = 3,
             plain_seconds: int = 4, defer_seconds: int = 8, features_seconds: int = 2, parallelism: int = 12,
             statsd_port: int | None = None, timeout: float = 900, quotas: dict[str, int] = QUOTAS,
             progress=None) -> dict:
    """Start Airflow on ``sql_conn``, trigger every run at once, wait for all; returns what happened."""
    import psycopg

    from mlplatform.local_airflow import BIN, AirflowProcesses, ApiClient, airflow, airflow_env, free_port

    tenants_dir = write_tenants(workdir / "tenants", quotas)
    pipelines = pipelines_fn(tenants_dir, workdir / "specs", quotas)
    dags_dir = workdir / "dags"
    write_dag_file(dags_dir, pipelines, plain_seconds, defer_seconds, features_seconds)
    extra = {
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_dir),
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(parallelism),
        "MLPLATFORM_TENANTS_DIR": str(tenants_dir),
        "MLPLATFORM_SPECS_DIR": str(workdir / "specs"),
    }
    if statsd_port:
        extra.update({
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(statsd_port),
            "AIRFLOW__SCHEDULER__POOL_METRICS_INTERVAL": "2",
        })
    env = airflow_env(workdir / "airflow", free_port(), sql_conn, extra)
    airflow(env, "db", "migrate", timeout=600)
    sync = subprocess.run([str(BIN / "mlplatform"), "sync-pools"], env=env, capture_output=True, text=True)
    assert sync.returncode == 0, sync.stderr
    with psycopg.connect(pg_url(sql_conn), autocommit=True) as conn:
        conn.execute(AUDIT_SQL)
    components = ("api-server", "scheduler", "dag-processor", "triggerer")
    runs: dict[str, list[str]] = {}
    with AirflowProcesses(env, components) as procs:
        api = ApiClient(procs.base_url)
        for p in pipelines:
            api.wait_for_dag(p.dag_id, timeout=300)
        # Every run is created while the DAGs are paused, then all DAGs are unpaused together.
        for p in pipelines:
            for _ in range(runs_per_pipeline):
                r = api.http.post(f"/dags/{p.dag_id}/dagRuns", json={"logical_date": None, "conf": {}})
                r.raise_for_status()
                runs.setdefault(p.dag_id, []).append(r.json()["dag_run_id"])
        started = time.time()
        for p in pipelines:
            api.http.patch(f"/dags/{p.dag_id}", json={"is_paused": False}).raise_for_status()
        total = sum(len(v) for v in runs.values())
        deadline = time.monotonic() + timeout
        with psycopg.connect(pg_url(sql_conn), autocommit=True) as conn:
            while True:
                procs.check_alive()
                done = conn.execute("SELECT count(*) FROM dag_run WHERE state IN ('success', 'failed')").fetchone()[0]
                if progress:
                    progress(done, total)
                if done >= total:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{done}/{total} runs finished after {timeout}s; logs in {procs.log_dir}")
                time.sleep(2)
        wall = time.time() - started
    return {"env": env, "pipelines": pipelines, "runs": runs, "wall_seconds": wall, "tenants_dir": tenants_dir}


# ------------------------------------------------------------------------------------------- records


def fetch_records(url: str) -> dict:
    """Airflow's own records of the load (and the audit log), read with plain SQL."""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, row_factory=dict_row) as conn:
        q = lambda sql: conn.execute(sql).fetchall()  # noqa: E731
        return {
            "pools": q("SELECT pool, slots, include_deferred FROM slot_pool"),
            "dag_runs": q("SELECT dag_id, run_id, state, start_date, end_date FROM dag_run"),
            "tis": q("SELECT id, dag_id, run_id, task_id, map_index, try_number, pool, pool_slots, state, "
                     "start_date, end_date, queued_dttm, scheduled_dttm, next_method, operator FROM task_instance"),
            "tih": q("SELECT task_instance_id, try_number, pool, pool_slots, start_date, end_date, state "
                     "FROM task_instance_history"),
            "log": q("SELECT dttm, dag_id, run_id, task_id, map_index, try_number, event FROM log "
                     "WHERE task_id IS NOT NULL ORDER BY dttm, id"),
            "triggers": q("SELECT id, classpath, created_date FROM trigger"),
            "audit": q("SELECT at, ti_id, dag_id, run_id, task_id, pool, pool_slots, old_state, new_state "
                       "FROM mlplatform_ti_audit ORDER BY at, id"),
        }


def _key(r: dict) -> str:
    return f"{r['dag_id']}/{r['run_id']}/{r['task_id']}/{r.get('map_index', -1)}"


def ti_lives(records: dict, gpu_pools: set[str]) -> list[dict]:
    """Per GPU task instance, its life from Airflow's records alone.

    ``held``: [queued (plain) or first start (deferred), end]. ``accounted``: the held life minus the
    post-deferral gap [trigger fired = scheduled_dttm, queued again = queued_dttm], during which Airflow's
    pool accounting does not count the task (apache/airflow#69187). Deferral moments come from the ``log``
    table (``deferred`` events from the execution API, ``running`` at every start including the resume).
    """
    events: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    for e in records["log"]:
        events[_key(e)].append((e["dttm"], e["event"]))
    lives = []
    for ti in records["tis"]:
        if ti["pool"] not in gpu_pools:
            continue
        key = _key(ti)
        evs = events.get(key, [])
        deferred = [t for t, ev in evs if ev == "deferred"]
        running = [t for t, ev in evs if ev == "running"]
        life = {"key": key, "pool": ti["pool"], "slots": ti["pool_slots"], "state": ti["state"],
                "start": ti["start_date"], "end": ti["end_date"], "queued": ti["queued_dttm"],
                "scheduled": ti["scheduled_dttm"], "deferred_at": deferred, "running_at": running}
        if deferred:
            life["held"] = [(ti["start_date"], ti["end_date"])]
            # The trigger fired at scheduled_dttm (set by Trigger.submit_event); queued again at queued_dttm.
            life["gap"] = (ti["scheduled_dttm"], ti["queued_dttm"])
            life["accounted"] = [(ti["start_date"], ti["scheduled_dttm"]), (ti["queued_dttm"], ti["end_date"])]
        else:
            first = min(x for x in (ti["queued_dttm"], ti["start_date"]) if x is not None)
            life["held"] = life["accounted"] = [(first, ti["end_date"])]
            life["gap"] = None
        lives.append(life)
    return lives


def holds(lives: list[dict], view: str) -> list[Hold]:
    return [Hold(lf["pool"], lf["key"], lf["slots"], a, b) for lf in lives for a, b in lf[view] if a and b]


def analyse(records: dict, quotas: dict[str, int] = QUOTAS) -> dict:
    """Occupancy, excesses, resumes and waits per tenant GPU pool; JSON-friendly."""
    limits = {f"{t}__gpu": q for t, q in quotas.items()}
    lives = ti_lives(records, set(limits))
    held, accounted = holds(lives, "held"), holds(lives, "accounted")
    held_peaks, accounted_peaks = peaks(held), peaks(accounted)
    held_excess = excesses(held, limits)
    gaps = {lf["key"]: lf["gap"] for lf in lives if lf["gap"] and None not in lf["gap"]}
    pool_of = {lf["key"]: lf["pool"] for lf in lives}

    def explained(ex) -> bool:  # a holder sat in its post-deferral gap during the excess
        return any(k in gaps and gaps[k][0] < ex.end and ex.start < gaps[k][1] for k in ex.keys)

    audit = [(a["at"], _key(a), a["pool"], a["pool_slots"], a["new_state"]) for a in records["audit"]]
    timelines = replay(audit, limits)
    # Tasks admitted into the pool while a resumed task sat in its post-deferral gap (slot "taken").
    admitted_in_gap = []
    for key, (g0, g1) in gaps.items():
        pool = pool_of[key]
        others = [a for a in records["audit"] if a["pool"] == pool and a["new_state"] == "queued"
                  and _key(a) != key and g0 <= a["at"] < g1]
        if others:
            admitted_in_gap.append({"resumed": key, "gap_s": (g1 - g0).total_seconds(),
                                    "admitted": sorted({_key(a) for a in others})})
    out = {}
    for pool, limit in limits.items():
        tl = timelines.get(pool)
        pool_gaps = [(g[1] - g[0]).total_seconds() for k, g in gaps.items() if pool_of[k] == pool]
        waits = tl.waits if tl else []
        out[pool] = {
            "quota": limit,
            "task_instances": sum(1 for lf in lives if lf["pool"] == pool),
            "deferred_task_instances": sum(1 for lf in lives if lf["pool"] == pool and lf["deferred_at"]),
            "peak_held_slots": held_peaks.get(pool, (0, None))[0],
            "peak_accounted_slots_records": accounted_peaks.get(pool, (0, None))[0],
            "peak_accounted_slots_audit": tl.peak if tl else 0,
            "held_excess": [{"start": e.start.isoformat(), "end": e.end.isoformat(), "slots": e.slots,
                             "keys": list(e.keys), "explained_by_69187": explained(e)}
                            for e in held_excess if e.pool == pool],
            "resumes": [{"at": t.isoformat(), "key": k, "slots": s, "others_counted": c, "others_waiting": w}
                        for t, k, s, c, w in (tl.resumes if tl else [])],
            "post_deferral_gap_s": {"max": max(pool_gaps, default=0.0), "n": len(pool_gaps)},
            "admitted_during_gap": [a for a in admitted_in_gap if pool_of[a["resumed"]] == pool],
            "max_eligible_wait_s": max((w.seconds for w in waits), default=0.0),
            "eligible_waits_over_5s": [{"key": w.key, "slots": w.slots, "s": round(w.seconds, 2)}
                                       for w in waits if w.seconds > 5],
        }
    return out


def dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=lambda o: o.isoformat() if isinstance(o, datetime) else str(o)))


def utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
