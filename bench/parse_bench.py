"""Parse-time benchmark: specs (old single DAG file vs one DAG file per tenant) versus hand-written DAGs.

Three measures, each in fresh processes:

1. ``DagBag(dags/)`` in one process, timed after ``import airflow`` (the dag-processor has Airflow loaded): the
   figure kept since the first version; it parses the files one after the other.
2. The dag-processor's own loop, modelled faithfully: a parent with Airflow's dag-processing modules (and the
   ``airflow.*`` modules each file imports, ``parsing_pre_import_modules``) forks one child per DAG file, at
   most ``parsing_processes`` at a time, and the child runs Airflow's own ``_parse_file`` (DagBag of that file,
   stability check, ``DagSerialization`` of every DAG) and encodes the result as the comms frame it would send.
   Reported: wall time of one pass over every file, CPU of all children, and the slowest single file (what
   ``dagbag_import_timeout`` sees).
3. Steady state of a real ``airflow dag-processor`` (SQLite metadata DB, Airflow's defaults:
   ``min_file_process_interval`` 30 s, ``parsing_processes`` 2): CPU seconds per minute of the dag-processor and
   every process it starts, over a window after every file has been parsed once.

Specs are copies of ``dags/specs/acme/churn-xgb.yaml`` spread round-robin over ``--tenants`` tenants (copies of
acme's tenant file); hand-written DAGs are spread over as many files.

    .venv/bin/python bench/parse_bench.py [--sizes 1 100 1000] [--tenants 10] [--repeat 3] [--steady-minutes 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = (REPO / "dags" / "specs" / "acme" / "churn-xgb.yaml").read_text()
TENANT = (REPO / "include" / "tenants" / "acme.yaml").read_text()
ONE_FILE = '"""Airflow DAG file: every tenant (the layout before issue 11)."""\n' \
    "from mlplatform.factory.loader import load_dags\n\nglobals().update(load_dags())\n"

TIMER = textwrap.dedent("""
    import json, sys, time
    import airflow  # noqa: F401  (the dag-processor has this loaded already)
    from airflow.dag_processing.dagbag import DagBag
    t0 = time.perf_counter()
    bag = DagBag(dag_folder=sys.argv[1], safe_mode=False)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"seconds": elapsed, "dags": len(bag.dags), "errors": len(bag.import_errors)}))
""")

# One pass of the dag-processor over a folder: fork per file from a parent that has what the manager has.
PROCESSOR_MODEL = textwrap.dedent("""
    import gc, json, os, sys, time
    from pathlib import Path
    import airflow  # noqa: F401
    import airflow.dag_processing.manager  # noqa: F401  (the manager forks the children)
    from airflow.dag_processing.processor import DagFileParseRequest, _parse_file, _pre_import_airflow_modules
    from airflow.sdk.execution_time.comms import _RequestFrame
    import structlog

    folder, processes = Path(sys.argv[1]), int(sys.argv[2])
    files = sorted(str(p) for p in folder.glob("*.py"))
    log = structlog.get_logger()
    for f in files:  # the manager pre-imports the airflow.* modules a file imports, before forking for it
        _pre_import_airflow_modules(f, log)

    def child(path):
        try:
            t = time.perf_counter()
            result = _parse_file(DagFileParseRequest(file=path, bundle_path=folder, bundle_name="dags-folder",
                                                     callback_requests=[]), log)
            frame = _RequestFrame(id=0, body=result.model_dump()).as_bytes()
            out = {"file": os.path.basename(path), "seconds": time.perf_counter() - t,
                   "dags": len(result.serialized_dags), "errors": len(result.import_errors), "frame_bytes": len(frame)}
            os.write(w, (json.dumps(out) + "\\n").encode())
        finally:
            os._exit(0)

    gc.freeze()  # as the manager does before its loop ("to prevent COW in forked process parsing dag file")
    r, w = os.pipe()
    queue, running, per_file, cpu = list(files), {}, [], 0.0
    t0 = time.perf_counter()
    while queue or running:
        while queue and len(running) < processes:
            path = queue.pop(0)
            pid = os.fork()
            if pid == 0:
                child(path)
            running[pid] = path
        pid, status, usage = os.wait4(-1, 0)
        running.pop(pid, None)
        cpu += usage.ru_utime + usage.ru_stime
    wall = time.perf_counter() - t0
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    per_file = [json.loads(line) for line in data.decode().splitlines()]
    print("RESULT " + json.dumps({"wall_s": wall, "cpu_s": cpu, "files": per_file}))
