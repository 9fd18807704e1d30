"""Least privilege where tenant work runs (issue 11, item 4): the stage work holds none of the platform's secrets.

The platform's secrets are planted where a real deployment has them: in the *initial* environment of the task
process and of its parent (what ``/proc/<pid>/environ`` shows), in files under ``AIRFLOW_HOME``, the tenancy
folder and the gateway's folder, and in another tenant's artifacts and data. Each isolated stage operator is
then run with its sandboxed call replaced by a probe (same launcher, same ``RunContext``, same arguments) that
reports its environment, every process it can see with their environ and command line, the files, and whether
it can unmount what covers them. None of the sentinels may show up; the tenant's own scoped credential must.
The real stages through the sandbox: tests/test_monitor_operator.py, tests/test_airflow_e2e.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO

SENTINELS = {
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://airflow:SENTINEL-db-password@postgres/airflow",
    "AIRFLOW__CORE__FERNET_KEY": "SENTINEL-fernet-key",
    "AIRFLOW__API_AUTH__JWT_SECRET": "SENTINEL-jwt-secret",
    "AIRFLOW__API__SECRET_KEY": "SENTINEL-api-secret-key",
    "AIRFLOW__CELERY__BROKER_URL": "redis://:SENTINEL-broker-password@redis:6379/0",
    "AIRFLOW_CONN_MLPLATFORM_GATEWAY": json.dumps({"conn_type": "http", "password": "SENTINEL-gateway-token"}),
    "GATEWAY_PLATFORM_TOKEN": "SENTINEL-gateway-token",
    "AIRFLOW_CONN_GLOBEX_S3": json.dumps({"conn_type": "aws", "password": "SENTINEL-globex-connection"}),
    "AIRFLOW_VAR_PLATFORM_SECRET": "SENTINEL-variable",
    "MLPLATFORM_TENANT_GLOBEX__AWS_SECRET_ACCESS_KEY": "SENTINEL-globex-scoped-key",
    "AWS_SECRET_ACCESS_KEY": "SENTINEL-platform-aws-key",
    "MLPLATFORM_PREDICTION_LOG_URL": "postgresql://predlog:SENTINEL-predlog-password@postgres/predictions",
    "MLFLOW_TRACKING_PASSWORD": "SENTINEL-platform-mlflow-password",
}
TENANT_KEY = "acme-scoped-access-key-id"  # MLPLATFORM_TENANT_ACME__AWS_ACCESS_KEY_ID: acme's own, must arrive
STAGES = ("validate", "features", "train_local", "evaluate", "drift_monitor", "drift_check")

DRIVER = r'''
"""The platform's task process: runs each isolated stage operator with its sandboxed call probed."""
import json, sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, sys.argv[1])  # tests/ (helpers_stage)
out, paths = Path(sys.argv[2]), json.loads(sys.argv[3])

import mlplatform.sandbox as sandbox
from helpers_stage import churn_frame, pipeline_spec, tenant_file, write_parquet
from mlplatform.config import load_config
from mlplatform.operators.monitor import DriftCheckOperator
from mlplatform.operators.stages import STAGE_OPERATORS

config = load_config()
spec, tenant = pipeline_spec(), tenant_file("acme")
for day in range(1, 4):
    write_parquet(churn_frame(200, seed=day), config.data_root / "acme" / "churn" / f"dt=2026-11-0{day}" / "p.parquet")
reference = write_parquet(churn_frame(200), config.artifact_dir("acme", "churn", "old") / "train.parquet")

from mlflow import MlflowClient  # a champion whose training snapshot is the reference
client = MlflowClient(config.tracking_uri, registry_uri=config.tracking_uri)
client.create_registered_model(spec.model_name)
version = client.create_model_version(spec.model_name, source="file:///nonexistent/model",
                                      tags={"mlplatform.reference_uri": reference.resolve().as_uri()}).version
client.set_registered_model_alias(spec.model_name, "champion", version)

real_run, reports = sandbox.run, {}

class Probed(Exception):
    pass

