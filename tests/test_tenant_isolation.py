"""Tenants cannot see each other's DAGs: Airflow multi-team mode set up by ``mlplatform sync``, checked through
the front door (real api-server, scheduler and dag-processor; simple auth manager; JWTs from /auth/token).

The example tenants acme and globex with their example specs, plus one broken spec each (its stand-in DAG
runs one cheap task, so both tenants have runs, task instances and logs).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import pytest

from conftest import REPO

BROKEN = "apiVersion: mlplatform.io/v1\nkind: Pipeline\nmetadata: {name: oops, tenant: %s}\nspec: {trainig: {}}\n"
PROBE_PLUGIN = '''
from fastapi import FastAPI
from airflow.plugins_manager import AirflowPlugin
from mlplatform.tenants.access import CurrentTenantsDep

app = FastAPI()


@app.get("/tenants")
def tenants(tenants: CurrentTenantsDep) -> list[str]:
    return sorted(tenants)


class TenancyProbe(AirflowPlugin):
    name = "tenancy_probe"
    fastapi_apps = [{"app": app, "url_prefix": "/tenancy-probe", "name": "tenancy probe"}]
'''


def mlplatform(env, *args, check: bool = True) -> subprocess.CompletedProcess:
    from mlplatform.local_airflow import BIN

    out = subprocess.run([str(BIN / "mlplatform"), *args], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 or not check, out.stderr
    return out


def changes(out: subprocess.CompletedProcess) -> list[tuple[str, str, str]]:
    return [tuple(line.split()[:3]) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from mlplatform.local_airflow import AirflowProcesses, ApiClient, airflow, airflow_env, free_port
    from mlplatform.tenants.sync import read_env_file

    root = tmp_path_factory.mktemp("tenancy")
    specs, plugins, tenancy = root / "specs", root / "plugins", root / "tenancy"
    shutil.copytree(REPO / "dags" / "specs", specs)
    for tenant in ("acme", "globex"):
        (specs / tenant / "oops.yaml").write_text(BROKEN % tenant)
    plugins.mkdir()
    (plugins / "tenancy_probe.py").write_text(PROBE_PLUGIN)
    env = airflow_env(root / "airflow", free_port(), extra={
        "AIRFLOW__CORE__MULTI_TEAM": "True", "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins),
        "MLPLATFORM_SPECS_DIR": str(specs), "MLPLATFORM_HOME": str(root / "home"),
        "MLPLATFORM_TENANCY_DIR": str(tenancy)})
    airflow(env, "db", "migrate")
    runs = {"dry": mlplatform(env, "sync", "--dry-run"), "first": mlplatform(env, "sync"),
            "again": mlplatform(env, "sync")}
    env.update(read_env_file(tenancy / "airflow.env"))
    passwords = json.loads((tenancy / "passwords.json").read_text())
    with AirflowProcesses(env) as procs:
        def token(user: str) -> str:
            r = httpx.post(f"{procs.base_url}/auth/token", json={"username": user, "password": passwords[user]})
            assert r.status_code == 201, r.text
            return r.json()["access_token"]

        clients = {user: ApiClient(procs.base_url, token(user)) for user in passwords}
        for dag_id in ("acme__churn-xgb", "acme__oops", "globex__upsell", "globex__oops"):
            clients["admin"].wait_for_dag(dag_id)
        run_ids = {tenant: clients[f"{tenant}-dev"].trigger(f"{tenant}__oops") for tenant in ("acme", "globex")}
        for tenant, run_id in run_ids.items():
            assert clients[f"{tenant}-dev"].wait_for_run(f"{tenant}__oops", run_id, timeout=240)["state"] == "failed"
        yield {"clients": clients, "runs": run_ids, "sync": runs, "base_url": procs.base_url}


@pytest.mark.slow
def test_sync_is_idempotent_and_dry_run_changes_nothing(stack):
    dry, first, again = (changes(stack["sync"][k]) for k in ("dry", "first", "again"))
    assert dry == first
    assert ("create", "team", "acme") in first and ("create", "pool", "globex__gpu") in first
    assert ("create", "bundle", "acme") in first and ("create", "user", "acme-dev") in first
    assert {action for action, kind, _ in again if kind != "connection"} == {"unchanged"}
    assert ("missing", "connection", "acme_s3") in again


@pytest.mark.slow
def test_tenant_user_sees_only_its_own_dags_runs_pools_and_logs(stack):
    acme = stack["clients"]["acme-dev"].http
    dags = {d["dag_id"] for d in acme.get("/dags", params={"limit": 1000}).json()["dags"]}
    assert {"acme__churn-xgb", "acme__churn-baseline", "acme__oops"} <= dags
    assert all(d.startswith("acme__") for d in dags), dags
    runs = acme.get("/dags/~/dagRuns").json()["dag_runs"]
    assert {r["dag_id"] for r in runs} == {"acme__oops"}
    tis = acme.get("/dags/~/dagRuns/~/taskInstances").json()["task_instances"]
    assert {t["dag_id"] for t in tis} == {"acme__oops"}
    pools = {p["name"] for p in acme.get("/pools").json()["pools"]}
    assert {"acme__gpu", "acme__cpu"} <= pools and not any(p.startswith("globex") for p in pools)
    assert acme.get("/pools/acme__gpu").json()["include_deferred"] is True
    log = acme.get(f"/dags/acme__oops/dagRuns/{stack['runs']['acme']}/taskInstances/spec_error/logs/1",
                   headers={"Accept": "application/json"})
    assert log.status_code == 200 and "trainig" in json.dumps(log.json())


@pytest.mark.slow
def test_tenant_user_gets_403_on_another_tenants_dag(stack):
    acme = stack["clients"]["acme-dev"].http
    run = stack["runs"]["globex"]
    forbidden = [
        acme.get("/dags/globex__upsell"),
        acme.get("/dags/globex__oops/dagRuns"),
        acme.get(f"/dags/globex__oops/dagRuns/{run}"),
        acme.get(f"/dags/globex__oops/dagRuns/{run}/taskInstances"),
        acme.get(f"/dags/globex__oops/dagRuns/{run}/taskInstances/spec_error/logs/1"),
        acme.post("/dags/globex__upsell/dagRuns", json={"logical_date": None}),
        acme.patch("/dags/globex__upsell", json={"is_paused": False}),
        acme.get("/pools/globex__gpu"),
    ]
    assert [r.status_code for r in forbidden] == [403] * len(forbidden)
    admin = stack["clients"]["admin"].http
    assert admin.get("/dags/globex__upsell").json()["is_paused"] is True
    assert admin.get("/dags/globex__upsell/dagRuns").json()["total_entries"] == 0


@pytest.mark.slow
def test_viewer_reads_its_tenant_but_cannot_trigger_or_pause(stack):
    viewer = stack["clients"]["acme-viewer"].http
    assert viewer.get("/dags/acme__churn-xgb").status_code == 200
    assert viewer.get("/dags/globex__upsell").status_code == 403
    assert viewer.post("/dags/acme__churn-xgb/dagRuns", json={"logical_date": None}).status_code == 403
    assert viewer.patch("/dags/acme__churn-xgb", json={"is_paused": False}).status_code == 403


@pytest.mark.slow
def test_unauthenticated_request_gets_401(stack):
    anonymous = httpx.Client(base_url=f"{stack['base_url']}/api/v2", timeout=30)
    for path in ("/dags", "/dags/acme__churn-xgb", "/dags/~/dagRuns", "/pools"):
        assert anonymous.get(path).status_code == 401, path
    assert anonymous.post("/dags/acme__churn-xgb/dagRuns", json={"logical_date": None}).status_code == 401
    assert httpx.get(f"{stack['base_url']}/tenancy-probe/tenants").status_code == 401


@pytest.mark.slow
def test_platform_admin_sees_everything(stack):
    admin = stack["clients"]["admin"]
    dags = set(admin.dag_ids())
    assert {"acme__churn-xgb", "acme__oops", "globex__upsell", "globex__oops"} <= dags
    assert {r["dag_id"] for r in admin.http.get("/dags/~/dagRuns").json()["dag_runs"]} == {"acme__oops", "globex__oops"}
    assert {"acme__gpu", "globex__gpu"} <= {p["name"] for p in admin.http.get("/pools").json()["pools"]}
    assert admin.http.get("/dags/acme__churn-xgb").json()["bundle_name"] == "acme"
    assert admin.http.get("/dags/globex__upsell").json()["bundle_name"] == "globex"


@pytest.mark.slow
def test_plugin_app_gets_the_callers_tenants(stack):
    def probe(user: str) -> list[str]:
        token = stack["clients"][user].http.headers["Authorization"]
        r = httpx.get(f"{stack['base_url']}/tenancy-probe/tenants", headers={"Authorization": token})
        assert r.status_code == 200, r.text
        return r.json()

    assert probe("acme-dev") == ["acme"]
    assert probe("globex-dev") == ["globex"]
    assert probe("admin") == ["acme", "globex"]


def test_sync_refuses_tenant_files_airflow_cannot_map(tmp_path):
    from mlplatform.local_airflow import airflow_env, free_port

    tenants = tmp_path / "tenants"
    shutil.copytree(REPO / "include" / "tenants", tenants)
    globex = (tenants / "globex.yaml").read_text()
    (tenants / "globex.yaml").write_text(globex.replace("connections: []", "connections: [acme_s3]")
                                         .replace("{name: globex-dev, role: user}", "{name: acme-dev, role: viewer}"))
    (tenants / "ab.yaml").write_text(globex.replace("name: globex", "name: ab"))
    env = airflow_env(tmp_path / "airflow", free_port(), extra={
        "AIRFLOW__CORE__MULTI_TEAM": "True", "MLPLATFORM_TENANTS_DIR": str(tenants),
        "MLPLATFORM_TENANCY_DIR": str(tmp_path / "tenancy")})
    out = mlplatform(env, "sync", check=False)
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert any(line.startswith(f"{tenants / 'ab.yaml'}:5:3: metadata.name: tenant 'ab' cannot be an Airflow team")
               for line in lines), out.stderr
    assert any(line.startswith(f"{tenants / 'globex.yaml'}:") and "spec.connections[0]: connection 'acme_s3' is also "
               "listed by tenant 'acme'" in line for line in lines), out.stderr
    assert any("spec.users[0].name: user 'acme-dev' has role 'user' in tenant 'acme'" in line for line in lines)
    assert not (tmp_path / "tenancy").exists()
