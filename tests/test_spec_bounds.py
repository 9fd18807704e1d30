"""Bounds from the platform, not the spec (issue 11, item 2; NaN at run time from item 6).

Every finding of the issue on the real loader (``load_catalog``) and the real ``mlplatform lint`` (which also
builds each DAG), with its exact ``file:line:col: field``; the run-time re-check of hyperparameters; the local
trainer process under the CPU and memory limits of ``training.resources``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, write_spec
from mlplatform.spec.loader import load_catalog

CLI = str(Path(sys.executable).parent / "mlplatform")

# Block style, so every field of interest starts a line: the expected columns below are those of the keys.
BASE = """\
apiVersion: mlplatform.io/v1
kind: Pipeline
metadata: {name: mini, tenant: acme}
spec:
  data: {source: acme/churn, entity: customer_id, timestamp: event_timestamp, label: churned}
"""


def _messages(platform, body: str, tenant: str = "acme") -> list[str]:
    text = BASE.replace("tenant: acme", f"tenant: {tenant}") + body
    write_spec(platform.specs_dir, tenant, "mini", text)
    catalog = load_catalog(platform)
    assert not catalog.specs, "expected the spec to be refused"
    return [str(p) for p in catalog.broken[0].problems]


XGB = "  training:\n    framework: xgboost\n    hyperparameters:\n"

# (case id, spec body after line 5, expected "file:line:col: field: message" fragment)
FINDINGS = [
    ("n_estimators-1e9-text", XGB + "      n_estimators: 1e9\n",
     "mini.yaml:9:7: spec.training.hyperparameters.n_estimators: '1e9' is not a number: xgboost n_estimators takes "
     "an integer in [1, 2000]"),
    ("n_estimators-1e9-float", XGB + "      n_estimators: 1.0e+9\n",
     "mini.yaml:9:7: spec.training.hyperparameters.n_estimators: 1000000000 is outside the platform's range [1, 2000] "
     "for xgboost n_estimators"),
    ("max_depth-10000", XGB + "      max_depth: 10000\n",
     "mini.yaml:9:7: spec.training.hyperparameters.max_depth: 10000 is outside the platform's range [1, 16] for "
     "xgboost max_depth"),
    ("rf-max_depth-10000", "  training:\n    framework: sklearn\n    model: random_forest\n"
     "    hyperparameters: {max_depth: 10000}\n",
     "mini.yaml:9:23: spec.training.hyperparameters.max_depth: 10000 is outside the platform's range [1, 64] for "
     "sklearn random_forest max_depth"),
    ("n_jobs--1", XGB + "      n_jobs: -1\n",
     "mini.yaml:9:7: spec.training.hyperparameters.n_jobs: 'n_jobs' is set by the platform, not the spec: thread "
     "counts follow spec.training.resources.cpu"),
    ("rf-n_jobs", "  training:\n    framework: sklearn\n    model: random_forest\n    hyperparameters: {n_jobs: 64}\n",
     "mini.yaml:9:23: spec.training.hyperparameters.n_jobs: 'n_jobs' is set by the platform"),
    ("nthread", XGB + "      nthread: 64\n", "mini.yaml:9:7: spec.training.hyperparameters.nthread: 'nthread' is set by "
     "the platform, not the spec: thread counts follow spec.training.resources.cpu"),
    ("device-cuda-gpu-0", XGB + "      device: cuda\n    resources: {gpu: 0}\n",
     "mini.yaml:9:7: spec.training.hyperparameters.device: 'device' is set by the platform, not the spec: the training "
     "device follows spec.training.resources.gpu (cuda when gpu > 0, else cpu)"),
    ("gpu-tree-method", XGB + "      tree_method: gpu_hist\n",
     "mini.yaml:9:7: spec.training.hyperparameters.tree_method: 'gpu_hist' is not allowed: xgboost tree_method takes "
     "one of 'hist', 'approx' (GPU training follows spec.training.resources.gpu"),
    ("unknown-did-you-mean", XGB + "      n_estimator: 100\n",
     "mini.yaml:9:7: spec.training.hyperparameters.n_estimator: unknown hyperparameter 'n_estimator' for xgboost; "
     "did you mean 'n_estimators'? (allowed: booster, colsample_bylevel,"),
    ("sklearn-name-for-xgboost", XGB + "      min_samples_leaf: 5\n",
     "mini.yaml:9:7: spec.training.hyperparameters.min_samples_leaf: unknown hyperparameter 'min_samples_leaf' for "
     "xgboost"),
    ("nan-in-spec", XGB + "      learning_rate: .nan\n",
     "mini.yaml:9:7: spec.training.hyperparameters.learning_rate: nan is not a finite number: xgboost learning_rate "
     "takes a number in [0.0001, 1]"),
    ("pytorch-float-epochs", "  training:\n    framework: pytorch\n    hyperparameters: {epochs: 3.5}\n",
     "mini.yaml:8:23: spec.training.hyperparameters.epochs: 3.5 is not an integer: pytorch epochs takes an integer "
     "in [1, 1000]"),
    ("tunable-outside-platform", XGB + "      max_depth: 4\n    tunable:\n      max_depth: {min: 2, max: 100}\n",
     "mini.yaml:11:7: spec.training.tunable.max_depth: tunable range [2, 100] of max_depth is outside the platform's "
     "range [1, 16] for xgboost max_depth"),
    ("tunable-inf", XGB + "      learning_rate: 0.1\n    tunable:\n      learning_rate: {min: 0.01, max: .inf}\n",
     "mini.yaml:11:7: spec.training.tunable.learning_rate: tunable bounds [0.01, inf] must be finite numbers"),
    ("tunable-choice-outside", XGB + "      tree_method: hist\n    tunable:\n      tree_method: {choices: [hist, gpu_hist]}\n",
     "mini.yaml:11:37: spec.training.tunable.tree_method.choices[1]: 'gpu_hist' is not allowed"),
    ("timeout-36500d", "  training:\n    timeout: 36500d\n",
     "mini.yaml:7:5: spec.training.timeout: '36500d' is above the platform's limit of 3650d for any duration"),
    ("timeout-overflow", "  training:\n    timeout: 99999999999999s\n",
     "mini.yaml:7:5: spec.training.timeout: '99999999999999s' is above the platform's limit of 3650d for any duration"),
    ("timeout-above-tenant", "  training:\n    timeout: 48h\n",
     "mini.yaml:7:5: spec.training.timeout: timeout 48h is above the limit of tenant 'acme': 24h "
     "(max_training_timeout in the tenant file)"),
    ("every-minute", "  schedule: '* * * * *'\n",
     "mini.yaml:6:3: spec.schedule: '* * * * *' runs 1m apart at the closest; tenant 'acme' allows runs at least 1h "
     "apart (min_schedule_interval in the tenant file)"),
    ("two-runs-a-minute-apart", "  schedule: '59 23 * * *'\n  monitoring:\n    schedule: '0,59 0,23 * * *'\n",
     "mini.yaml:8:5: spec.monitoring.schedule: '0,59 0,23 * * *' runs 1m apart at the closest"),
    ("monitoring-every-30m", "  monitoring:\n    schedule: '*/30 * * * *'\n",
     "mini.yaml:7:5: spec.monitoring.schedule: '*/30 * * * *' runs 30m apart at the closest"),
    ("monitoring-continuous", "  monitoring:\n    schedule: '@continuous'\n",
     "mini.yaml:7:5: spec.monitoring.schedule: schedule preset '@continuous' is not allowed for tenant 'acme' "
     "(allowed: @once, @hourly, @daily, @weekly, @monthly, @quarterly, @yearly, @annually"),
    ("schedule-continuous", "  schedule: '@continuous'\n  monitoring: {retrain_on_drift: false}\n",
     "mini.yaml:6:3: spec.schedule: schedule preset '@continuous' is not allowed for tenant 'acme'"),
    ("never-fires", "  schedule: '0 0 31 2 *'\n", "mini.yaml:6:3: spec.schedule: '0 0 31 2 *' never fires"),
    ("kserve-cpu", "  deployment:\n    target: kserve\n    resources:\n      cpu: '64'\n",
     "mini.yaml:9:7: spec.deployment.resources.cpu: cpu 64 is above the tenant's per-task limit 8"),
    ("kserve-memory", "  deployment:\n    target: kserve\n    resources:\n      memory: 1Ti\n",
     "mini.yaml:9:7: spec.deployment.resources.memory: memory 1Ti is above the tenant's per-task limit 32Gi"),
    ("kserve-gpu", "  deployment:\n    target: kserve\n    resources:\n      gpu: 8\n",
     "mini.yaml:9:7: spec.deployment.resources.gpu: 8 GPUs per replica but tenant 'acme' has a quota of 2"),
    ("kserve-min-replicas", "  deployment:\n    target: kserve\n    min_replicas: 50\n    max_replicas: 60\n",
     "mini.yaml:8:5: spec.deployment.min_replicas: min_replicas 50 is above the limit of tenant 'acme': 10 serving "
     "replicas (max_serving_replicas in the tenant file)"),
    ("kserve-max-replicas", "  deployment:\n    target: kserve\n    max_replicas: 100\n",
     "mini.yaml:8:5: spec.deployment.max_replicas: max_replicas 100 is above the limit of tenant 'acme'"),
    ("huge-cpu-quantity", "  training:\n    resources: {cpu: '" + "9" * 400 + "'}\n",
     "mini.yaml:7:17: spec.training.resources.cpu: '999999999999"),
    ("huge-memory-quantity", "  training:\n    resources: {memory: " + "9" * 400 + "Gi}\n",
     "mini.yaml:7:17: spec.training.resources.memory: '999999999999"),
]


@pytest.mark.parametrize("case_id,body,expected", FINDINGS, ids=[f[0] for f in FINDINGS])
def test_finding_is_a_lint_error_at_its_line(platform, case_id, body, expected):
    messages = _messages(platform, body)
    assert any(m.startswith("specs/acme/") and expected in m for m in messages), messages


def _many(n: int, line: str) -> str:
    return "".join(line.format(i=i) for i in range(n))


CAPS = [
    ("33-hyperparameters", "  training:\n    hyperparameters:\n" + _many(33, "      p{i}: 1\n"),
     "mini.yaml:7:5: spec.training.hyperparameters: Dictionary should have at most 32 items"),
    ("11-tunables", "  training:\n    tunable:\n" + _many(11, "      p{i}: {{min: 0, max: 1}}\n"),
     "mini.yaml:7:5: spec.training.tunable: Dictionary should have at most 10 items"),
    ("51-expectations", "  validation:\n    expectations:\n"
     + _many(51, "      - {{type: expect_column_values_to_not_be_null, kwargs: {{column: customer_id}}}}\n"),
     "mini.yaml:7:5: spec.validation.expectations: List should have at most 50 items"),
    ("21-views", "  features:\n    views:\n" + _many(21, "      - {{name: view-{i}, features: [tenure_months]}}\n"),
     "mini.yaml:7:5: spec.features.views: List should have at most 20 items"),
    ("201-features-in-a-view", "  features:\n    views:\n      - name: wide\n        features: ["
     + ", ".join(f"f{i}" for i in range(201)) + "]\n",
     "mini.yaml:9:9: spec.features.views[0].features: List should have at most 200 items"),
    ("501-features", "  data:\n    features: [" + ", ".join(f"f{i}" for i in range(501)) + "]\n",
     "spec.data.features: List should have at most 500 items"),
    ("501-features-over-views", "  features:\n    views:\n" + "".join(
        f"      - {{name: view-{v}, features: [{', '.join(f'f{v}_{i}' for i in range(167))}]}}\n" for v in range(3)),
     "mini.yaml:7:5: spec.features.views: 501 features in all views together; at most 500"),
    ("21-tunable-choices", XGB + "      max_depth: 2\n    tunable:\n      max_depth: {choices: ["
     + ", ".join(str(i) for i in range(1, 22)) + "]}\n",
     "spec.training.tunable.max_depth.choices: List should have at most 20 items"),
]


@pytest.mark.parametrize("case_id,body,expected", CAPS, ids=[c[0] for c in CAPS])
def test_caps(platform, case_id, body, expected):
    if case_id == "501-features":  # data.features replaces the one-line data mapping of BASE
        text = BASE.replace("  data: {source: acme/churn, entity: customer_id, timestamp: event_timestamp, "
                            "label: churned}\n", "") + "  data:\n    source: acme/churn\n    entity: customer_id\n" \
            "    timestamp: event_timestamp\n    label: churned\n" + body.removeprefix("  data:\n")
        write_spec(platform.specs_dir, "acme", "mini", text)
        messages = [str(p) for p in load_catalog(platform).broken[0].problems]
    else:
        messages = _messages(platform, body)
    assert any(expected in m for m in messages), messages


def test_spec_bytes_are_capped_at_64_kib(platform):
    write_spec(platform.specs_dir, "acme", "mini", BASE + "# " + "x" * (65 * 1024) + "\n")
    catalog = load_catalog(platform)
    assert str(catalog.broken[0].problems[0]).startswith("specs/acme/mini.yaml:1:1: file is 65 KiB, larger than 64 KiB")


def test_the_examples_and_the_largest_capped_spec_stay_valid(platform):
    """The caps leave room for a real spec: the examples, and every cap at its maximum at once."""
    feats = [f"feature_{i:03d}" for i in range(500)]
    body = ("  schedule: '0 3 * * *'\n  data:\n    source: acme/churn\n    entity: customer_id\n"
            "    timestamp: event_timestamp\n    label: churned\n    features: [" + ", ".join(feats) + "]\n"
            "  validation:\n    expectations:\n"
            + _many(50, "      - {{type: expect_column_values_to_not_be_null, kwargs: {{column: feature_000}}}}\n")
            + "  features:\n    views:\n" + "".join(
                f"      - {{name: view-{v}, features: [{', '.join(feats[v * 25:(v + 1) * 25])}]}}\n" for v in range(20))
            + "  training:\n    framework: xgboost\n    timeout: 24h\n    hyperparameters: {n_estimators: 2000, "
            "max_depth: 16, learning_rate: 0.0001, subsample: 1.0, tree_method: approx}\n"
            "    tunable:\n      n_estimators: {min: 1, max: 2000}\n      learning_rate: {min: 0.0001, max: 1}\n"
            "      tree_method: {choices: [hist, approx]}\n"
            "  deployment: {target: kserve, min_replicas: 10, max_replicas: 10, resources: {cpu: '8', memory: 32Gi}}\n"
            "  monitoring:\n    schedule: '@hourly'\n    columns:\n" + "".join(f"      {f}: {{method: psi}}\n" for f in feats))
    text = BASE.replace("  data: {source: acme/churn, entity: customer_id, timestamp: event_timestamp, "
                        "label: churned}\n", "") + body
    assert len(text.encode()) < 64 * 1024
    write_spec(platform.specs_dir, "acme", "mini", text)
    shutil.copytree(REPO / "dags" / "specs", platform.specs_dir, dirs_exist_ok=True)
    catalog = load_catalog(platform)
    assert catalog.problems == []
    assert len(catalog.specs) == 4


# ----------------------------------------------------------------------------------------- tenant limits


def _tenants_dir(tmp_path: Path, **quotas) -> Path:
    """The repo's tenant files, with extra quota keys for acme."""
    import yaml

    folder = tmp_path / "tenants"
    shutil.copytree(REPO / "include" / "tenants", folder)
    doc = yaml.safe_load((folder / "acme.yaml").read_text())
    doc["spec"]["quotas"].update(quotas)
    (folder / "acme.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


def test_tenant_file_sets_its_own_limits(platform, tmp_path, monkeypatch):
    import dataclasses

    tenants = _tenants_dir(tmp_path, max_training_timeout="3650d", min_schedule_interval="5m",
                           schedule_presets=["@daily", "@continuous"], max_serving_replicas=50)
    config = dataclasses.replace(platform, tenants_dir=tenants)
    write_spec(platform.specs_dir, "acme", "mini", BASE + "  schedule: '*/5 * * * *'\n  training: {timeout: 3650d}\n"
               "  deployment: {target: kserve, min_replicas: 50, max_replicas: 50}\n"
               "  monitoring: {schedule: '@continuous'}\n")
    catalog = load_catalog(config)
    assert catalog.problems == [] and len(catalog.specs) == 1
    from mlplatform.factory.check import build_problems

    assert build_problems(catalog, config) == []  # the longest timeout the platform allows builds (no overflow)

    write_spec(platform.specs_dir, "acme", "mini", BASE + "  schedule: '*/4 * * * *'\n  monitoring: {schedule: '@hourly'}\n")
    messages = [str(p) for p in load_catalog(config).broken[0].problems]
    assert messages == [
        "specs/acme/mini.yaml:6:3: spec.schedule: '*/4 * * * *' runs 4m apart at the closest; tenant 'acme' allows "
        "runs at least 5m apart (min_schedule_interval in the tenant file)",
        "specs/acme/mini.yaml:7:16: spec.monitoring.schedule: schedule preset '@hourly' is not allowed for tenant "
        "'acme' (allowed: @daily, @continuous; the platform team sets schedule_presets in the tenant file)",
    ]


def test_bad_tenant_limits_are_platform_problems(platform, tmp_path):
    import dataclasses

    tenants = _tenants_dir(tmp_path, min_schedule_interval="often", schedule_presets=["@sometimes"])
    catalog = load_catalog(dataclasses.replace(platform, tenants_dir=tenants))
    messages = [str(p) for p in catalog.platform_problems]
    assert any("acme.yaml:" in m and "spec.quotas.min_schedule_interval: 'often' is not a duration" in m for m in messages)
    assert any("acme.yaml:" in m and "spec.quotas.schedule_presets[0]: '@sometimes' is not allowed" in m for m in messages)


def test_broken_platform_bounds_file_fails_closed(platform, tmp_path, monkeypatch):
    bad = tmp_path / "bounds.yaml"
    bad.write_text((REPO / "include" / "platform" / "bounds.yaml").read_text().replace("  pytorch:", "  torch:"))
    monkeypatch.setenv("MLPLATFORM_BOUNDS_FILE", str(bad))
    write_spec(platform.specs_dir, "acme", "mini", BASE)
    catalog = load_catalog(platform)
    assert not catalog.specs
    assert "platform bounds unavailable" in str(catalog.broken[0].problems[0])
    assert "hyperparameters must list exactly xgboost" in str(catalog.broken[0].problems[0])


def test_min_cron_gap():
    from mlplatform.spec.bounds import min_cron_gap

    assert min_cron_gap("* * * * *") == 60
    assert min_cron_gap("*/7 * * * *") == 4 * 60  # :56 -> :00 of the next hour
    assert min_cron_gap("0 3 * * *") == 86400
    assert min_cron_gap("59 23 * * 1,2") == 86400
    assert min_cron_gap("0,59 0,23 * * *") == 60  # 23:59 -> 00:00 next day
    assert min_cron_gap("30 2 * * 1-5") == 86400
    assert min_cron_gap("0 0 * * 0") == 7 * 86400
    assert min_cron_gap("0 0 L * *") == 28 * 86400  # Jan 31 -> Feb 28
    assert min_cron_gap("0 0 1 1 *") == 365 * 86400
    assert min_cron_gap("0 0 31 2 *") is None


# ----------------------------------------------------------------------------- lint builds every DAG


def _lint(env_extra: dict, *files: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([CLI, "lint", *map(str, files)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_lint_reports_the_unbuildable_specs_of_the_issue(tmp_path):
    """Both were lint-clean and failed at DAG build. With default limits they are refused by the bounds; with a
    tenant that allows @continuous the continuous-and-max_active_runs-2 DAG is caught by lint's build step."""
    specs = tmp_path / "specs"
    env = {"MLPLATFORM_SPECS_DIR": str(specs), "MLPLATFORM_HOME": str(tmp_path / "home")}
    overflow = write_spec(specs, "acme", "overflow", BASE.replace("name: mini", "name: overflow")
                          + "  training:\n    timeout: 99999999999999s\n")
    continuous = write_spec(specs, "acme", "continuous", BASE.replace("name: mini", "name: continuous")
                            + "  schedule: '@continuous'\n  monitoring: {retrain_on_drift: false}\n")
    out = _lint(env, overflow, continuous)
    assert out.returncode == 1
    lines = out.stdout.strip().splitlines()
    assert "specs/acme/overflow.yaml:7:5: spec.training.timeout: '99999999999999s' is above the platform's limit of " \
           "3650d for any duration" in lines, lines
    assert any(line.startswith("specs/acme/continuous.yaml:6:3: spec.schedule: schedule preset '@continuous' is not "
                               "allowed for tenant 'acme'") for line in lines), lines

    tenants = _tenants_dir(tmp_path, schedule_presets=["@daily", "@continuous"])  # acme: max_active_runs 2
    out = _lint({**env, "MLPLATFORM_TENANTS_DIR": str(tenants)}, continuous)
    assert out.returncode == 1
    assert out.stdout.strip().splitlines() == [
        "specs/acme/continuous.yaml:6:3: spec.schedule: the DAG acme__continuous cannot be built: ValueError: "
        "Invalid max_active_runs: ContinuousTimetable requires max_active_runs <= 1"], out.stdout + out.stderr
    assert "1 spec(s) checked, 1 problem(s) in 1 file(s)" in out.stderr


def test_dag_the_dag_processor_would_refuse_is_a_stand_in_at_parse_time(platform, tmp_path):
    """The DAG file runs the same checks: such a spec becomes its stand-in with the line, not an import error."""
    import dataclasses

    from mlplatform.factory.build import build_all

    config = dataclasses.replace(platform, tenants_dir=_tenants_dir(tmp_path, schedule_presets=["@continuous"]))
    write_spec(platform.specs_dir, "acme", "mini", BASE + "  schedule: '@continuous'\n"
               "  monitoring: {retrain_on_drift: false, schedule: '@continuous'}\n")
    catalog = load_catalog(config)
    assert catalog.problems == []
    dags = build_all(catalog, config)
    stand_in = dags["acme__mini"]
    assert "invalid-spec" in stand_in.tags and stand_in.task_ids == ["spec_error"]
    assert stand_in.description.startswith("INVALID SPEC: specs/acme/mini.yaml:6:3: spec.schedule: the DAG acme__mini "
                                           "cannot be built: ValueError: Invalid max_active_runs: ContinuousTimetable")
    assert "acme__mini__monitor" not in dags  # not built for a spec that failed


def test_build_problems_map_to_the_spec_line(platform):
    """Any failure of the real factory or of DagBag's checks becomes a problem with file:line, never a crash."""
    from unittest import mock

    from mlplatform.factory import check

    write_spec(platform.specs_dir, "acme", "mini", BASE + "  schedule: '0 3 * * *'\n")
    catalog = load_catalog(platform)
    assert check.build_problems(catalog, platform) == []
    overflow = OverflowError("days=1157407407; must have magnitude <= 999999999")
    with mock.patch("mlplatform.factory.build.build_dag", side_effect=overflow):
        assert [str(p) for p in check.build_problems(catalog, platform)] == [
            "specs/acme/mini.yaml:4:1: spec.training.timeout: the DAG acme__mini cannot be built: OverflowError: "
            "days=1157407407; must have magnitude <= 999999999"]
    with mock.patch("mlplatform.factory.monitor.build_monitor_dag", side_effect=RuntimeError("boom")):
        assert [str(p) for p in check.build_problems(catalog, platform)] == [
            "specs/acme/mini.yaml:4:1: spec: the DAG acme__mini__monitor cannot be built: RuntimeError: boom"]


# ------------------------------------------------------------------------------ run-time re-check (item 6)


TUNABLE = BASE + textwrap.indent(textwrap.dedent("""\
    training:
      framework: xgboost
      hyperparameters: {max_depth: 4, learning_rate: 0.1, tree_method: hist}
      tunable:
        max_depth: {min: 2, max: 10}
        learning_rate: {min: 0.01, max: 0.5}
        tree_method: {choices: [hist, approx]}
"""), "  ")


@pytest.fixture
def tunable(platform):
    from mlplatform.factory.build import build_dag

    write_spec(platform.specs_dir, "acme", "mini", TUNABLE)
    catalog = load_catalog(platform)
    assert catalog.problems == []
    loaded = catalog.specs[0]
    return loaded, catalog, build_dag(loaded, catalog, platform)


def _ctx(platform, loaded, catalog, params: dict):
    from mlplatform.stages.context import RunContext

    return RunContext(spec=loaded.spec, tenant=catalog.tenants["acme"], config=platform, run_id="manual__hp",
                      params=params)


def test_nan_passes_airflows_param_check_but_fails_the_run(platform, tunable):
    """A trigger conf is checked by the DAG's Params as Airflow does when it creates the run (the serialized
    DAG's ``params.deep_merge(conf).validate()``): JSON-schema ``minimum``/``maximum`` let NaN through.
    The run-time check refuses it before the trainer starts."""
    from airflow.sdk.exceptions import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    from mlplatform.stages.context import StageFailed
    from mlplatform.stages.train_local import run_local_trainer

    loaded, catalog, dag = tunable
    server_dag = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    conf = json.loads('{"hp_learning_rate": NaN}')
    resolved = server_dag.params.deep_merge(conf).validate()
    assert math.isnan(resolved["hp_learning_rate"])  # Airflow accepted it
    with pytest.raises(ParamValidationError):
        server_dag.params.deep_merge(json.loads('{"hp_learning_rate": Infinity}')).validate()

    ctx = _ctx(platform, loaded, catalog, resolved)
    message = "acme__mini: hyperparameter learning_rate=nan from the trigger form is not a finite number"
    with pytest.raises(StageFailed, match=message):
        ctx.hyperparameters()
    features = {"train_path": "t.parquet", "holdout_path": "h.parquet", "feature_columns": ["a"], "fingerprint": "x"}
    with pytest.raises(StageFailed, match=message):  # the train stage fails with it, the trainer never starts
        run_local_trainer(ctx, features)
    assert not (ctx.artifact_dir / "train" / "result.json").exists()


@pytest.mark.parametrize(("params", "message"), [
    ({"hp_learning_rate": float("inf")}, "learning_rate=inf from the trigger form is not a finite number"),
    ({"hp_learning_rate": 0.9}, "learning_rate=0.9 from the trigger form is outside its tunable range [0.01, 0.5]"),
    ({"hp_max_depth": 50}, "max_depth=50 from the trigger form is outside its tunable range [2, 10]"),
    ({"hp_max_depth": 3.5}, "hyperparameter max_depth: 3.5 is not an integer: xgboost max_depth takes an integer"),
    ({"hp_max_depth": "7"}, "max_depth='7' from the trigger form is not a number"),
    ({"hp_max_depth": True}, "max_depth=True from the trigger form is not a number"),
    ({"hp_tree_method": "gpu_hist"}, "tree_method='gpu_hist' from the trigger form is not one of its tunable choices"),
    ({"hp_tree_method": True}, "tree_method=True from the trigger form is not one of its tunable choices"),
])
def test_run_time_check_refuses_what_the_form_should_have(platform, tunable, params, message):
    from mlplatform.stages.context import StageFailed

    loaded, catalog, _ = tunable
    with pytest.raises(StageFailed, match=message.replace("[", r"\[").replace("]", r"\]")):
        _ctx(platform, loaded, catalog, params).hyperparameters()


def test_run_time_check_keeps_good_overrides(platform, tunable):
    loaded, catalog, _ = tunable
    hp = _ctx(platform, loaded, catalog, {"hp_max_depth": 7.0, "hp_learning_rate": 0.2, "hp_tree_method": "approx",
                                          "hp_unrelated": float("nan"), "as_of": None}).hyperparameters()
    assert hp == {"max_depth": 7, "learning_rate": 0.2, "tree_method": "approx"}
    assert type(hp["max_depth"]) is int


def test_run_time_check_refuses_a_spec_that_skipped_the_loader(platform):
    """A spec object built without the loader (or loaded before the platform narrowed a range) is checked too."""
    from mlplatform.spec.model import PipelineSpec, TenantFile
    from mlplatform.stages.context import RunContext, StageFailed

    spec = PipelineSpec.model_validate({
        "apiVersion": "mlplatform.io/v1", "kind": "Pipeline", "metadata": {"name": "mini", "tenant": "acme"},
        "spec": {"data": {"source": "acme/churn", "entity": "e", "timestamp": "t", "label": "l"},
                 "training": {"framework": "sklearn", "model": "random_forest", "hyperparameters": {"n_jobs": -1}}}})
    tenant = TenantFile.model_validate({
        "apiVersion": "mlplatform.io/v1", "kind": "Tenant", "metadata": {"name": "acme"},
        "spec": {"owner": "o", "namespace": "ml-acme", "quotas": {"gpu_slots": 0, "cpu_slots": 1},
                 "data": {"allowed_prefixes": ["acme/"]}}})
    ctx = RunContext(spec=spec, tenant=tenant, config=platform, run_id="manual__x")
    with pytest.raises(StageFailed, match="hyperparameter n_jobs: 'n_jobs' is set by the platform"):
        ctx.hyperparameters()


# --------------------------------------------------------------------------------- trainer resource limits


FAKE_TRAINERS = {
    # Reports what it was given, like the trainer's result JSON.
    "report": """
import json, os
info = {"affinity": sorted(os.sched_getaffinity(0)), "threads": os.environ.get("MLPLATFORM_CPU_THREADS"),
        "omp": os.environ.get("OMP_NUM_THREADS"), "openblas": os.environ.get("OPENBLAS_NUM_THREADS"),
        "gpus": os.environ.get("MLPLATFORM_GPUS"), "memory": os.environ.get("MLPLATFORM_MEMORY_LIMIT_BYTES")}
import resource
info["rlimit_as"] = resource.getrlimit(resource.RLIMIT_AS)[0]
open(os.environ["MLPLATFORM_RESULT_PATH"], "w").write(json.dumps(info))
""",
    # Grows its resident memory 32 MiB at a time, up to 2 GiB.
    "grow": """
import time
held = []
for i in range(64):
    held.append(b"\\x01" * (32 * 2**20))
    print(f"holding {32 * (i + 1)} MiB", flush=True)
    time.sleep(0.05)
print("still alive", flush=True)
""",
    # One allocation far above the limit.
    "huge": """
print("allocating", flush=True)
block = bytearray(12 * 2**30)
print("still alive", flush=True)
""",
}


@pytest.fixture
def trainer_ctx(platform, monkeypatch, tmp_path):
    def make(kind: str, resources: str):
        from mlplatform.stages import train_local

        script = tmp_path / f"{kind}.py"
        script.write_text(FAKE_TRAINERS[kind])
        monkeypatch.setattr(train_local, "TRAINER", script)
        write_spec(platform.specs_dir, "acme", "mini", BASE + f"  training: {{resources: {resources}}}\n")
        catalog = load_catalog(platform)
        assert catalog.problems == []
        return _ctx(platform, catalog.specs[0], catalog, {})

    return make


FEATURES = {"train_path": "t.parquet", "holdout_path": "h.parquet", "feature_columns": ["a"], "fingerprint": "x"}


def test_trainer_runs_with_threads_affinity_and_memory_of_its_resources(trainer_ctx):
    from mlplatform.stages.limits import VIRTUAL_HEADROOM
    from mlplatform.stages.train_local import run_local_trainer

    info = run_local_trainer(trainer_ctx("report", "{cpu: '1', memory: 512Mi}"), FEATURES)
    assert info["threads"] == info["omp"] == info["openblas"] == "1"
    assert info["gpus"] == "0"
    assert len(info["affinity"]) == min(1, len(os.sched_getaffinity(0)))
    assert int(info["memory"]) == 512 * 2**20
    assert info["rlimit_as"] == 512 * 2**20 + VIRTUAL_HEADROOM


def test_trainer_above_its_memory_is_stopped_with_a_clear_message(trainer_ctx):
    from mlplatform.stages.context import StageFailed
    from mlplatform.stages.train_local import run_local_trainer

    with pytest.raises(StageFailed) as failed:
        run_local_trainer(trainer_ctx("grow", "{memory: 256Mi}"), FEATURES)
    message = str(failed.value)
    assert message.startswith("trainer stopped: it used "), message
    assert "above its limit spec.training.resources.memory 256Mi; ask for more memory" in message
    assert "holding 224 MiB" in message and "still alive" not in message


def test_one_huge_allocation_is_refused_by_the_address_space_limit(trainer_ctx):
    from mlplatform.stages.context import StageFailed
    from mlplatform.stages.train_local import run_local_trainer

    with pytest.raises(StageFailed) as failed:
        run_local_trainer(trainer_ctx("huge", "{memory: 256Mi}"), FEATURES)
    message = str(failed.value)
    assert message.startswith("trainer ran out of memory: an allocation went above its limit "
                              "spec.training.resources.memory 256Mi (virtual memory capped at 4.2Gi)"), message
    assert "MemoryError" in message and "still alive" not in message


def test_train_env_sets_threads_and_gpus_from_resources(platform):
    from mlplatform.stages.train_local import train_env

    write_spec(platform.specs_dir, "acme", "mini", BASE + "  training: {resources: {cpu: 2500m, memory: 4Gi, gpu: 1}}\n")
    catalog = load_catalog(platform)
    env = train_env(_ctx(platform, catalog.specs[0], catalog, {}), FEATURES, Path("/r.json"), Path("/scratch"))
    assert env["MLPLATFORM_CPU_THREADS"] == env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    assert env["MLPLATFORM_GPUS"] == "1" and env["MLPLATFORM_MEMORY_LIMIT_BYTES"] == str(4 * 2**30)
