"""The spec loader: good specs load with defaults; every bad spec gets its exact file:line:field error."""

from __future__ import annotations

import textwrap

import pytest

from conftest import copy_example_specs, write_spec
from mlplatform.spec.loader import load_catalog

MINIMAL = """\
apiVersion: mlplatform.io/v1
kind: Pipeline
metadata: {name: mini, tenant: acme}
spec:
  data: {source: acme/churn, entity: customer_id, timestamp: event_timestamp, label: churned}
  training: {framework: xgboost}
"""


def _one(platform, text: str, tenant: str = "acme", name: str = "mini"):
    write_spec(platform.specs_dir, tenant, name, textwrap.dedent(text))
    return load_catalog(platform)


def test_example_specs_all_load(platform):
    copy_example_specs(platform.specs_dir)
    catalog = load_catalog(platform)
    assert catalog.problems == []
    assert sorted(s.dag_id for s in catalog.specs) == ["acme__churn-baseline", "acme__churn-xgb", "globex__upsell"]
    assert set(catalog.tenants) == {"acme", "globex"}


def test_minimal_spec_gets_defaults(platform):
    catalog = _one(platform, MINIMAL)
    assert catalog.problems == []
    spec = catalog.specs[0].spec
    assert spec.spec.template == "standard-v1"
    assert spec.spec.training.resources.gpu == 0
    assert spec.spec.evaluation.metric == "roc_auc"
    assert spec.spec.deployment.canary_traffic == 0.2
    assert spec.model_name == "acme.mini"


def _replace(old: str, new: str) -> str:
    assert old in MINIMAL
    return MINIMAL.replace(old, new)


# (case id, spec text, tenant folder, expected "line:col: field: message" fragment)
BAD = [
    ("yaml-syntax", "apiVersion: [\n", "acme", "mini.yaml:2:1: invalid YAML"),
    ("alias-bomb", MINIMAL + "x: &a [1, 2]\ny: [*a, *a]\n", "acme", "YAML anchors and aliases are not allowed"),
    ("python-tag", MINIMAL.replace("xgboost}", "!!python/object/apply:os.system [ls]}"), "acme",
     "mini.yaml:6:25: spec.training.framework: YAML tag"),
    ("duplicate-key", MINIMAL + "kind: Pipeline\n", "acme", "mini.yaml:7:1: kind: duplicate key 'kind'"),
    ("unknown-key", _replace("  training:", "  trainig:"), "acme",
     "mini.yaml:6:3: spec.trainig: unknown field 'trainig'; did you mean 'training'?"),
    ("wrong-type", _replace("{framework: xgboost}", "{framework: xgboost, holdout_fraction: lots}"), "acme",
     "spec.training.holdout_fraction: Input should be a valid number"),
    ("bad-framework", _replace("xgboost}", "tensorflow}"), "acme",
     "mini.yaml:6:14: spec.training.framework: 'tensorflow' is not allowed; expected 'xgboost', 'sklearn' or 'pytorch'"),
    ("negative-gpu", _replace("{framework: xgboost}", "{resources: {gpu: -1}}"), "acme",
     "spec.training.resources.gpu: Input should be greater than or equal to 0"),
    ("gpu-above-quota", _replace("{framework: xgboost}", "{resources: {gpu: 3}}"), "acme",
     "spec.training.resources.gpu: 3 GPUs requested but tenant 'acme' has a quota of 2"),
    ("absurd-memory", _replace("{framework: xgboost}", "{resources: {memory: 900Ti}}"), "acme",
     "spec.training.resources.memory: memory 900Ti is above the tenant's per-task limit 32Gi"),
    ("bad-cpu", _replace("{framework: xgboost}", "{resources: {cpu: lots}}"), "acme",
     "spec.training.resources.cpu: 'lots' is not a CPU quantity"),
    ("unknown-tenant", MINIMAL.replace("tenant: acme", "tenant: acne"), "acne",
     "metadata.tenant: unknown tenant 'acne'; did you mean 'acme'?"),
    ("tenant-not-folder", MINIMAL.replace("tenant: acme", "tenant: globex"), "acme",
     "metadata.tenant: tenant 'globex' does not match the folder 'acme'"),
    ("name-not-file", MINIMAL.replace("name: mini", "name: other"), "acme",
     "metadata.name: name 'other' must equal the file name 'mini'"),
    ("unknown-template", _replace("spec:\n", "spec:\n  template: fancy-v9\n"), "acme",
     "spec.template: unknown template 'fancy-v9'"),
    ("bad-cron", _replace("spec:\n", "spec:\n  schedule: '61 * * * *'\n"), "acme",
     "mini.yaml:5:3: spec.schedule: '61 * * * *' is not a valid cron expression"),
    ("cross-tenant-path", _replace("acme/churn", "globex/accounts"), "acme",
     "spec.data.source: 'globex/accounts' is outside the allowed data prefixes of tenant 'acme'"),
    ("dotdot-path", _replace("acme/churn", "acme/../globex/accounts"), "acme",
     "spec.data.source: 'acme/../globex/accounts' is not a data path"),
    ("absolute-path", _replace("acme/churn", "/etc/passwd"), "acme", "spec.data.source: '/etc/passwd' is not a data path"),
    ("cross-tenant-s3", _replace("acme/churn", "s3://mlplatform-data/globex/x"), "acme",
     "is outside the allowed data prefixes of tenant 'acme'"),
    ("connection-not-allowed", _replace("label: churned}", "label: churned, connection_id: globex_s3}"), "acme",
     "spec.data.connection_id: connection 'globex_s3' is not allowed for tenant 'acme'"),
    ("literal-secret", _replace("{framework: xgboost}", "{framework: xgboost, hyperparameters: {api_key: abc123}}"),
     "acme", "spec.training.hyperparameters.api_key: 'api_key' looks like a secret"),
    ("aws-key-in-value", _replace("acme/churn", "acme/AKIAABCDEFGHIJKLMNOP"), "acme", "value looks like an AWS access key id"),
    ("shell-metachar-name", MINIMAL.replace("name: mini", "name: 'mini;rm -rf'"), "acme",
     "metadata.name: 'mini;rm -rf' does not match"),
    ("unicode-lookalike-tenant", MINIMAL.replace("tenant: acme", "tenant: аcme"), "acme",  # Cyrillic 'а'
     "metadata.tenant: 'аcme' does not match"),
    ("param-default-outside-bounds",
     _replace("{framework: xgboost}", "{hyperparameters: {max_depth: 40}, tunable: {max_depth: {min: 2, max: 10}}}"),
     "acme", "spec.training.hyperparameters.max_depth: 40 is outside its tunable range [2, 10]"),
    ("tunable-without-default", _replace("{framework: xgboost}", "{tunable: {eta: {min: 0, max: 1}}}"), "acme",
     "spec.training.tunable.eta: tunable 'eta' needs a default value"),
    ("label-is-feature", _replace("label: churned}", "label: churned, features: [churned]}"), "acme",
     "spec.data.features[0]: 'churned' is the entity, timestamp or label"),
    ("not-a-mapping", "- just\n- a list\n", "acme", "mini.yaml:1:1: expected a mapping"),
    ("empty-file", "", "acme", "mini.yaml:1:1: file is empty"),
    ("deep-nesting", MINIMAL + "x: " + "[" * 30 + "]" * 30 + "\n", "acme", "nesting deeper than 20 levels"),
    ("wrong-api-version", MINIMAL.replace("mlplatform.io/v1", "mlplatform.io/v2"), "acme",
     "mini.yaml:1:1: apiVersion: 'mlplatform.io/v2' is not allowed"),
    ("bad-duration", _replace("spec:\n", "spec:\n  deployment: {bake_time: 10 minutes}\n"), "acme",
     "spec.deployment.bake_time: '10 minutes' is not a duration"),
]


