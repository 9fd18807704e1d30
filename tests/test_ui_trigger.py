"""A tenant user triggers a pipeline from the Airflow UI's trigger form, in a real browser.

Real api-server + scheduler + dag-processor, multi-team tenancy from ``mlplatform sync`` (tests/helpers_browser.py).
``acme-dev`` (team acme) logs in on the login page, opens ``acme__churn-xgb``, fills the form built from the spec
(plugins/mlplatform/factory/params.py: as-of date, tunable hyperparameters, skip canary), triggers, and
the run starts: seen in the UI and through the REST API with exactly that conf. The run need not finish
(no data is generated, so it fails at validate). Screenshot: test-artifacts/ui_trigger.png.
"""

from __future__ import annotations

import time

import pytest

from conftest import ARTIFACTS
from helpers_browser import airflow_with_users, browser, login

pytestmark = pytest.mark.slow

DAG_ID = "acme__churn-xgb"
RUN_ID = "ui_trigger_acme_1"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with airflow_with_users(tmp_path_factory.mktemp("ui_trigger"), broken=False) as st:
        st["api"].wait_for_dag(DAG_ID)
        yield st


def test_tenant_user_triggers_a_pipeline_from_the_form(stack):
    api, base = stack["api"], stack["base_url"]
    assert api.http.get(f"/dags/{DAG_ID}").json()["is_paused"] is True
    with browser() as b:
        ctx = b.new_context(viewport={"width": 1400, "height": 1100})
        page = login(ctx, base, "acme-dev", stack["passwords"])  # asserts the redirect to the SimpleAuthManager login page
        page.goto(f"{base}/dags/{DAG_ID}")
        page.get_by_role("button", name="Trigger").first.click()
        form = page.get_by_role("dialog")
        form.get_by_text("Run Parameters").wait_for()

        # The spec's form: as-of date, both tunable hyperparameters with their bounds, skip canary.
        assert form.get_by_text("Between 2 and 10 (spec default 4).").is_visible()
        assert form.locator("input[name=element_hp_n_estimators]").input_value() == "120"
        form.locator("input[name=element_as_of]").fill("2026-11-01")
        form.locator("input[name=element_hp_max_depth]").fill("7")
        skip = form.locator("input[name=element_skip_canary]")  # a switch: its input is visually hidden,
        skip.locator("xpath=..").click()  # the user clicks the switch around it
        assert skip.is_checked()
        form.get_by_role("button", name="Advanced Options").click()
        form.locator("input[name=dagRunId]").fill(RUN_ID)
        form.get_by_role("button", name="Trigger").click()

        # The UI lands on (or links) the new run; its page shows a state once the scheduler picked it up.
        page.wait_for_url(f"**/dags/{DAG_ID}/runs/{RUN_ID}**", timeout=60_000)
        run = _wait_started(api)
        page.reload()
        page.get_by_text(RUN_ID).first.wait_for()
        page.get_by_text(run["state"], exact=False).first.wait_for()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui_trigger.png"))
        ctx.close()

    assert run["conf"] == {"as_of": "2026-11-01", "hp_max_depth": 7, "hp_n_estimators": 120, "skip_canary": True}
    assert run["run_type"] == "manual"
    assert run["triggering_user_name"] == "acme-dev"
    assert api.http.get(f"/dags/{DAG_ID}").json()["is_paused"] is False  # "unpause on trigger" was checked
    states = api.task_states(DAG_ID, RUN_ID)
    assert states["validate"] is not None, states  # the scheduler started the run's first task


def _wait_started(api, timeout: float = 300) -> dict:
    """The run as the REST API reports it once its first task left the 'no state' stage."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = api.http.get(f"/dags/{DAG_ID}/dagRuns/{RUN_ID}")
        if r.status_code == 200 and api.task_states(DAG_ID, RUN_ID).get("validate"):
            return r.json()
        time.sleep(2)
    raise TimeoutError(f"run {RUN_ID} did not start within {timeout}s")