""")

HAND_HEADER = textwrap.dedent("""
    from datetime import datetime
    from airflow.sdk import DAG
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    def step(**_):
        return None
""")

EQUIV_HEADER = HAND_HEADER + textwrap.dedent("""
    from airflow.sdk import Asset, AssetAlias, AssetOrTimeSchedule, CronTriggerTimetable, Param
""")

# The seven pipeline tasks of both hand-written DAGs (formatted with dag_id and i).
PIPELINE_TASKS = """\
        validate = PythonOperator(task_id="validate", python_callable=step, pool="acme__cpu")
        features = PythonOperator(task_id="features", python_callable=step, pool="acme__cpu")
        train = KubernetesPodOperator(
            task_id="train", name="train-{i}", namespace="ml-acme", image="mlplatform/trainer:0.1.0",
            cmds=["python", "/opt/trainer/train.py"], env_vars={{"MLPLATFORM_FRAMEWORK": "xgboost"}},
            container_resources=k8s.V1ResourceRequirements(requests={{"cpu": "2", "memory": "4Gi"}},
                                                           limits={{"memory": "4Gi", "nvidia.com/gpu": "1"}}),
            pool="acme__gpu", pool_slots=1, do_xcom_push=True)
        evaluate = PythonOperator(task_id="evaluate", python_callable=step, pool="acme__cpu")
        register = PythonOperator(task_id="register", python_callable=step, pool="acme__cpu")
        deploy = PythonOperator(task_id="canary_deploy", python_callable=step, pool="acme__cpu")
        drift = PythonOperator(task_id="drift_monitor", python_callable=step, pool="acme__cpu", trigger_rule="none_failed")
        validate >> features >> train >> evaluate >> register >> deploy >> drift
"""

# The same DAG with what the spec gives it too: the trigger form, cron-or-drift schedule, the monitor DAG.
EQUIV_DAG = textwrap.dedent("""
    with DAG(dag_id="{dag_id}", start_date=datetime(2026, 1, 1), catchup=False, tags=["mlplatform"],
             max_active_runs=2, doc_md="# {dag_id}",
             schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * *", timezone="UTC"),
                                          assets=Asset(name="{dag_id}__drift", uri="mlplatform://x/{i}/drift")),
             params={{"as_of": Param(None, type=["null", "string"], format="date"),
                     "skip_canary": Param(False, type="boolean"),
                     "hp_max_depth": Param(4, type="integer", minimum=2, maximum=10),
                     "hp_n_estimators": Param(120, type="integer", minimum=20, maximum=500)}}) as dag_{i}:
""" + PIPELINE_TASKS + """    with DAG(dag_id="{dag_id}__monitor", schedule="@daily", start_date=datetime(2026, 1, 1), catchup=False,
             max_active_runs=1, params={{"as_of": Param(None, type=["null", "string"], format="date")}}):
        PythonOperator(task_id="drift_check", python_callable=step, pool="acme__cpu",
                       outlets=[AssetAlias(name="{dag_id}__drift__monitor")])
""")

HAND_DAG = textwrap.dedent("""
    with DAG(dag_id="{dag_id}", schedule="0 3 * * *", start_date=datetime(2026, 1, 1), catchup=False,
             tags=["mlplatform"], max_active_runs=2) as dag_{i}:
