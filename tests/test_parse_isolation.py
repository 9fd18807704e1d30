"""Parse isolation: one DAG file per tenant, a per-tenant parse budget, and no spec folder left unparsed.

The regression of issue 11: with every tenant in one DAG file, one tenant's many specs pushed that file past
``dagbag_import_timeout`` and every tenant's DAGs disappeared. Checked here through a real ``DagBag`` in a
fresh process (so a lowered ``AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT`` applies), next to the old layout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, copy_example_specs, write_spec

CLI = str(Path(sys.executable).parent / "mlplatform")
HEALTHY = {"acme__churn-baseline", "acme__churn-baseline__monitor", "acme__churn-xgb", "acme__churn-xgb__monitor",
           "acme__deployments", "globex__upsell", "globex__upsell__monitor"}
BUDGET_MESSAGE = "parse budget exceeded"

# One DagBag per folder given, in a fresh interpreter; prints {folder: {dags: {id: description}, errors: {...}}}.
DAGBAG = """
import json, sys, time
import airflow
from airflow.dag_processing.dagbag import DagBag
out = {}
for folder in sys.argv[1:]:
    t = time.perf_counter()
    bag = DagBag(dag_folder=folder, safe_mode=True)
    out[folder] = {"seconds": time.perf_counter() - t, "errors": {k.rsplit("/", 1)[-1]: v for k, v in bag.import_errors.items()},
                   "dags": {d: [bag.dags[d].description or "", bag.dags[d].fileloc.rsplit("/", 1)[-1]] for d in bag.dags}}
print("RESULT " + json.dumps(out))
"""


def _hostile_tree(root: Path, specs: int) -> dict[str, str]:
    """The example tenants plus tenant ``hostile`` with ``specs`` copies of the full demo spec; one DAG folder
    per tenant (generated) and one with the old single all-tenants file. Returns the platform environment."""
    from mlplatform.tenants.dagfiles import write_dagfiles

    tenants = root / "tenants"
    shutil.copytree(REPO / "include" / "tenants", tenants)
    (tenants / "hostile.yaml").write_text((tenants / "acme.yaml").read_text().replace("acme", "hostile"))
    spec_root = root / "specs"
    copy_example_specs(spec_root)
    text = (REPO / "dags" / "specs" / "acme" / "churn-xgb.yaml").read_text().replace("acme", "hostile")
    for i in range(specs):
        write_spec(spec_root, "hostile", f"churn-{i:05d}", text.replace("name: churn-xgb", f"name: churn-{i:05d}"))
    write_dagfiles(["acme", "globex", "hostile"], root / "per_tenant")
    (root / "one_file").mkdir()
    (root / "one_file" / "mlplatform_pipelines.py").write_text(  # the layout before issue 11
        '"""Airflow DAG file: every tenant."""\nfrom mlplatform.factory.loader import load_dags\n\nglobals().update(load_dags())\n')
    return {"MLPLATFORM_TENANTS_DIR": str(tenants), "MLPLATFORM_SPECS_DIR": str(spec_root),
            "MLPLATFORM_HOME": str(root / "home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}


def _dagbags(env: dict[str, str], *folders: Path, timeout: int = 600) -> dict:
    proc = subprocess.run([sys.executable, "-c", DAGBAG, *map(str, folders)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {Path(k).name: v for k, v in json.loads(line.removeprefix("RESULT ")).items()}


# ------------------------------------------------------------------------------------------- real DagBag


def test_a_tenant_past_the_import_timeout_hides_no_other_tenant(tmp_path):
    """3,000 hostile specs, budget off, a 6 s import timeout: the hostile tenant's file times out, every other
    tenant's DAGs load; the old single file loses every tenant's DAGs the same way."""
    env = _hostile_tree(tmp_path, 3000)
    env.update(AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="6", MLPLATFORM_TENANT_PARSE_BUDGET="0")
    result = _dagbags(env, tmp_path / "per_tenant", tmp_path / "one_file")
    per_tenant, one_file = result["per_tenant"], result["one_file"]
    assert list(per_tenant["errors"]) == ["tenant_hostile.py"], per_tenant["errors"]
    assert "DagBag import timeout" in per_tenant["errors"]["tenant_hostile.py"]
    assert set(per_tenant["dags"]) == HEALTHY
    assert {d: f for d, (_, f) in per_tenant["dags"].items()} == {d: f"tenant_{d.split('__')[0]}.py" for d in HEALTHY}
    # before: one file for everyone, one timeout for everyone
    assert list(one_file["errors"]) == ["mlplatform_pipelines.py"] and one_file["dags"] == {}


def test_a_tenant_over_its_budget_gets_stand_ins_and_the_others_are_untouched(tmp_path):
    """1,500 hostile specs and a 1 s budget under Airflow's default 30 s timeout: no import error at all; the
    hostile tenant's first specs are real DAGs, the rest paused stand-ins that say why; other tenants intact."""
    env = _hostile_tree(tmp_path, 1500)
    env.update(MLPLATFORM_TENANT_PARSE_BUDGET="1")
    bag = _dagbags(env, tmp_path / "per_tenant")["per_tenant"]
    assert bag["errors"] == {}
    assert HEALTHY <= set(bag["dags"])
    hostile = {d: desc for d, (desc, _) in bag["dags"].items() if d.startswith("hostile__")}
    stand_ins = sorted(d for d, desc in hostile.items() if BUDGET_MESSAGE in desc)
    real = sorted(d for d in hostile if d not in stand_ins and not d.endswith(("__monitor", "__deployments")))
    assert real and stand_ins, (len(real), len(stand_ins))
    assert len(real) + len(stand_ins) == 1500  # every spec has its DAG: built, or a stand-in
    assert max(real) < min(stand_ins)  # the same specs (the last by file name) on every parse
    assert all(desc.startswith("INVALID SPEC: ") and "split or simplify your specs" in hostile[d]
               for d, desc in hostile.items() if d in stand_ins)
    assert bag["seconds"] < 30