def probing(target, *args, ctx=None, **kwargs):
    reports[target.rsplit(":", 1)[1]] = real_run("mlplatform.sandbox:probe", *args, ctx=ctx, paths=paths,
                                                 escape=True)
    raise Probed()

sandbox.run = probing
upstream = {"features": {"train_path": str(reference), "holdout_path": str(reference), "current_files": [],
                         "feature_columns": ["tenure_months"], "fingerprint": "x"},
            "train": {"run_id": "r", "model_uri": "runs:/r/model"}}
ti = SimpleNamespace(try_number=1, task_id="t", xcom_pull=lambda task_ids: upstream.get(task_ids),
                     get_dr_count=lambda **_: 0)
context = {"run_id": "manual__probe", "params": {"as_of": "2026-11-03"}, "ti": ti}
operators = [cls for name, cls in STAGE_OPERATORS.items()
             if name in ("validate", "features", "train", "evaluate", "drift_monitor")] + [DriftCheckOperator]
for cls in operators:
    op = cls.for_spec(spec=spec, tenant=tenant, spec_sha256="", task_id=cls.stage,
                      extra={"training_dag_id": spec.dag_id} if cls is DriftCheckOperator else None)
    try:
        op.execute(context)
        raise SystemExit(f"{cls.__name__} returned without calling the sandbox")
    except Probed:
        pass

