"""The platform page (mlplatform.plugin) in a real browser against a real Airflow.

api-server + scheduler + dag-processor (LocalExecutor, SQLite) with the example specs and two broken ones,
multi-team tenancy from ``mlplatform sync`` (teams, bundles, team pools, users), MLflow model versions
with aliases and a canary in progress. Playwright drives Debian's Chromium: log in through the UI, open
"ML Platform" from the navigation, and compare what the page shows with the REST API and the MLflow
registry. Screenshot: test-artifacts/platform_page.png.
"""

from __future__ import annotations

import json
import os
import re

import httpx
import pytest

from conftest import ARTIFACTS
from helpers_browser import airflow_with_users, browser, login, token

pytestmark = pytest.mark.slow

ACME_FAILS = "acme__churn-baseline"  # triggered and unpaused: fails at validate (no data generated)
ACME_QUEUED = "acme__churn-xgb"  # a run triggered while paused stays queued
GLOBEX_ERROR = "5 GPUs requested but tenant 'globex' has a quota of 1"
ACME_ERROR = "unknown field 'trainig'; did you mean 'training'?"


def _register_models(config, root) -> None:
    """Tiny sklearn models registered straight into the MLflow DB the platform config points at."""
    import mlflow
    from mlflow import MlflowClient
    from sklearn.linear_model import LogisticRegression

    from mlplatform.stages.canary_state import CANARY_TAG, SHARE_TAG, STATE_TAG, CanaryState

    assert os.environ["MLFLOW_TRACKING_URI"] == config.tracking_uri  # the stack's; MLflow's fluent API reads it
    client = MlflowClient(config.tracking_uri, config.tracking_uri)
    exp = client.create_experiment("platform-page", artifact_location=(root / "mlartifacts").as_uri())
    model = LogisticRegression().fit([[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1])
    for name, n in (("acme.churn-xgb", 3), ("globex.upsell", 1)):
        for _ in range(n):
            with mlflow.start_run(experiment_id=exp):
                mlflow.sklearn.log_model(model, name="model", registered_model_name=name)
    client.set_registered_model_alias("acme.churn-xgb", "previous", "1")
    client.set_registered_model_alias("acme.churn-xgb", "champion", "2")
    client.set_registered_model_alias("acme.churn-xgb", "challenger", "3")
    client.set_model_version_tag("acme.churn-xgb", "2", CANARY_TAG, "promoted")
    client.set_model_version_tag("acme.churn-xgb", "3", STATE_TAG,
                                 CanaryState("baking", 1, [0.1, 0.5, 1.0], "2").to_json())
    client.set_registered_model_tag("acme.churn-xgb", SHARE_TAG, "0.5")
    client.set_registered_model_alias("globex.upsell", "champion", "1")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("platform_page")
    with airflow_with_users(root) as st:
        api = st["api"]
        for dag_id in (ACME_FAILS, ACME_QUEUED, "globex__upsell", "globex__broken", "acme__oops"):
            api.wait_for_dag(dag_id)
        _register_models(st["config"], root)
        st["failing_run"] = api.trigger(ACME_FAILS)
        r = api.http.post(f"/dags/{ACME_QUEUED}/dagRuns", json={"logical_date": None, "conf": {"hp_max_depth": 5}})
        r.raise_for_status()
        st["queued_run"] = r.json()["dag_run_id"]
        yield st


@pytest.fixture(scope="module")
def chromium_browser():
    with browser() as b:
        yield b


def _pools_api(api) -> dict[str, dict[str, int]]:
    pools = api.http.get("/pools", params={"limit": 100}).json()["pools"]
    return {p["name"]: {"slots": p["slots"], "occupied": p["occupied_slots"], "running": p["running_slots"],
                        "queued": p["queued_slots"], "deferred": p["deferred_slots"],
                        "scheduled": p["scheduled_slots"], "open": p["open_slots"]} for p in pools}


def _pools_page(frame) -> dict[str, dict[str, int]]:
    out = {}
    for row in frame.locator("tr[data-pool]").all():
        out[row.get_attribute("data-pool")] = {
            cell.get_attribute("data-field"): int(cell.inner_text()) for cell in row.locator("[data-field]").all()}
    return out


def _open_platform_page(page, base_url):
    """Through the navigation: the plugin's entry, then the page in the UI's iframe."""
    page.get_by_role("link", name="ML Platform").click()
    page.wait_for_url("**/plugin/mlplatform")
    frame = page.frame_locator("iframe")
    frame.locator("h1", has_text="ML Platform").wait_for()
    return frame


def _reload(page, frame):
    page.reload()
    frame.locator("h1", has_text="ML Platform").wait_for()


def test_unauthenticated_requests_go_to_login(stack):
    base = stack["base_url"]
    r = httpx.get(f"{base}/mlplatform/", follow_redirects=False)
    assert r.status_code == 303 and "/auth/login" in r.headers["location"]
    assert httpx.get(f"{base}/mlplatform/api/summary").status_code == 401


def test_admin_sees_every_tenant_and_the_numbers_match(stack, chromium_browser):
    from mlflow import MlflowClient

    api, base = stack["api"], stack["base_url"]
    ctx = chromium_browser.new_context(viewport={"width": 1400, "height": 1000})
    page = login(ctx, base, "admin", stack["passwords"])
    frame = _open_platform_page(page, base)
    assert frame.locator("[data-testid=scope]").inner_text() == "all tenants"

    # Pools: what the page shows is Airflow's Pool accounting (the REST API reads the same Pool.slots_stats).
    # Slots move while the failing run runs: compare a page load bracketed by two equal API snapshots.
    for _ in range(20):
        before = _pools_api(api)
        _reload(page, frame)
        shown = _pools_page(frame)
        if before == _pools_api(api):
            break
    else:
        pytest.fail("pool usage never held still for one page load")
    assert set(shown) == {"acme__gpu", "acme__cpu", "globex__gpu", "globex__cpu"}
    assert shown == {name: before[name] for name in shown}
    assert (shown["acme__gpu"]["slots"], shown["acme__cpu"]["slots"]) == (2, 8)
    assert (shown["globex__gpu"]["slots"], shown["globex__cpu"]["slots"]) == (1, 4)

    # Pipelines and their latest runs.
    failed = api.wait_for_run(ACME_FAILS, stack["failing_run"], timeout=600)
    assert failed["state"] == "failed"
    _reload(page, frame)
    rows = {r.get_attribute("data-dag"): r for r in frame.locator("tr[data-dag]").all()}
    assert set(rows) == {"acme__churn-baseline", "acme__churn-xgb", "globex__upsell"}
    for dag_id, row in rows.items():
        runs = api.http.get(f"/dags/{dag_id}/dagRuns").json()["dag_runs"]
        state = row.locator("[data-testid=run-state]").inner_text()
        if not runs:
            assert state == "never run"
            continue
        assert len(runs) == 1
        assert state == runs[0]["state"]
        assert runs[0]["dag_run_id"] in row.inner_text()
        date = runs[0]["start_date"] or runs[0]["run_after"]
        assert row.locator("[data-testid=run-date]").inner_text() == date[:19].replace("T", " ")
    assert rows[ACME_FAILS].locator("[data-testid=run-state]").inner_text() == "failed"
    assert rows[ACME_QUEUED].locator("[data-testid=run-state]").inner_text() == "queued"
    assert rows["globex__upsell"].locator("[data-testid=run-state]").inner_text() == "never run"

    # Models: versions, aliases and the canary in progress, as the registry has them.
    client = MlflowClient(stack["config"].tracking_uri, stack["config"].tracking_uri)
    for name in ("acme.churn-xgb", "globex.upsell"):
        aliases = client.get_registered_model(name).aliases
        block = frame.locator(f"[data-model='{name}']")
        versions = {r.get_attribute("data-version"): r for r in block.locator("tr[data-version]").all()}
        assert set(versions) == {str(mv.version) for mv in client.search_model_versions(f"name = '{name}'")}
        for version, row in versions.items():
            expected = sorted(a for a, v in aliases.items() if str(v) == version)
            shown_aliases = row.locator("[data-field=aliases]").get_attribute("data-aliases")
            assert (shown_aliases.split(",") if shown_aliases else []) == expected
            assert sorted(row.locator(".alias").all_inner_texts()) == expected
    acme = frame.locator("[data-model='acme.churn-xgb']")
    assert acme.locator("[data-testid=canary-share]").inner_text() == "0.5"
    v3 = acme.locator("tr[data-version='3']")
    assert v3.locator("[data-field=canary]").get_attribute("data-canary") == "baking"
    assert "step 2/3" in v3.inner_text()
    assert "promoted" in acme.locator("tr[data-version='2']").inner_text()

    # Specs that failed to load, with the lint errors (file:line:col).
    globex_broken = frame.locator("[data-broken='globex__broken']")
    assert GLOBEX_ERROR in globex_broken.inner_text()
    assert re.search(r"specs/globex/broken\.yaml:6:\d+: spec\.training\.resources\.gpu", globex_broken.inner_text())
    assert ACME_ERROR in frame.locator("[data-broken='acme__oops']").inner_text()
    assert frame.locator("text=specs/acme/oops.yaml:6:3").count() >= 1

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "platform_page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 20_000
    ctx.close()


@pytest.mark.parametrize("user,tenant,other", [("acme-dev", "acme", "globex"), ("globex-dev", "globex", "acme")])
def test_tenant_user_sees_only_its_tenant(stack, chromium_browser, user, tenant, other):
    ctx = chromium_browser.new_context(viewport={"width": 1400, "height": 1200})
    page = login(ctx, stack["base_url"], user, stack["passwords"])
    frame = _open_platform_page(page, stack["base_url"])
    assert frame.locator("[data-testid=user]").inner_text() == user
    assert frame.locator("[data-testid=scope]").inner_text() == tenant
    assert set(_pools_page(frame)) == {f"{tenant}__gpu", f"{tenant}__cpu"}
    assert {r.get_attribute("data-dag") for r in frame.locator("tr[data-dag]").all()} <= \
        {"acme__churn-baseline", "acme__churn-xgb", "globex__upsell"}
    assert all(r.get_attribute("data-dag").startswith(f"{tenant}__") for r in frame.locator("tr[data-dag]").all())
    assert [m.get_attribute("data-model") for m in frame.locator("[data-model]").all()] == \
        {"acme": ["acme.churn-xgb"], "globex": ["globex.upsell"]}[tenant]
    assert [b.get_attribute("data-broken") for b in frame.locator("[data-broken]").all()] == \
        {"acme": ["acme__oops"], "globex": ["globex__broken"]}[tenant]
    body = frame.locator("body").inner_text()
    assert other not in body.lower()
    ctx.close()

    # The same cut without a browser: the JSON endpoint with the user's REST token.
    summary = httpx.get(f"{stack['base_url']}/mlplatform/api/summary",
                        headers={"Authorization": f"Bearer {token(stack['base_url'], user, stack['passwords'])}"}, timeout=60).json()
    assert other not in json.dumps(summary).lower()
    assert [t["name"] for t in summary["tenants"]] == [tenant]