# ------------------------------------------------------------------------------------------- in process


def _load(monkeypatch, tenant: str | None = None, **env: str) -> dict:
    from mlplatform.config import get_config
    from mlplatform.factory.loader import load_dags

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_config.cache_clear()
    return {dag.dag_id: dag for dag in load_dags(tenant=tenant).values()}


def test_budget_stand_ins_in_file_order_with_message(platform, monkeypatch):
    """With a clock that spends one second per look, the budget runs out after a fixed number of specs."""
    import mlplatform.factory.budget as budget

    for i in range(6):
        write_spec(platform.specs_dir, "acme", f"p{i}", (REPO / "dags/specs/acme/churn-baseline.yaml").read_text()
                   .replace("name: churn-baseline", f"name: p{i}"))
    ticks = iter(range(1000))
    monkeypatch.setattr(budget, "_now", lambda: float(next(ticks)))  # the start is 0, each look before a spec +1
    dags = _load(monkeypatch, "acme", MLPLATFORM_TENANT_PARSE_BUDGET="2.5")
    assert set(dags) == {"acme__p0", "acme__p0__monitor", "acme__p1", "acme__p1__monitor", "acme__p2", "acme__p3",
                         "acme__p4", "acme__p5", "acme__deployments"}
    stand_in = dags["acme__p4"]
    assert stand_in.is_paused_upon_creation and "invalid-spec" in stand_in.tags
    assert stand_in.description.startswith("INVALID SPEC: specs/acme/p4.yaml:1:1: parse budget exceeded: tenant "
                                       "'acme' spent its 2.5 s parse budget (3.0 s) before this spec; split or simplify your specs")
    assert "split or simplify your specs" in stand_in.doc_md
    assert stand_in.task_ids == ["spec_error"]


def test_stand_ins_are_capped(platform, monkeypatch):
    import mlplatform.factory.budget as budget

    for i in range(8):
        write_spec(platform.specs_dir, "acme", f"p{i}", "kind: x\n")
    monkeypatch.setattr(budget, "MAX_STAND_INS", 3)
    dags = _load(monkeypatch, "acme", MLPLATFORM_TENANT_PARSE_BUDGET="0.000001")
    assert sorted(dags) == ["acme__p0", "acme__p1", "acme__p2"]  # past the cap: no DAG (and no timeout)


def test_budget_off_and_default(platform, monkeypatch):
    from mlplatform.config import load_config
    from mlplatform.factory.budget import budget_seconds, default_budget_seconds

    assert default_budget_seconds() == 10.0  # Airflow's defaults: min(30 s / 3, 50 s / 5)
    monkeypatch.setenv("AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT", "12")
    assert default_budget_seconds() == 4.0
    for value, expected in (("", 4.0), ("off", 0.0), ("0", 0.0), ("2.5", 2.5), ("nonsense", 4.0), ("-1", 4.0)):
        monkeypatch.setenv("MLPLATFORM_TENANT_PARSE_BUDGET", value)
        assert budget_seconds(load_config()) == expected, value


def test_tenant_file_reads_only_its_own_tenant_and_specs(platform, monkeypatch):
    """acme's DAG file never reads globex's tenant file or specs, and carries no other tenant's DAG id."""
    import mlplatform.spec.loader as spec_loader

    copy_example_specs(platform.specs_dir)
    write_spec(platform.specs_dir, "acme", "misfiled", "apiVersion: mlplatform.io/v1\nkind: Pipeline\n"
               "metadata: {name: misfiled, tenant: globex}\nspec:\n  data: {source: globex/accounts, entity: a, "
               "timestamp: t, label: y}\n  training: {framework: sklearn}\n")
    read: list[str] = []
    real = spec_loader.load_file
    monkeypatch.setattr(spec_loader, "load_file", lambda path, *a, **k: read.append(Path(path).name) or real(path, *a, **k))
    dags = _load(monkeypatch, "acme")
    assert set(dags) == {d for d in HEALTHY if d.startswith("acme__")} | {"acme__misfiled"}
    assert "globex.yaml" not in read and "upsell.yaml" not in read and read.count("acme.yaml") == 1
    assert "does not match the folder 'acme'" in dags["acme__misfiled"].description
    assert "unknown tenant" not in dags["acme__misfiled"].doc_md