import os  # the control: the same probe in this process sees every planted secret
os.environ["MLPLATFORM_SANDBOX"] = "off"
reports["control"] = real_run("mlplatform.sandbox:probe", paths=paths)
out.write_text(json.dumps(reports))
'''


def _plant(tmp_path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """(environment of the platform processes, paths the probe reads, sentinel strings)."""
    airflow_home = tmp_path / "airflow"
    (airflow_home / "logs" / "dag_id=globex__x").mkdir(parents=True)
    (airflow_home / "airflow.cfg").write_text("[database]\nsql_alchemy_conn = postgresql://a:SENTINEL-cfg-db@x/a\n")
    (airflow_home / "logs" / "dag_id=globex__x" / "attempt=1.log").write_text("SENTINEL-other-tenant-log\n")
    tenancy = tmp_path / "tenancy"
    tenancy.mkdir()
    (tenancy / "passwords.json").write_text('{"acme-dev": "SENTINEL-user-password"}')
    home = tmp_path / "home"
    (home / "gateway").mkdir(parents=True)
    (home / "gateway" / "tokens.json").write_text('{"*": ["SENTINEL-token-digest"]}')
    other_artifacts = home / "artifacts" / "globex" / "upsell" / "run"
    other_artifacts.mkdir(parents=True)
    (other_artifacts / "train.csv").write_text("SENTINEL-globex-training-row\n")
    other_data = home / "data" / "globex" / "accounts"
    other_data.mkdir(parents=True)
    (other_data / "rows.csv").write_text("SENTINEL-globex-data-row\n")
    extra_secret = tmp_path / "platform-secrets"
    extra_secret.mkdir()
    (extra_secret / "s3.key").write_text("SENTINEL-hidden-by-config\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLPLATFORM_", "MLFLOW_", "AWS_"))}
    env.update(SENTINELS)
    env.update({
        "AIRFLOW_HOME": str(airflow_home),
        "MLPLATFORM_TENANCY_DIR": str(tenancy),
        "MLPLATFORM_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLPLATFORM_SANDBOX_HIDE": str(extra_secret),
        "MLPLATFORM_TENANT_ACME__AWS_ACCESS_KEY_ID": TENANT_KEY,
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "GIT_PYTHON_REFRESH": "quiet",
    })
    paths = [str(airflow_home), str(tenancy), str(home / "gateway"), str(home / "artifacts" / "globex"),
             str(other_data), str(extra_secret)]
    words = sorted({v for v in SENTINELS.values()} | {"SENTINEL-cfg-db", "SENTINEL-other-tenant-log",
                   "SENTINEL-user-password", "SENTINEL-token-digest", "SENTINEL-globex-training-row",
                   "SENTINEL-globex-data-row", "SENTINEL-hidden-by-config", "SENTINEL-db-password",
                   "SENTINEL-gateway-token", "SENTINEL-globex-connection", "SENTINEL-broker-password",
                   "SENTINEL-predlog-password"})
    return env, paths, words


def _leaks(report: dict, words: list[str]) -> list[str]:
    found = []
    for name, value in report["environ"].items():
        found += [f"environ {name}: {w}" for w in words if w in value or w in name]
    for pid, proc in report["procs"].items():
        for part, text in proc.items():
            found += [f"/proc/{pid}/{part}: {w}" for w in words if w in text]
    for path, text in report["files"].items():
        found += [f"file {path}: {w}" for w in words if w in text]
    return found


def _run_driver(tmp_path: Path, mode: str) -> dict:
    env, paths, words = _plant(tmp_path)
    env["MLPLATFORM_SANDBOX"] = mode
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "reports.json"
    # sh is the task process's parent: both hold the secrets in their initial environment, as a worker and
    # its task process do.
    proc = subprocess.run(["sh", "-c", 'python "$@"; exit $?', "sh", str(driver), str(REPO / "tests"), str(out),
                           json.dumps(paths)], env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"reports": json.loads(out.read_text()), "words": words, "paths": paths, "log": proc.stderr}


def _namespaces() -> bool:
    from mlplatform.sandbox import namespaces_available

    return namespaces_available()[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux namespaces")
def test_no_isolated_stage_can_read_a_platform_secret(tmp_path):
    if not _namespaces():
        pytest.skip("unshare cannot create PID/mount namespaces here (the scrub-only fallback is tested below)")
    run = _run_driver(tmp_path, "namespaces")
    reports, words = run["reports"], run["words"]
    control = reports.pop("control")
    seen_by_control = {w for w in words if _leaks(control, [w])}
    assert seen_by_control >= {"SENTINEL-fernet-key", "SENTINEL-db-password", "SENTINEL-cfg-db",
                               "SENTINEL-user-password", "SENTINEL-globex-training-row", "SENTINEL-hidden-by-config"}, \
        "the control probe must see the planted secrets, or this test proves nothing"
    assert sorted(reports) == sorted(STAGES)
    for stage, report in reports.items():
        assert _leaks(report, words) == [], stage
        assert list(report["procs"]) == [str(report["pid"])] == ["1"], (stage, sorted(report["procs"]))
        assert report["environ"]["AWS_ACCESS_KEY_ID"] == TENANT_KEY, stage  # the tenant's own scoped credential
        assert not any(k.startswith(("AIRFLOW", "AWS_SECRET", "GATEWAY")) for k in report["environ"]), stage
        assert report["environ"]["MLPLATFORM_HOME"] and report["environ"]["MLFLOW_TRACKING_URI"], stage
        assert set(report["fds"]) <= {"0", "1", "2", "3"}, (stage, report["fds"])  # no inherited socket
        assert all(v != "unmounted" for v in report["unmount"].values()), (stage, report["unmount"])


def test_scrub_only_fallback_still_clears_the_environment(tmp_path):
    """Without namespaces (``MLPLATFORM_SANDBOX=scrub``, or ``auto`` where unshare is refused) the stage's own
    environment is still clean; its parents' /proc entries and files are then the documented limit."""
    run = _run_driver(tmp_path, "scrub")
    for stage in STAGES:
        env = run["reports"][stage]["environ"]
        assert [w for w in run["words"] for v in env.values() if w in v] == [], stage
        assert env["AWS_ACCESS_KEY_ID"] == TENANT_KEY


def test_child_environ_allowlist():
    from mlplatform.sandbox import child_environ

    environ = {
        "PATH": "/usr/bin", "HOME": "/home/airflow", "LANG": "C.UTF-8",
        "MLPLATFORM_HOME": "/opt/mlplatform", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLPLATFORM_REDIS_URL": "redis-online:6379,db=0,password=feast-only", "FEAST_USAGE": "False",
        "MLPLATFORM_PREDICTION_LOG_URL": "postgresql://u:pw@pg/predictions",
        "MLFLOW_TRACKING_TOKEN": "platform", "MLPLATFORM_DB_PW": "x", "MLPLATFORM_GATEWAY_API_KEY": "x",
        "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000", "MLPLATFORM_SOMETHING_URL": "https://u:p@host/x",
        "AIRFLOW__CORE__FERNET_KEY": "x", "AIRFLOW_CONN_X": "x", "AIRFLOW_VAR_Y": "y", "AWS_SECRET_ACCESS_KEY": "x",
        "MLPLATFORM_TENANT_ACME__MLFLOW_TRACKING_TOKEN": "acme-token",
        "MLPLATFORM_TENANT_ACME_CORP__AWS_ACCESS_KEY_ID": "acme-corp-key",
        "MLPLATFORM_TENANT_GLOBEX__AWS_ACCESS_KEY_ID": "globex", "EXTRA_NEEDED": "1",
        "MLPLATFORM_SANDBOX_PASS_ENV": "EXTRA_NEEDED",
    }
    env = child_environ("acme", environ)
    assert env == {
        "PATH": "/usr/bin", "HOME": "/home/airflow", "LANG": "C.UTF-8", "MLPLATFORM_HOME": "/opt/mlplatform",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLPLATFORM_REDIS_URL": environ["MLPLATFORM_REDIS_URL"],
        "FEAST_USAGE": "False", "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000", "EXTRA_NEEDED": "1",
        "MLFLOW_TRACKING_TOKEN": "acme-token", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
    }
    assert child_environ("acme-corp", environ)["AWS_ACCESS_KEY_ID"] == "acme-corp-key"
    assert "AWS_ACCESS_KEY_ID" not in child_environ("acme", environ)


def test_hidden_folders_are_covered_around_what_the_stage_needs(tmp_path):
    """The compose image keeps the code in AIRFLOW_HOME (/opt/airflow): airflow.cfg and the logs are covered,
    plugins/ and the specs stay."""
    from mlplatform.sandbox import plan_hidden

    home = tmp_path / "opt" / "airflow"
    for sub in ("plugins/mlplatform", "dags/specs/acme", "logs", "include/trainer", "include/compose"):
        (home / sub).mkdir(parents=True)
    for f in ("airflow.cfg", "webserver_config.py", "dags/mlplatform_pipelines.py"):
        (home / f).write_text("x")
    (home / "link.cfg").symlink_to(tmp_path / "elsewhere.cfg")
    (tmp_path / "elsewhere.cfg").write_text("secret")
    needed = [home / "plugins", home / "dags" / "specs", home / "include" / "trainer"]
    covered = plan_hidden([home], needed)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in covered) == sorted([
        "opt/airflow/airflow.cfg", "opt/airflow/dags/mlplatform_pipelines.py", "elsewhere.cfg",
        "opt/airflow/include/compose", "opt/airflow/logs", "opt/airflow/webserver_config.py"])
    assert plan_hidden([home / "plugins"], needed) == []  # never covers a needed path


def test_errors_logs_and_results_cross_the_boundary(tmp_path, monkeypatch, caplog):
    """A StageFailed comes back with its message, a builtin error as itself, a dead child as SandboxError; the
    child's log lines reach the task's logging; Path values survive."""
    from helpers_stage import stage_context

    from mlplatform import sandbox
    from mlplatform.stages.context import StageFailed

    ctx = stage_context(tmp_path, monkeypatch)
    with caplog.at_level(logging.INFO):
        with pytest.raises(StageFailed, match="data source 'acme/churn' not found"):
            sandbox.run("mlplatform.stages.entry:validate", ctx=ctx)
    assert any("stage process started in" in r.getMessage() for r in caplog.records)
    with pytest.raises(TypeError, match="unexpected keyword"):
        sandbox.run("mlplatform.sandbox:probe", ctx=ctx, no_such_argument=1)
    with pytest.raises(ValueError, match="sandbox target"):
        sandbox.run("os:system", "true")
    from mlplatform.data.generate import generate_all
    from mlplatform.stages.entry import partitions

    generate_all(ctx.config)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        training, current, date = sandbox.run("mlplatform.stages.entry:partitions", ctx=ctx)
    assert (training, current, date) == partitions(ctx) and isinstance(current[0], Path)
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(sandbox.SandboxError, match="exited with code 1 without a result"):
        sandbox.run("mlplatform.stages.entry:partitions", ctx=ctx)


def test_local_trainer_gets_the_scrubbed_environment(tmp_path, monkeypatch):
    """stages/train_local.py starts include/trainer/train.py with the sandbox's environment, not its own, also
    when called outside the sandbox."""
    from helpers_stage import stage_context

    from mlplatform.stages import train_local

    ctx = stage_context(tmp_path, monkeypatch)
    for name, value in SENTINELS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLPLATFORM_TENANT_ACME__AWS_ACCESS_KEY_ID", TENANT_KEY)
    fake = tmp_path / "train.py"
    fake.write_text(textwrap.dedent("""
        import json, os
        json.dump(dict(os.environ), open(os.environ["MLPLATFORM_RESULT_PATH"], "w"))
    """))
    monkeypatch.setattr(train_local, "TRAINER", fake)
    features = {"train_path": "t.parquet", "holdout_path": "h.parquet", "feature_columns": ["a"], "fingerprint": "f"}
    env = train_local.run_local_trainer(ctx, features)
    leaked = [k for k, v in env.items() for s in SENTINELS.values() if s in v]
    assert leaked == [] and env["AWS_ACCESS_KEY_ID"] == TENANT_KEY
    assert env["MLPLATFORM_TRAIN_DATA"] == "t.parquet" and "AIRFLOW_HOME" not in env


def test_child_start_overhead(tmp_path, monkeypatch):
    """What isolation costs per stage: starting the child (interpreter, unpickling the RunContext) and, with
    namespaces, creating them and the mounts. Printed; bounded loosely (2 shared cores)."""
    from helpers_stage import stage_context

    from mlplatform import sandbox

    ctx = stage_context(tmp_path, monkeypatch)
    modes = ["scrub"] + (["namespaces"] if _namespaces() else [])
    timings = {}
    for mode in modes:
        monkeypatch.setenv("MLPLATFORM_SANDBOX", mode)
        sandbox.run("mlplatform.sandbox:probe", ctx=ctx)  # warm the page cache
        runs = []
        for _ in range(5):
            started = time.monotonic()
            sandbox.run("mlplatform.sandbox:probe", ctx=ctx)
            runs.append(time.monotonic() - started)
        timings[mode] = sorted(runs)[len(runs) // 2]
    print("\n[least-privilege] median child round trip per stage: "
          + ", ".join(f"{m} {t * 1000:.0f} ms" for m, t in timings.items()))
    assert all(t < 3.0 for t in timings.values()), timings


def test_tenant_stages_go_to_the_tenant_queue(platform, monkeypatch):
    """MLPLATFORM_TENANT_QUEUE routes tenant-influenced tasks to the tenant's own workers; platform work (register,
    canary, control DAG) stays on the default queue, whose worker holds the platform's connections."""
    from conftest import write_spec

    from mlplatform.factory.build import build_all
    from mlplatform.spec.loader import load_catalog

    write_spec(platform.specs_dir, "acme", "churn", "apiVersion: mlplatform.io/v1\nkind: Pipeline\n"
               "metadata: {name: churn, tenant: acme}\nspec:\n  data: {source: acme/churn, entity: customer_id, "
               "timestamp: event_timestamp, label: churned}\n")
    monkeypatch.setenv("MLPLATFORM_TENANT_QUEUE", "tenant-{tenant}")
    dags = build_all(load_catalog(platform), platform)
    queues = {t.task_id: t.queue for t in dags["acme__churn"].tasks}
    assert queues == {"validate": "tenant-acme", "features": "tenant-acme", "train": "tenant-acme",
                      "evaluate": "tenant-acme", "register": "default", "canary_deploy": "default",
                      "drift_monitor": "tenant-acme"}
    assert dags["acme__churn__monitor"].task_dict["drift_check"].queue == "tenant-acme"
    assert {t.queue for t in dags["acme__deployments"].tasks} == {"default"}
    monkeypatch.delenv("MLPLATFORM_TENANT_QUEUE")
    assert {t.queue for t in build_all(load_catalog(platform), platform)["acme__churn"].tasks} == {"default"}