@pytest.mark.parametrize("case_id,text,tenant,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_spec_reports_exact_error(platform, case_id, text, tenant, expected):
    write_spec(platform.specs_dir, tenant, "mini", text)
    write_spec(platform.specs_dir, "globex", "healthy", MINIMAL.replace("tenant: acme", "tenant: globex")
               .replace("name: mini", "name: healthy").replace("acme/churn", "globex/accounts"))
    catalog = load_catalog(platform)
    assert [s.dag_id for s in catalog.specs] == ["globex__healthy"], "a broken spec must not hide a healthy one"
    assert len(catalog.broken) == 1
    messages = [str(p) for p in catalog.broken[0].problems]
    assert any(expected in m for m in messages), messages
    assert all(m.startswith(f"specs/{tenant}/mini.yaml:") for m in messages), messages


def test_ten_megabyte_file_is_refused_before_parsing(platform):
    write_spec(platform.specs_dir, "acme", "mini", MINIMAL + "# " + "x" * (10 * 2**20) + "\n")
    catalog = load_catalog(platform)
    assert "larger than 64 KiB" in str(catalog.broken[0].problems[0])


def test_duplicate_pipeline_name_yaml_and_yml(platform):
    write_spec(platform.specs_dir, "acme", "mini", MINIMAL)
    (platform.specs_dir / "acme" / "mini.yml").write_text(MINIMAL)
    catalog = load_catalog(platform)
    assert len(catalog.specs) == 1
    assert "is already defined in" in str(catalog.broken[0].problems[0])


def test_broken_spec_keeps_stable_dag_id(platform):
    write_spec(platform.specs_dir, "acme", "mini", "apiVersion: [\n")
    assert load_catalog(platform).broken[0].dag_id == "acme__mini"