def test_unassigned_file_covers_folders_without_a_tenant_dag_file(platform, monkeypatch, tmp_path):
    from mlplatform.factory.unassigned import load_unassigned_dags
    from mlplatform.tenants.dagfiles import write_dagfiles

    copy_example_specs(platform.specs_dir)
    write_spec(platform.specs_dir, "acne", "typo", "apiVersion: mlplatform.io/v1\nkind: Pipeline\n"
               "metadata: {name: typo, tenant: acne}\nspec:\n  data: {source: acne/x, entity: a, timestamp: t, "
               "label: y}\n  training: {framework: sklearn}\n")
    dag_folder = tmp_path / "dags"
    write_dagfiles(["acme"], dag_folder)  # globex's DAG file is missing
    dags = {d.dag_id: d for d in load_unassigned_dags(dag_folder / "mlplatform_unassigned.py").values()}
    assert set(dags) == {"acne__typo", "globex__upsell"}
    assert "unknown tenant 'acne'; did you mean 'acme'?" in dags["acne__typo"].description
    assert "tenant 'globex' has no DAG file (tenant_globex.py" in dags["globex__upsell"].description
    assert all(d.is_paused_upon_creation and d.task_ids == ["spec_error"] for d in dags.values())
    write_dagfiles(["acme", "globex"], dag_folder)
    assert set(load_unassigned_dags(dag_folder / "mlplatform_unassigned.py")) == {"acne__typo"}


def test_task_worker_parses_only_its_own_spec_in_the_tenant_file(platform, monkeypatch):
    """The parsing context (task worker): the tenant's file builds that DAG's spec only; another tenant's
    file builds nothing."""
    copy_example_specs(platform.specs_dir)
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "acme__churn-xgb")
    assert set(_load(monkeypatch, "acme")) == {"acme__churn-xgb", "acme__churn-xgb__monitor", "acme__deployments"}
    assert _load(monkeypatch, "globex") == {}


# ------------------------------------------------------------------------------------------- the files


def test_committed_dag_files_match_the_tenant_files():
    out = subprocess.run([CLI, "dagfiles", "--check"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (REPO / "dags" / "mlplatform_pipelines.py").exists()  # the all-tenants file would define every id twice
    for path in (REPO / "dags").glob("*.py"):  # Airflow skips a file whose text lacks "airflow" and "dag"
        assert "airflow" in path.read_text().lower() and "dag" in path.read_text().lower(), path


def test_dagfiles_writes_checks_and_removes_only_its_own(tmp_path):
    from mlplatform.tenants.dagfiles import write_dagfiles

    folder = tmp_path / "dags"
    env = {**os.environ, "MLPLATFORM_DAGS_DIR": str(folder)}
    check = subprocess.run([CLI, "dagfiles", "--check"], capture_output=True, text=True, env=env)
    assert check.returncode == 1 and "create    dag-file   acme" in check.stdout and not folder.exists()
    assert "run `mlplatform dagfiles`" in check.stderr
    write = subprocess.run([CLI, "dagfiles"], capture_output=True, text=True, env=env)
    assert write.returncode == 0, write.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["mlplatform_unassigned.py", "tenant_acme.py", "tenant_globex.py"]
    assert "load_dags(tenant='acme')" in (folder / "tenant_acme.py").read_text()
    (folder / "tenant_gone.py").write_text((folder / "tenant_acme.py").read_text().replace("acme", "gone"))
    (folder / "tenant_custom.py").write_text("# a platform engineer's own file\n")
    changes = [str(c) for c in write_dagfiles(["acme", "globex"], folder)]
    assert any(c.startswith("delete    dag-file   gone") for c in changes), changes
    assert not (folder / "tenant_gone.py").exists() and (folder / "tenant_custom.py").exists()
    assert subprocess.run([CLI, "dagfiles", "--check"], capture_output=True, text=True, env=env).returncode == 0


def test_lint_names_a_tenant_without_its_dag_file(tmp_path):
    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / "tenant_acme.py").write_text("# Generated by `mlplatform dagfiles`\n")
    out = subprocess.run([CLI, "lint"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "MLPLATFORM_DAGS_DIR": str(folder)})
    assert out.returncode == 1
    assert out.stdout.startswith("include/tenants/globex.yaml:1:1: tenant 'globex' has no DAG file "), out.stdout
    assert "mlplatform dagfiles" in out.stdout and "acme" not in out.stdout


def test_bundles_use_the_same_loader():
    from mlplatform.tenants.bundles import GENERATED_BY
    from mlplatform.tenants.dagfiles import loader_source

    bundle, dagfile = loader_source("acme", GENERATED_BY), loader_source("acme")
    assert bundle.splitlines()[1:] == dagfile.splitlines()[1:]
    assert bundle.startswith("# Generated by `mlplatform sync`")
