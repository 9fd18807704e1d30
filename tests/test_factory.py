"""The factory: DAG shape per template, pools and slots, the trigger form, broken-spec stand-ins."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, copy_example_specs, write_spec
from mlplatform.factory.build import build_all, drift_asset
from mlplatform.spec.loader import load_catalog

STANDARD = ["validate", "features", "train", "evaluate", "register", "canary_deploy", "drift_monitor"]


@pytest.fixture
def dags(platform):
    copy_example_specs(platform.specs_dir)
    return build_all(load_catalog(platform), platform)


def test_every_example_spec_becomes_a_dag(dags):
    assert sorted(dags) == ["acme__churn-baseline", "acme__churn-baseline__monitor", "acme__churn-xgb",
                            "acme__churn-xgb__monitor", "acme__deployments", "globex__upsell", "globex__upsell__monitor"]


def test_standard_template_is_a_seven_stage_chain(dags):
    dag = dags["acme__churn-xgb"]
    assert [t.task_id for t in dag.topological_sort()] == STANDARD
    for up, down in zip(STANDARD, STANDARD[1:]):
        assert dag.get_task(down).upstream_task_ids == {up}
    assert dag.get_task("drift_monitor").trigger_rule == "none_failed"


def test_batch_template_has_no_canary(dags):
    assert "canary_deploy" not in dags["globex__upsell"].task_ids
    assert dags["globex__upsell"].get_task("drift_monitor").upstream_task_ids == {"register"}


def test_dag_metadata(dags):
    dag = dags["acme__churn-xgb"]
    assert {"mlplatform", "tenant:acme", "template:standard-v1", "churn"} <= set(dag.tags)
    assert dag.owner == "ml-acme@example.com"
    assert dag.max_active_runs == 2
    assert "acme / churn-xgb" in dag.doc_md and "roc_auc" in dag.doc_md
    assert dags["globex__upsell"].max_active_runs == 1


def test_gpu_train_task_takes_gpu_pool_slots(dags):
    train = dags["acme__churn-xgb"].get_task("train")
    assert (train.pool, train.pool_slots) == ("acme__gpu", 1)
    cpu_train = dags["acme__churn-baseline"].get_task("train")
    assert (cpu_train.pool, cpu_train.pool_slots) == ("acme__cpu", 1)
    assert all(t.pool == "acme__cpu" for t in dags["acme__churn-xgb"].tasks if t.task_id != "train")
    assert all(t.pool.startswith("globex__") for t in dags["globex__upsell"].tasks)


def test_schedule_is_cron_or_drift_asset(dags):
    from airflow.sdk import AssetOrTimeSchedule

    timetable = dags["acme__churn-xgb"].timetable
    assert isinstance(timetable, AssetOrTimeSchedule)
    assert timetable.asset_condition == drift_asset("acme", "churn-xgb")
    assert dags["acme__churn-xgb"].get_task("drift_monitor").outlets == []  # the monitor DAG emits, with cooldowns
    monitor = dags["acme__churn-xgb__monitor"]
    assert [o.name for t in monitor.tasks for o in t.outlets] == ["acme__churn-xgb__drift__monitor"]


def test_trigger_form_params(dags):
    params = dags["acme__churn-xgb"].params
    assert set(params.keys()) == {"as_of", "skip_canary", "hp_max_depth", "hp_n_estimators"}
    depth = params.get_param("hp_max_depth")
    assert depth.value == 4 and depth.schema["minimum"] == 2 and depth.schema["maximum"] == 10
    assert depth.schema["type"] == "integer"
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        depth.resolve(11)
    assert params.get_param("skip_canary").resolve(True) is True
    with pytest.raises(ParamValidationError):
        params.get_param("as_of").resolve("yesterday")


def test_broken_spec_becomes_paused_stand_in_and_others_survive(platform):
    copy_example_specs(platform.specs_dir)
    write_spec(platform.specs_dir, "globex", "broken", "apiVersion: mlplatform.io/v1\nkind: Pipeline\nmetadata: [\n")
    dags = build_all(load_catalog(platform), platform)
    assert {"acme__churn-xgb", "acme__churn-baseline", "globex__upsell", "globex__broken", "acme__deployments"} <= set(dags)
    stand_in = dags["globex__broken"]
    assert "invalid-spec" in stand_in.tags
    assert stand_in.is_paused_upon_creation is True
    assert stand_in.description.startswith("INVALID SPEC: specs/globex/broken.yaml:")
    assert "invalid YAML" in stand_in.doc_md
    assert stand_in.task_ids == ["spec_error"]


def test_stand_in_task_fails_with_the_lint_errors(platform):
    from airflow.sdk.exceptions import AirflowFailException

    write_spec(platform.specs_dir, "acme", "bad", "kind: Nope\n")
    dags = build_all(load_catalog(platform), platform)
    with pytest.raises(AirflowFailException, match=r"specs/acme/bad.yaml:1:1"):
        dags["acme__bad"].get_task("spec_error").execute({})


def test_loader_imports_no_ml_library():
    """Parsing the DAG folder must not import GX, Feast, MLflow, Evidently, sklearn, xgboost or pandas."""
    code = (
        "import glob, runpy, sys; [runpy.run_path(f) for f in sorted(glob.glob('dags/*.py'))]; "
        "heavy = ['great_expectations', 'feast', 'mlflow', 'evidently', 'sklearn', 'xgboost', 'pandas', "
        "'torch', 'kubernetes', 'airflow.providers.cncf.kubernetes.operators.pod', 'fastapi', 'pyarrow']; "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_json_schemas_are_up_to_date():
    from mlplatform.spec.schema import SCHEMAS, schema_text

    for name, model in SCHEMAS.items():
        committed = (REPO / "include" / "schema" / name).read_text()
        assert committed == schema_text(model), f"run `mlplatform schema` to refresh include/schema/{name}"
    schema = json.loads((REPO / "include" / "schema" / "pipeline-v1.schema.json").read_text())
    assert "apiVersion" in schema["properties"]


def test_task_worker_parses_only_its_own_spec(platform, monkeypatch):
    """With Airflow's parsing context set (as in a task worker), only that DAG's spec is read and built."""
    from mlplatform.factory.loader import load_dags

    copy_example_specs(platform.specs_dir)
    write_spec(platform.specs_dir, "globex", "broken", "kind: [\n")
    everything = {"acme__churn_xgb", "acme__churn_baseline", "globex__upsell", "globex__broken", "acme__deployments",
                  "acme__churn_xgb__monitor", "acme__churn_baseline__monitor", "globex__upsell__monitor"}
    assert set(load_dags()) == everything
    own = {"acme__churn_xgb", "acme__churn_xgb__monitor", "acme__deployments"}
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "acme__churn-xgb")
    assert set(load_dags()) == own
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "acme__churn-xgb__monitor")
    assert set(load_dags()) == own
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "acme__deployments")
    assert set(load_dags()) == {n for n in everything if n.startswith("acme__")}
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "globex__broken")
    assert set(load_dags()) == {"globex__broken"}
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "someone__elses_dag")
    assert set(load_dags()) == everything


def test_standalone_gateway_makes_canary_bakes_deferrable(platform, monkeypatch):
    """With MLPLATFORM_GATEWAY_URL the gateway-target canary defers its bakes; kserve and the default do not."""
    import dataclasses

    from mlplatform.operators.canary import DeferrableCanaryDeployOperator
    from mlplatform.operators.stages import CanaryDeployOperator

    copy_example_specs(platform.specs_dir)
    catalog = load_catalog(platform)
    assert type(build_all(catalog, platform)["acme__churn-xgb"].get_task("canary_deploy")) is CanaryDeployOperator
    standalone = dataclasses.replace(platform, gateway_url="http://127.0.0.1:8000")
    task = build_all(catalog, standalone)["acme__churn-xgb"].get_task("canary_deploy")
    assert type(task) is DeferrableCanaryDeployOperator
    assert task.execute_complete.__name__ == "execute_complete"


def test_unknown_trigger_conf_keys_fail_the_run_at_once_with_the_accepted_keys(dags):
    """Issue 12: a typo in a trigger conf (hp_max_dept) fails the first task instead of being ignored; the
    control and monitor DAGs accept exactly their own params."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from mlplatform.operators.base import check_conf_keys

    def context(conf):
        return {"dag_run": SimpleNamespace(conf=conf), "params": conf, "run_id": "manual__x"}

    validate = dags["acme__churn-xgb"].get_task("validate")
    with pytest.raises(AirflowFailException) as exc:
        validate.run_context(context({"as_of": "2026-11-01", "hp_max_dept": 7}))
    assert str(exc.value) == (
        "unknown trigger conf key(s) 'hp_max_dept' (did you mean 'hp_max_depth'?) for acme__churn-xgb: accepted "
        "keys are as_of, hp_max_depth, hp_n_estimators, skip_canary; the run does not start with a setting it "
        "would ignore")
    ctx = validate.run_context(context({"as_of": "2026-11-01", "hp_max_depth": 7, "skip_canary": True}))
    assert ctx.as_of == "2026-11-01"
    validate.run_context(context({}))  # scheduled and asset-triggered runs carry no conf
    validate.run_context({"params": {}, "run_id": "scheduled__x"})
    control = dags["acme__deployments"].get_task("apply_action")
    check_conf_keys(control, context({"pipeline": "churn-xgb", "action": "abort", "reason": "bad canary"}))
    with pytest.raises(AirflowFailException, match="'actoin' .*accepted keys are action, pipeline, reason"):
        check_conf_keys(control, context({"pipeline": "churn-xgb", "actoin": "abort"}))
    for task in dags["acme__churn-xgb__monitor"].tasks:
        check_conf_keys(task, context({"as_of": "2026-11-01"}))
        with pytest.raises(AirflowFailException, match="accepted keys are as_of"):
            check_conf_keys(task, context({"asof": "2026-11-01"}))
