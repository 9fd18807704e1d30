"""The spec loader: good specs load with defaults; every bad spec gets its exact file:line:field error."""

from __future__ import annotations

import os
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


# --------------------------------------------------------------- issue 11: evaluator sinks, template text, secrets


def _expect(*items: str) -> str:
    """MINIMAL with spec.validation.expectations holding ``items`` (YAML list items, one line each)."""
    return _replace("spec:\n", "spec:\n  validation:\n    expectations:\n" + "".join(f"      - {i}\n" for i in items))


def _meta(extra: str) -> str:
    """MINIMAL with block-style metadata plus ``extra`` on line 6 (so a longer name shifts no column)."""
    return _replace("metadata: {name: mini, tenant: acme}\n", "metadata:\n  name: mini\n  tenant: acme\n  " + extra + "\n")


def _hyper(extra: str) -> str:
    return _replace("{framework: xgboost}", "{framework: xgboost, hyperparameters: {" + extra + "}}")


BAD += [  # issue 11: tenants are hostile (each case also runs on a real dag-processor: test_hostile_airflow)
    # Great Expectations: no evaluator reachable from kwargs
    ("gx-row-condition-shell", _expect("{type: expect_column_values_to_not_be_null, kwargs: {column: plan, "
                                       "row_condition: \"@pd.io.common.os.system('touch /tmp/MARKER') == 0\"}}"), "acme",
     "mini.yaml:7:76: spec.validation.expectations[0].kwargs.row_condition: 'row_condition' is not allowed: a"),
    ("gx-row-condition-dunder", _expect("{type: expect_column_values_to_be_in_set, kwargs: {column: plan, value_set: [a], "
                                        "row_condition: \"customer_id.__class__.__init__.__globals__['os'].system('id') == 0\", "
                                        "condition_parser: pandas}}"), "acme",
     "mini.yaml:7:90: spec.validation.expectations[0].kwargs.row_condition: 'row_condition' is not allowed: a"),
    ("gx-condition-parser", _expect("{type: expect_column_values_to_not_be_null, kwargs: {column: plan, condition_parser: great_expectations}}"), "acme",
     "mini.yaml:7:76: spec.validation.expectations[0].kwargs.condition_parser: 'condition_parser' is not allowed:"),
    ("gx-sql-expectation", _expect("{type: expect_query_results_to_match_comparison, kwargs: {base_query: 'SELECT 1', "
                                   "comparison_data_source_name: x, comparison_query: 'SELECT 1'}}"), "acme",
     'mini.yaml:7:10: spec.validation.expectations[0].type: expect_query_results_to_match_comparison is not allowed in'),
    ("gx-json-schema-ref", _expect("{type: expect_column_values_to_match_json_schema, kwargs: {column: plan, "
                                   "json_schema: {$ref: 'http://169.254.169.254/latest/meta-data/'}}}"), "acme",
     'mini.yaml:7:10: spec.validation.expectations[0].type: expect_column_values_to_match_json_schema is not allowed in'),
    ("gx-unknown-type", _expect("{type: expect_column_values_to_be_nice, kwargs: {column: plan}}"), "acme",
     'mini.yaml:7:10: spec.validation.expectations[0].type: unknown or not allowed expectation type'),
    ("gx-misspelled-kwarg", _expect("{type: expect_column_values_to_be_between, kwargs: {column: tenure_months, max_vaule: 3}}"), "acme",
     "mini.yaml:7:84: spec.validation.expectations[0].kwargs.max_vaule: unknown kwarg 'max_vaule' of"),
    ("gx-wrong-kwarg-type", _expect("{type: expect_column_values_to_be_between, kwargs: {column: tenure_months, min_value: lots}}"), "acme",
     "mini.yaml:7:84: spec.validation.expectations[0].kwargs.min_value: 'lots' is not a number or an ISO date"),
    ("gx-suite-parameter", _expect("{type: expect_column_values_to_be_between, kwargs: {column: tenure_months, "
                                   "min_value: {$PARAMETER: 'now()'}}}"), "acme",
     'mini.yaml:7:84: spec.validation.expectations[0].kwargs.min_value: expected a number, an ISO date or null, got a'),
    ("gx-platform-kwarg", _expect("{type: expect_column_values_to_not_be_null, kwargs: {column: plan, "
                                  "description: '$column is fine', meta: {x: 1}}}"), "acme",
     "mini.yaml:7:76: spec.validation.expectations[0].kwargs.description: unknown kwarg 'description' of"),
    ("gx-redos-regex", _expect("{type: expect_column_values_to_match_regex, kwargs: {column: plan, regex: '^(a+)+$'}}"), "acme",
     'mini.yaml:7:76: spec.validation.expectations[0].kwargs.regex: regex not allowed: a quantifier inside a quantified'),
    ("gx-column-not-a-name", _expect("{type: expect_column_values_to_not_be_null, kwargs: {column: 'plan`) or (@pd'}}"), "acme",
     "mini.yaml:7:62: spec.validation.expectations[0].kwargs.column: 'plan`) or (@pd' does not match"),
    ("where-injected-value", _expect("{type: expect_column_values_to_not_be_null, kwargs: {column: plan}, "
                                     "where: {column: plan, op: '==', value: \"x' or @pd.io.common.os.system('id') == 0 or 'y\"}}"), "acme",
     'mini.yaml:7:109: spec.validation.expectations[0].where.value: "x\' or @pd.io.common.os.system(\'id\') == 0 or \'y" is'),
    ("where-injected-column", _expect("{type: expect_column_values_to_not_be_null, kwargs: {column: plan}, "
                                      "where: {column: 'plan == 1 or @pd', op: '==', value: 1}}"), "acme",
     "mini.yaml:7:85: spec.validation.expectations[0].where.column: 'plan == 1 or @pd' does not match"),
    ("where-unknown-op", _expect("{type: expect_column_values_to_not_be_null, kwargs: {column: plan}, "
                                 "where: {column: plan, op: matches, value: pro}}"), "acme",
     "mini.yaml:7:99: spec.validation.expectations[0].where.op: 'matches' is not allowed; expected '==', '!=', '<',"),
    ("where-on-table-check", _expect("{type: expect_table_columns_to_match_set, kwargs: {column_set: [plan]}, "
                                     "where: {column: plan, op: '==', value: pro}}"), "acme",
     'mini.yaml:7:81: spec.validation.expectations[0].where: expect_table_columns_to_match_set checks the whole table'),
    # template syntax and control characters
    ("jinja-description", _meta("description: '{{ conn.smtp_default.password }}'"), "acme",
     "mini.yaml:6:3: metadata.description: template syntax is not allowed in specs: '{{' starts a Jinja expression,"),
    ("jinja-owner", _meta("owner: '{{ var.value.jwt_secret }}'"), "acme",
     "mini.yaml:6:3: metadata.owner: template syntax is not allowed in specs: '{{' starts a Jinja expression, statement"),
    ("jinja-source", _replace("source: acme/churn", "source: 'acme/{{ conn.aws_default.password }}'"), "acme",
     "mini.yaml:5:10: spec.data.source: template syntax is not allowed in specs: '{{' starts a Jinja expression,"),
    ("jinja-statement-in-kwarg", _expect("{type: expect_column_values_to_be_in_set, kwargs: {column: plan, "
                                         "value_set: ['{% for c in conn %}x{% endfor %}']}}"), "acme",
     "mini.yaml:7:86: spec.validation.expectations[0].kwargs.value_set[0]: template syntax is not allowed in specs: '{%'"),
    ("jinja-comment-in-hyperparameter", _hyper("objective: 'binary:logistic{# x #}'"), "acme",
     "mini.yaml:6:52: spec.training.hyperparameters.objective: template syntax is not allowed in specs: '{#' starts a"),
    ("control-char-description", _meta('description: "ok\\a\\e[2J"'), "acme",
     'mini.yaml:6:3: metadata.description: control character U+0007 is not allowed in specs: spec text is shown in the'),
    ("bidi-override-owner", _meta('owner: "team\\u202Eevil"'), "acme",
     'mini.yaml:6:3: metadata.owner: control character U+202E is not allowed in specs: spec text is shown in the UI,'),
    # reserved names and tags
    ("reserved-name", MINIMAL.replace("name: mini", "name: deployments"), "acme",
     "mini.yaml:3:12: metadata.name: pipeline name 'deployments' is reserved: <tenant>__deployments is the platform's"),
    ("reserved-tag-tenant", _meta("tags: [churn, 'tenant:globex']"), "acme",
     "mini.yaml:6:17: metadata.tags[1]: tag 'tenant:globex' is reserved for the platform: tags with ':' (tenant:,"),
    ("reserved-tag-invalid-spec", _meta("tags: [invalid-spec]"), "acme",
     "mini.yaml:6:10: metadata.tags[0]: tag 'invalid-spec' is reserved for the platform: tags with ':' (tenant:,"),
    ("reserved-tag-mlplatform", _meta("tags: [mlplatform]"), "acme",
     "mini.yaml:6:10: metadata.tags[0]: tag 'mlplatform' is reserved for the platform: tags with ':' (tenant:,"),
    # secrets: key names
    ("secret-key-pwd", _hyper("pwd: hunter2"), "acme",
     "mini.yaml:6:52: spec.training.hyperparameters.pwd: 'pwd' looks like a secret written into the spec: store it in an"),
    ("secret-key-db-pw", _hyper("db_pw: hunter2"), "acme",
     "mini.yaml:6:52: spec.training.hyperparameters.db_pw: 'db_pw' looks like a secret written into the spec: store it"),
    ("secret-key-auth", _hyper("auth: hunter2"), "acme",
     "mini.yaml:6:52: spec.training.hyperparameters.auth: 'auth' looks like a secret written into the spec: store it in"),
    ("secret-key-api-token", _hyper("api_token: abc123"), "acme",
     "mini.yaml:6:52: spec.training.hyperparameters.api_token: 'api_token' looks like a secret written into the spec:"),
    ("secret-key-client-secret", _hyper("clientSecret: abc123"), "acme",
     "mini.yaml:6:52: spec.training.hyperparameters.clientSecret: 'clientSecret' looks like a secret written into the"),
    # secrets: token formats
    ("secret-github-token", _meta("description: 'ghp_" + "a1B2c3D4e5" * 3 + "a1B2c3'"), "acme",
     'mini.yaml:6:3: metadata.description: value looks like a GitHub token: store it in an Airflow connection the'),
    ("secret-gitlab-token", _meta("description: 'glpat-" + "x1Y2z3" * 4 + "'"), "acme",
     'mini.yaml:6:3: metadata.description: value looks like a GitLab token: store it in an Airflow connection the'),
    ("secret-google-api-key", _meta("description: 'AIzaSyA-" + "1234567890abcdef" * 2 + "abc'"), "acme",
     'mini.yaml:6:3: metadata.description: value looks like a Google API key: store it in an Airflow connection the'),
    ("secret-google-oauth", _meta("description: 'ya29.a0AfH6SMB" + "x1Y2" * 6 + "'"), "acme",
     'mini.yaml:6:3: metadata.description: value looks like a Google OAuth access token: store it in an Airflow'),
    ("secret-stripe-live", _meta("description: 'sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc" + "'"), "acme",
     'mini.yaml:6:3: metadata.description: value looks like a Stripe secret key: store it in an Airflow connection the'),
    ("secret-stripe-restricted", _meta("description: 'rk_live_" + "4eC39HqLyjWDarjtT1zdp7dc" + "'"), "acme",
     'mini.yaml:6:3: metadata.description: value looks like a Stripe secret key: store it in an Airflow connection the'),
    ("secret-slack-token", _meta("description: 'xoxb-123456789012-1234567890123-" + "AbCdEfGh" * 3 + "'"), "acme",
     'mini.yaml:6:3: metadata.description: value looks like a Slack token: store it in an Airflow connection the'),
    ("secret-basic-auth", _meta("description: 'Authorization: Basic dXNlcjpodW50ZXIy'"), "acme",
     'mini.yaml:6:3: metadata.description: value looks like HTTP basic credentials: store it in an Airflow connection'),
    ("secret-bearer-token", _meta("description: 'Authorization: Bearer 8f14e45fceea167a5a36dedd4bea2543'"), "acme",
     'mini.yaml:6:3: metadata.description: value looks like a bearer token: store it in an Airflow connection the'),
    ("secret-npm-token", _meta("description: 'npm_" + "a1b2c3d4e5f6" * 3 + "'"), "acme",
     'mini.yaml:6:3: metadata.description: value looks like an npm token: store it in an Airflow connection the platform'),
    ("secret-pypi-token", _meta("description: 'pypi-AgEIcHlwaS5vcmc" + "CJDAwMDAwMDAw" * 4 + "'"), "acme",
     'mini.yaml:6:3: metadata.description: value looks like a PyPI token: store it in an Airflow connection the platform'),
    ("secret-huggingface-token", _meta("description: 'hf_" + "aBcD1234eF" * 4 + "'"), "acme",
     'mini.yaml:6:3: metadata.description: value looks like a Hugging Face token: store it in an Airflow connection the'),
    ("secret-azure-connection-string", _meta("description: 'DefaultEndpointsProtocol=https;AccountName=acme;"
                                             "AccountKey=" + "abcdEFGH1234" * 4 + "==;EndpointSuffix=core.windows.net'"),
     "acme",
     'mini.yaml:6:3: metadata.description: value looks like an Azure storage key: store it in an Airflow connection the'),
    ("secret-password-in-text", _meta("description: 'db host is x, password=Tr0ub4dor&3'"), "acme",
     'mini.yaml:6:3: metadata.description: value looks like a credential written as key=value: store it in an Airflow'),
    ("secret-private-key", _meta("description: '-----BEGIN RSA PRIVATE KEY----- MIIEow'"), "acme",
     'mini.yaml:6:3: metadata.description: value looks like a private key: store it in an Airflow connection the'),
    ("secret-key-list-in-kwargs", _expect("{type: expect_column_values_to_not_be_null, kwargs: {column: plan, "
                                          "passwords: [hunter2, letmein]}}"), "acme",
     "mini.yaml:7:76: spec.validation.expectations[0].kwargs.passwords: 'passwords' looks like a secret written into"),
    ("secret-token-in-url-query", _meta("description: 'dashboard https://grafana.example.com/d/x?access_token=abc123def456'"),
     "acme", "mini.yaml:6:3: metadata.description: value looks like a credential written as key=value"),
    ("secret-token-as-key", _expect("{type: expect_column_values_to_not_be_null, kwargs: {column: plan, ghp_"
                                    + "a1B2c3D4e5" * 3 + "a1B2c3: 1}}"), "acme",
     "spec.validation.expectations[0].kwargs.<redacted>: key looks like a GitHub token"),
    ("where-string-condition", _expect("{type: expect_column_values_to_not_be_null, kwargs: {column: plan}, "
                                       "where: \"plan == 'pro'\"}"), "acme",
     "mini.yaml:7:77: spec.validation.expectations[0].where: where is a mapping such as {column: plan, op: '==', "
     "value: pro}, never a string"),
    ("where-nested-any-in-all", _expect("{type: expect_column_values_to_not_be_null, kwargs: {column: plan}, "
                                        "where: {all: [{any: [{column: plan, op: '==', value: pro}]}]}}"), "acme",
     "mini.yaml:7:92: spec.validation.expectations[0].where.all[0].any: unknown field 'any' (allowed: column, op, value)"),
    ("gx-nan-bound", _expect("{type: expect_column_values_to_be_between, kwargs: {column: tenure_months, max_value: .nan}}"),
     "acme", "mini.yaml:7:84: spec.validation.expectations[0].kwargs.max_value: nan is not a finite number"),
]