""" + PIPELINE_TASKS)

# Where one spec's parse time goes, in one tenant's file: what a cache of validated specs could save is "load".
COST_SPLIT = textwrap.dedent("""
    import gc, json, sys, time
    import airflow  # noqa: F401
    from airflow.dag_processing.processor import _serialize_dags  # noqa: F401
    from airflow.serialization.serialized_objects import DagSerialization
    t = time.perf_counter()
    from mlplatform.config import get_config
    from mlplatform.factory.build import build_spec_dags
    from mlplatform.factory.control import build_control_dags
    from mlplatform.spec.loader import LoadedSpec, load_specs, platform_catalog
    imported = time.perf_counter() - t
    gc.freeze()
    config, tenant = get_config(), sys.argv[1]
    t = time.perf_counter()
    catalog = platform_catalog(config, [tenant])
    platform = time.perf_counter() - t
    t = time.perf_counter()
    loaded = [r for r in load_specs(catalog, config, sorted((config.specs_dir / tenant).glob("*.yaml")))
              if isinstance(r, LoadedSpec)]
    load = time.perf_counter() - t
    t = time.perf_counter()
    dags = {}
    for spec in loaded:
        dags.update(build_spec_dags(spec, catalog, config))
    dags.update(build_control_dags(catalog, config))
    build = time.perf_counter() - t
    t = time.perf_counter()
    for dag in dags.values():
        DagSerialization.to_dict(dag)
    serialize = time.perf_counter() - t
    n = len(loaded)
    print("RESULT " + json.dumps({"specs": n, "import_s": imported, "platform_files_ms": 1000 * platform,
                                  "load_ms_per_spec": 1000 * load / n, "build_ms_per_spec": 1000 * build / n,
                                  "serialize_ms_per_spec": 1000 * serialize / n}))
