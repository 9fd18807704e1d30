"""tenants_of (who sees which tenant on the platform page), the page's HTML, and the plugin's import cost."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from mlplatform.ui.access import ALL, tenants_of, visible
from mlplatform.ui.page import BrokenRow, ModelRow, PageData, PipelineRow, PoolRow, RunRow, TenantRow, VersionRow, render

TENANTS = ["acme", "acme-labs", "globex"]


def simple_user(name, role, teams=None):
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return SimpleAuthManagerUser(username=name, role=role, teams=teams)


def test_admin_sees_every_tenant():
    assert tenants_of(simple_user("admin", "admin"), TENANTS, multi_team=True) is ALL
    assert tenants_of(simple_user("root", "ADMIN", ["acme"]), TENANTS, multi_team=True) is ALL
    fab = SimpleNamespace(roles=[SimpleNamespace(name="Admin")], get_name=lambda: "ops")
    assert tenants_of(fab, TENANTS, multi_team=True) is ALL
    assert visible(ALL, TENANTS) == sorted(TENANTS)


def test_single_bundle_mode_shows_every_tenant_and_no_user_none():
    """Without multi-team every user sees every tenant's DAGs in Airflow too (mlplatform.tenants.access)."""
    assert tenants_of(simple_user("acme-dev", "user"), TENANTS, multi_team=False) is ALL
    assert tenants_of(None, TENANTS, multi_team=False) == set()


def test_team_members_see_their_teams_only(monkeypatch):
    """Multi-team: the auth manager's authorized teams (the simple auth manager: the user's teams)."""
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    import airflow.api_fastapi.app as api_app

    monkeypatch.setenv("AIRFLOW__CORE__MULTI_TEAM", "True")  # visible_tenants reads the config itself
    manager = SimpleAuthManager()
    monkeypatch.setattr(api_app, "get_auth_manager", lambda: manager)
    monkeypatch.setattr(SimpleAuthManager, "get_authorized_teams",
                        lambda self, *, user, **kw: self.filter_authorized_teams(
                            teams_names={"acme", "acme-labs", "globex", "initech"}, user=user))
    assert tenants_of(simple_user("alice", "user", ["acme"]), TENANTS, multi_team=True) == {"acme"}
    assert tenants_of(simple_user("bob", "op", ["acme", "globex"]), TENANTS, multi_team=True) == {"acme", "globex"}
    assert tenants_of(simple_user("carol", "viewer", ["initech"]), TENANTS, multi_team=True) == set()
    assert tenants_of(simple_user("dave", "user"), TENANTS, multi_team=True) == set()


def test_render_escapes_and_marks_values():
    data = PageData(user="acme_user", scope="acme", tenants=[TenantRow("acme", "o@x", "", 2, 8, 2, [
        PoolRow("acme__gpu", "gpu", True, 2, 1, running=0, queued=0, deferred=1, open=1, include_deferred=True),
        PoolRow("acme__cpu", "cpu", False)])],
        pipelines=[PipelineRow("acme", "churn", "acme__churn", None, True, False,
                               RunRow("manual__1", "failed", "manual", "2026-11-01T00:00:00", None, None))],
        models=[ModelRow("acme.churn", "acme", "0.5", {"champion": "2"},
                         [VersionRow("2", ["champion"], None, canary_state="baking", canary_step="2/3")])],
        broken=[BrokenRow("acme", "acme__oops", "specs/acme/oops.yaml", ["specs/acme/oops.yaml:6:3: <script>x</script>"])])
    page = render(data)
    assert "<script>x" not in page and "&lt;script&gt;x" in page
    assert 'data-pool="acme__gpu"' in page and 'data-field="deferred">1<' in page
    assert "pool missing" in page  # acme__cpu does not exist
    assert 'data-aliases="champion"' in page and "step 2/3" in page
    assert 'class="state failed" data-testid="run-state">failed<' in page


def test_plugin_import_is_cheap():
    """Every Airflow component imports the plugin: no FastAPI, MLflow, page or security module with it."""
    code = ("import sys, mlplatform.plugin as p; "
            "heavy = [m for m in ('fastapi', 'mlflow', 'sklearn', 'pandas', 'mlplatform.ui.page', 'mlplatform.ui.app', "
            "'airflow.api_fastapi.core_api.security') if m in sys.modules]; "
            "print(heavy); assert p.MlplatformPlugin.fastapi_apps[0]['url_prefix'] == '/mlplatform'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