def _training(flow: str) -> str:
    """MINIMAL with spec.training as the flow mapping ``flow`` (line 6, from column 13)."""
    return _replace("{framework: xgboost}", flow)


BAD += [  # issue 11: bounds from the platform (spec/bounds.py; more cases in tests/test_spec_bounds.py)
    ("hp-n-estimators-1e9", _training("{hyperparameters: {n_estimators: 1e9}}"), "acme",
     "mini.yaml:6:32: spec.training.hyperparameters.n_estimators: '1e9' is not a number: xgboost n_estimators takes "
     "an integer in [1, 2000]"),
    ("hp-max-depth-10000", _training("{hyperparameters: {max_depth: 10000}}"), "acme",
     "mini.yaml:6:32: spec.training.hyperparameters.max_depth: 10000 is outside the platform's range [1, 16]"),
    ("hp-n-jobs", _training("{hyperparameters: {n_jobs: -1}}"), "acme",
     "mini.yaml:6:32: spec.training.hyperparameters.n_jobs: 'n_jobs' is set by the platform, not the spec"),
    ("hp-device-cuda-no-gpu", _training("{hyperparameters: {device: cuda}, resources: {gpu: 0}}"), "acme",
     "mini.yaml:6:32: spec.training.hyperparameters.device: 'device' is set by the platform, not the spec: the "
     "training device follows spec.training.resources.gpu"),
    ("timeout-100-years", _training("{timeout: 36500d}"), "acme",
     "mini.yaml:6:14: spec.training.timeout: '36500d' is above the platform's limit of 3650d"),
    ("timeout-overflow", _training("{timeout: 99999999999999s}"), "acme",
     "mini.yaml:6:14: spec.training.timeout: '99999999999999s' is above the platform's limit of 3650d"),
    ("every-minute", _replace("spec:\n", "spec:\n  schedule: '* * * * *'\n"), "acme",
     "mini.yaml:5:3: spec.schedule: '* * * * *' runs 1m apart at the closest; tenant 'acme' allows runs at least 1h"),
    ("monitor-continuous", _replace("spec:\n", "spec:\n  monitoring: {schedule: '@continuous'}\n"), "acme",
     "mini.yaml:5:16: spec.monitoring.schedule: schedule preset '@continuous' is not allowed for tenant 'acme'"),
    ("kserve-above-quota", _replace("spec:\n", "spec:\n  deployment: {target: kserve, min_replicas: 50, "
                                    "max_replicas: 50, resources: {cpu: '64', memory: 1Ti}}\n"), "acme",
     "mini.yaml:5:32: spec.deployment.min_replicas: min_replicas 50 is above the limit of tenant 'acme': 10"),
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



def test_symlinked_or_special_spec_files_are_refused_without_reading_them(platform, tmp_path):
    """lstat, never following a link: the error names the link itself and never shows what it points at."""
    secret = tmp_path / "platform-secret.yaml"
    secret.write_text("apiVersion: SENTINEL-JWT-SECRET\n")
    healthy = write_spec(platform.specs_dir, "globex", "healthy", MINIMAL.replace("tenant: acme", "tenant: globex")
                         .replace("name: mini", "name: healthy").replace("acme/churn", "globex/accounts"))
    acme = platform.specs_dir / "acme"
    acme.mkdir()
    (acme / "leak.yaml").symlink_to(secret)
    (acme / "steal.yaml").symlink_to(healthy)  # another tenant's spec
    (acme / "dangling.yaml").symlink_to(tmp_path / "nowhere.yaml")
    (acme / "folder.yaml").symlink_to(tmp_path)
    os.mkfifo(acme / "pipe.yaml")  # would block a plain open() forever
    catalog = load_catalog(platform)
    assert [s.dag_id for s in catalog.specs] == ["globex__healthy"]
    messages = {b.display: [str(p) for p in b.problems] for b in catalog.broken}
    for name in ("leak", "steal", "dangling", "folder"):
        assert messages[f"specs/acme/{name}.yaml"] == [
            f"specs/acme/{name}.yaml:1:1: spec file is a symbolic link: refused without reading it; commit the spec "
            "file itself (a link could point at another tenant's spec or a platform secret)"]
    assert messages["specs/acme/pipe.yaml"] == [
        "specs/acme/pipe.yaml:1:1: not a regular file (a named pipe): refused; a spec is a plain YAML file"]
    assert "SENTINEL" not in str(messages) and str(tmp_path) not in str(messages)


def test_a_tenant_folder_that_is_a_symlink_is_refused(platform, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "stolen.yaml").write_text("apiVersion: SENTINEL-JWT-SECRET\n")
    (platform.specs_dir / "acme").symlink_to(outside)
    catalog = load_catalog(platform)
    [broken] = catalog.broken
    assert [str(p) for p in broken.problems] == [
        "specs/acme/stolen.yaml:1:1: the spec's folder is a symbolic link: refused without reading it; a tenant's "
        "specs live in a real folder dags/specs/<tenant>/"]


def test_lint_of_a_symlink_named_on_the_command_line_does_not_follow_it(platform, tmp_path, capsys):
    from mlplatform.cli import main

    secret = tmp_path / "platform-secret.yaml"
    secret.write_text("apiVersion: SENTINEL-JWT-SECRET\n")
    (platform.specs_dir / "acme").mkdir()
    link = platform.specs_dir / "acme" / "leak.yaml"
    link.symlink_to(secret)
    assert main(["lint", str(link)]) == 1
    out = capsys.readouterr().out
    assert "specs/acme/leak.yaml:1:1: spec file is a symbolic link" in out and "SENTINEL" not in out


def test_structured_where_conditions_pass_lint(platform):
    text = MINIMAL.replace("spec:\n", """spec:
  validation:
    expectations:
      - type: expect_column_values_to_be_between
        kwargs: {column: monthly_charges, min_value: 0, max_value: 500, mostly: 0.99}
        where: {all: [{column: plan, op: "==", value: pro}, {column: tenure_months, op: ">", value: 3}]}
      - type: expect_column_values_to_not_be_null
        kwargs: {column: plan}
        where: {any: [{column: plan, op: in, value: [plus, pro]}, {all: [{column: support_calls, op: not_null}]}]}
      - type: expect_column_values_to_match_regex
        kwargs: {column: plan, regex: '^[a-z]{3,5}$'}
      - type: expect_column_quantile_values_to_be_between
        kwargs: {column: tenure_months, quantile_ranges: {quantiles: [0.5], value_ranges: [[1, 72]]}}
      - type: expect_column_values_to_be_between
        kwargs: {column: event_timestamp, min_value: '2020-01-01', max_value: '2030-01-01T00:00:00'}
""")
    catalog = _one(platform, text)
    assert catalog.problems == []
    where = catalog.specs[0].spec.spec.validation.expectations[0].where
    assert where.describe() == "plan == 'pro' and tenure_months > 3"


def test_reserved_name_stand_in_does_not_take_the_control_dag_id(platform):
    write_spec(platform.specs_dir, "acme", "deployments", MINIMAL.replace("name: mini", "name: deployments"))
    catalog = load_catalog(platform)
    [broken] = catalog.broken
    assert broken.dag_id == "acme__deployments-reserved-name"
    assert "pipeline name 'deployments' is reserved" in str(broken.problems[0])


@pytest.mark.parametrize("text", ["{{ 7*7 }}", "a {% if x %}", "{#- note -#}", "ends with {", "bell\a", "rtl\u202e",
                                  "zero\u2028width"])
def test_free_text_with_template_syntax_or_control_characters_is_refused(text):
    from mlplatform.spec.safetext import find_unsafe_text

    assert find_unsafe_text({"a": [{"b": text}]})[0][0] == ("a", 0, "b")


@pytest.mark.parametrize("text", ["Churn model v2 (weekly) - see {docs}", "regex ^\\d{3}$", "tabs\tand\nlines ok"])
def test_plain_free_text_is_fine(text):
    from mlplatform.spec.safetext import find_unsafe_text

    assert find_unsafe_text({"a": text}) == []


def test_errors_never_echo_a_credential(platform):
    """A credential in a field that also fails its pattern, or used as a key, is redacted from every message."""
    token, url = "ghp_" + "a1B2c3D4e5" * 4, "postgres://user:hunter2secret@db/x"
    write_spec(platform.specs_dir, "acme", "leak", f"""\
apiVersion: mlplatform.io/v1
kind: Pipeline
metadata: {{name: leak, tenant: acme, tags: [{token}]}}
spec:
  data: {{source: acme/churn, entity: customer_id, timestamp: event_timestamp, label: churned, connection_id: "{url}"}}
""")
    broken = load_catalog(platform).broken
    text = "\n".join(str(p) for b in broken for p in b.problems)
    assert "leak.yaml:5:" in text and "metadata.tags[0]: '<redacted>' does not match" in text
    assert token not in text and "hunter2secret" not in text


def test_schema_errors_do_not_hide_the_semantic_checks(platform):
    """Issue 12: one lint pass reports a typo, a bad expectation kwarg, a secret, template text, a bound and
    a tenant/folder mismatch together (three typos used to take three rounds)."""
    text = _meta("ownr: ml-team").replace("label: churned}", "label: churned, sorce_typo: x}").replace(
        "spec:\n", "spec:\n  schedule: '61 * * * *'\n  validation:\n    expectations:\n"
        "      - {type: expect_column_values_to_be_between, kwargs: {column: tenure_months, max_vaule: 3}}\n"
        "      - {type: expect_column_values_to_not_be_null, kwargs: {column: plan}, severity: fatal}\n", 1).replace(
        "{framework: xgboost}", "{framework: xgboost, hyperparameters: {max_depth: 10000, api_key: abc123, "
        "objective: '{{ var.value.x }}'}}").replace("tenant: acme", "tenant: globex")
    write_spec(platform.specs_dir, "acme", "mini", text)
    [broken] = load_catalog(platform).broken
    messages = "\n".join(str(p) for p in broken.problems)
    for expected in ("metadata.ownr: unknown field 'ownr'; did you mean 'owner'?",
                     "spec.data.sorce_typo: unknown field",
                     "expectations[1].severity: 'fatal' is not allowed",
                     "expectations[0].kwargs.max_vaule: unknown kwarg 'max_vaule'",
                     "spec.schedule: '61 * * * *' is not a valid cron expression",
                     "metadata.tenant: tenant 'globex' does not match the folder 'acme'",
                     "hyperparameters.api_key: 'api_key' looks like a secret",
                     "hyperparameters.objective: template syntax is not allowed",
                     "hyperparameters.max_depth: 10000 is outside the platform's range [1, 16]"):
        assert expected in messages, messages
    assert "abc123" not in messages
    assert len(messages.splitlines()) == len(set(messages.splitlines())), "no problem twice"


def _pipeline(name: str, views: str = "") -> str:
    text = MINIMAL.replace("name: mini", f"name: {name}")
    return text.replace("spec:\n", f"spec:\n  features: {{views: [{views}]}}\n") if views else text


def test_lint_takes_folders_recursively_without_following_links(platform, tmp_path, capsys):
    from mlplatform.cli import main

    write_spec(platform.specs_dir, "acme", "good", _pipeline("good"))
    write_spec(platform.specs_dir, "acme", "bad", _pipeline("bad").replace("training:", "trainig:"))
    (platform.specs_dir / "acme" / "notes.txt").write_text("not a spec\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "hidden.yaml").write_text("apiVersion: SENTINEL-JWT-SECRET\n")
    (platform.specs_dir / "acme" / "linked").symlink_to(outside)  # a link to a folder: never walked into
    (platform.specs_dir / "acme" / "leak.yaml").symlink_to(outside / "hidden.yaml")
    assert main(["lint", str(platform.specs_dir / "acme")]) == 1
    captured = capsys.readouterr()
    assert "specs/acme/bad.yaml:6:3: spec.trainig: unknown field 'trainig'" in captured.out
    assert "specs/acme/leak.yaml:1:1: spec file is a symbolic link" in captured.out
    assert "SENTINEL" not in captured.out and "hidden" not in captured.out and "notes" not in captured.out
    assert "3 spec(s) checked, 2 problem(s) in 2 file(s)" in captured.err
    assert main(["lint", str(platform.specs_dir)]) == 1  # the specs folder itself: every tenant folder below it
    assert "3 spec(s) checked" in capsys.readouterr().err


def test_lint_catches_feature_view_name_clashes_across_a_tenants_specs(platform, capsys):
    from mlplatform.cli import main

    write_spec(platform.specs_dir, "acme", "one", _pipeline("one", "{name: usage, features: [plan]}"))
    write_spec(platform.specs_dir, "acme", "two", _pipeline("two", "{name: billing, features: [plan]}, "
                                                                   "{name: usage, features: [tenure_months]}"))
    write_spec(platform.specs_dir, "acme", "three", _pipeline("three", "{name: one, features: [plan]}"))  # one declares views: no default view
    write_spec(platform.specs_dir, "acme", "four", _pipeline("four"))  # default view 'four'
    write_spec(platform.specs_dir, "acme", "five", _pipeline("five", "{name: four, features: [plan]}"))
    write_spec(platform.specs_dir, "globex", "usage", _pipeline("other", "{name: usage, features: [plan]}")
               .replace("name: other", "name: usage").replace("tenant: acme", "tenant: globex")
               .replace("acme/churn", "globex/accounts"))  # another tenant: another Feast project
    assert main(["lint", str(platform.specs_dir / "acme" / "two.yaml")]) == 1  # the other file is read too
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["specs/acme/two.yaml:5:58: spec.features.views[1].name: feature view 'usage' is also registered by "
                   "specs/acme/one.yaml: feature views are per tenant (one Feast project per tenant), so rename one "
                   "in spec.features.views"], out
    assert main(["lint"]) == 1
    out = capsys.readouterr().out
    assert "specs/acme/one.yaml:5:23: spec.features.views[0].name: feature view 'usage' is also registered by specs/acme/two.yaml" in out
    assert "specs/acme/five.yaml:5:23: spec.features.views[0].name: feature view 'four' is also registered by specs/acme/four.yaml" in out
    assert "specs/acme/four.yaml:3:12: metadata.name: feature view 'four' is also registered by specs/acme/five.yaml" in out
    assert "three.yaml" not in out and "globex" not in out