""")


def cost_split(env: dict[str, str], tenant: str, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", COST_SPLIT, tenant], env=env, capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(out.stderr[-3000:])
        runs.append(json.loads(line.removeprefix("RESULT ")))
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def tenant_names(n: int, tenants: int) -> list[str]:
    return [f"t{i:02d}" for i in range(max(1, min(tenants, n)))]


def make_platform(root: Path, n: int, tenants: int) -> dict[str, str]:
    """Tenant files and ``n`` specs spread round-robin over the tenants; the platform environment."""
    names = tenant_names(n, tenants)
    (root / "tenants").mkdir(parents=True)
    for name in names:
        (root / "tenants" / f"{name}.yaml").write_text(TENANT.replace("acme", name))
    for i in range(n):
        tenant, name = names[i % len(names)], f"churn-{i:04d}"
        folder = root / "specs" / tenant
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.yaml").write_text(EXAMPLE.replace("name: churn-xgb", f"name: {name}").replace("acme", tenant))
    return {"MLPLATFORM_SPECS_DIR": str(root / "specs"), "MLPLATFORM_TENANTS_DIR": str(root / "tenants"),
            "MLPLATFORM_HOME": str(root / "home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}


def make_spec_folders(root: Path, n: int, tenants: int) -> dict[str, Path]:
    """``one_file``: the old all-tenants DAG file; ``per_tenant``: ``mlplatform dagfiles`` output."""
    sys.path.insert(0, str(REPO / "plugins"))
    from mlplatform.tenants.dagfiles import write_dagfiles

    one, per = root / "one_file", root / "per_tenant"
    one.mkdir()
    (one / "mlplatform_pipelines.py").write_text(ONE_FILE)
    write_dagfiles(tenant_names(n, tenants), per)
    return {"one_file": one, "per_tenant": per}


def make_hand_tree(root: Path, n: int, equivalent: bool = False, files: int = 1) -> Path:
    """N hand-written DAGs in ``files`` files: plain (the issue's floor) or with the spec's trigger form,
    schedule and monitor."""
    dags = root / (("hand_equivalent" if equivalent else "hand") + f"_{files}")
    dags.mkdir()
    header, dag = (EQUIV_HEADER, EQUIV_DAG) if equivalent else (HAND_HEADER, HAND_DAG)
    for f in range(files):
        body = header + "".join(dag.format(dag_id=f"acme__churn-{i:04d}", i=i) for i in range(f, n, files))
        (dags / f"hand_written_{f:02d}.py").write_text(body)
    return dags


def _median(runs: list[dict], key: str) -> dict:
    values = sorted(r[key] for r in runs)
    return {"median_s": round(statistics.median(values), 3), "min_s": round(values[0], 3), "max_s": round(values[-1], 3)}


def time_dagbag(folder: Path, env: dict[str, str], repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", TIMER, str(folder)], env=env, capture_output=True, text=True,
                             check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {**_median(runs, "seconds"), "dags": runs[0]["dags"], "errors": runs[0]["errors"]}


def time_processor(folder: Path, env: dict[str, str], repeat: int, processes: int) -> dict:
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", PROCESSOR_MODEL, str(folder), str(processes)], env=env,
                             capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(out.stdout[-2000:] + out.stderr[-4000:])
        run = json.loads(line.removeprefix("RESULT "))
        run["slowest_file_s"] = max(f["seconds"] for f in run["files"])
        runs.append(run)
    files = runs[0]["files"]
    return {"wall": _median(runs, "wall_s"), "cpu": _median(runs, "cpu_s"), "slowest_file": _median(runs, "slowest_file_s"),
            "files": len(files), "dags": sum(f["dags"] for f in files), "errors": sum(f["errors"] for f in files),
            "frame_mb": round(sum(f["frame_bytes"] for f in files) / 2**20, 1)}


def loader_import_seconds(env: dict[str, str], repeat: int) -> float:
    code = ("import time, airflow, airflow.sdk; t=time.perf_counter(); import mlplatform.factory.loader; "
            "print(time.perf_counter()-t)")
    vals = [float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 check=True).stdout.strip()) for _ in range(repeat)]
    return round(statistics.median(vals), 3)


# ----------------------------------------------------------------------------------- steady state


def _tree_cpu(proc) -> float:
    """CPU seconds of ``proc`` and its reaped children, plus every live descendant (and what it reaped)."""
    import psutil

    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def steady_state(folder: Path, env: dict[str, str], db_template: Path, work: Path, minutes: float,
                 expect_dags: int) -> dict:
    """CPU seconds per minute of a real ``airflow dag-processor`` on ``folder``, after its first full pass."""
    import sqlite3

    import psutil

    home = work / f"airflow_{folder.name}"
    home.mkdir()
    shutil.copy(db_template, home / "airflow.db")
    run_env = {**env, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(folder),
               "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
               "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs")}
    log = (home / "dag-processor.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), "dag-processor"], env=run_env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ps = psutil.Process(proc.pid)
    try:
        started = time.monotonic()
        while True:  # the first pass over every file, then one more interval so the DB writes are done
            time.sleep(5)
            if proc.poll() is not None:
                raise RuntimeError(f"dag-processor exited: {(home / 'dag-processor.log').read_text()[-3000:]}")
            with sqlite3.connect(home / "airflow.db") as db:
                have = db.execute("select count(*) from serialized_dag").fetchone()[0]
            if have >= expect_dags or time.monotonic() - started > 900:
                break
        first_pass = time.monotonic() - started
        time.sleep(35)
        cpu0, t0, parses0 = _tree_cpu(ps), time.monotonic(), _parses(home)
        time.sleep(minutes * 60)
        cpu1, t1, parses1 = _tree_cpu(ps), time.monotonic(), _parses(home)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        log.close()
    files = len(list(folder.glob("*.py")))
    passes = (parses1 - parses0) / files  # Airflow re-parses a file min_file_process_interval after its last finish
    return {"cpu_s_per_min": round((cpu1 - cpu0) / (t1 - t0) * 60, 2), "window_s": round(t1 - t0, 1),
            "parses": parses1 - parses0, "passes_per_min": round(passes / (t1 - t0) * 60, 2),
            "cpu_s_per_pass": round((cpu1 - cpu0) / passes, 2) if passes else None,
            "first_pass_s": round(first_pass, 1), "dags_in_db": have}


def _parses(home: Path) -> int:
    """Parses so far: each one logs "Filling up the DagBag" to its file's log (logs/dag_processor/...)."""
    return sum(p.read_text(errors="replace").count("Filling up the DagBag") for p in (home / "logs").rglob("*.log"))


def migrated_db(work: Path, env: dict[str, str]) -> Path:
    home = work / "airflow_template"
    home.mkdir()
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True, capture_output=True,
                   env={**env, "AIRFLOW_HOME": str(home), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}"})
    return home / "airflow.db"


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--tenants", type=int, default=10, help="tenants (and hand-written files) the specs spread over")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="[dag_processor] parsing_processes (Airflow's default 2)")
    parser.add_argument("--steady-minutes", type=float, default=3.0, help="window per steady-state run; 0 skips them")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "parse.json")
    args = parser.parse_args()
    results = {"sizes": {}, "python": sys.version.split()[0], "cores": os.cpu_count(), "tenants": args.tenants,
               "parsing_processes": args.processes, "load_average_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"n{n}"
            env = {**os.environ, **make_platform(root, n, args.tenants), "MLPLATFORM_TENANT_PARSE_BUDGET": "0"}
            folders = make_spec_folders(root, n, args.tenants)
            files = len(tenant_names(n, args.tenants))
            row = {"dagbag": {
                "one_file": time_dagbag(folders["one_file"], env, args.repeat),
                "per_tenant": time_dagbag(folders["per_tenant"], env, args.repeat),
                "hand_written_kpo": time_dagbag(make_hand_tree(root, n), env, args.repeat),
                "hand_written_equivalent": time_dagbag(make_hand_tree(root, n, equivalent=True), env, args.repeat),
            }}
            d = row["dagbag"]
            print(f"{n:5d} pipelines  DagBag: one file {d['one_file']['median_s']:7.3f}s ({d['one_file']['dags']} DAGs)  "
                  f"per tenant ({files} files) {d['per_tenant']['median_s']:7.3f}s  "
                  f"hand plain {d['hand_written_kpo']['median_s']:7.3f}s  hand equivalent "
                  f"{d['hand_written_equivalent']['median_s']:7.3f}s", flush=True)
            if n == max(args.sizes):
                row["cost_split"] = cost_split(env, tenant_names(n, args.tenants)[0], args.repeat)
                c = row["cost_split"]
                print(f"      per spec ({c['specs']} in one tenant file): load {c['load_ms_per_spec']:.2f} ms, build "
                      f"{c['build_ms_per_spec']:.2f} ms, serialize {c['serialize_ms_per_spec']:.2f} ms; per file: "
                      f"import {c['import_s']:.3f} s, tenant file + templates {c['platform_files_ms']:.1f} ms", flush=True)
            if n >= 100:
                hand_files = make_hand_tree(root, n, files=files)
                row["processor"] = {
                    "one_file": time_processor(folders["one_file"], env, args.repeat, args.processes),
                    "per_tenant": time_processor(folders["per_tenant"], env, args.repeat, args.processes),
                    "hand_written_kpo": time_processor(hand_files, env, args.repeat, args.processes),
                    "hand_written_equivalent": time_processor(make_hand_tree(root, n, equivalent=True, files=files),
                                                              env, args.repeat, args.processes),
                }
                for name, m in row["processor"].items():
                    print(f"      dag-processor pass, {name:24} wall {m['wall']['median_s']:7.3f}s  cpu "
                          f"{m['cpu']['median_s']:7.3f}s  slowest file {m['slowest_file']['median_s']:7.3f}s  "
                          f"({m['files']} files, {m['dags']} DAGs, {m['errors']} errors)", flush=True)
            if n == max(args.sizes) and args.steady_minutes > 0:
                work = Path(tmp) / "steady"
                work.mkdir()
                db = migrated_db(work, env)
                steady_env = {**env, "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": str(args.processes),
                              "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins")}
                row["steady_state"] = {}
                for name, folder, expect in (("one_file", folders["one_file"], 2 * n + files),
                                             ("per_tenant", folders["per_tenant"], 2 * n + files),
                                             ("hand_written_kpo", make_hand_tree(root, n, files=files) if n < 100 else hand_files, n),
                                             ("hand_written_equivalent", root / f"hand_equivalent_{files}" if n >= 100
                                              else make_hand_tree(root, n, equivalent=True, files=files), 2 * n)):
                    m = steady_state(folder, steady_env, db, work, args.steady_minutes, expect)
                    m["load_average"] = list(os.getloadavg())
                    row["steady_state"][name] = m
                    print(f"      steady state, {name:24} {m['cpu_s_per_min']:6.2f} CPU s/min, {m['passes_per_min']} passes/min, "
                          f"{m['cpu_s_per_pass']} CPU s/pass  (first pass "
                          f"{m['first_pass_s']} s, {m['dags_in_db']} DAGs, load {m['load_average'][0]:.1f})", flush=True)
            results["sizes"][n] = row
        results["loader_import_s"] = loader_import_seconds(dict(os.environ), args.repeat)
    results["load_average_end"] = list(os.getloadavg())
    print(f"loader import (after airflow): {results['loader_import_s']}s; load average {results['load_average_start']} -> "
          f"{results['load_average_end']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
