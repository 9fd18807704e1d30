"""Shared by the browser tests of the Airflow UI (test_platform_page.py, test_ui_trigger.py).

A real Airflow (api-server, scheduler, dag-processor; LocalExecutor, SQLite) with the SimpleAuthManager
in multi-team mode and known users: ``admin`` (platform admin), ``acme_user`` (team acme) and
``globex_user`` (team globex). Playwright drives Debian's Chromium (/usr/bin/chromium, installed by
tests/setup_browser.sh when missing); Playwright never downloads a browser.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import REPO, set_platform_environ, write_spec

CHROMIUM = Path("/usr/bin/chromium")
USERS = {"admin": ("admin", None), "acme_user": ("user", "acme"), "globex_user": ("user", "globex")}
PASSWORDS = {name: f"{name}-pw-0123" for name in USERS}

BROKEN_GLOBEX = ("apiVersion: mlplatform.io/v1\nkind: Pipeline\nmetadata: {name: broken, tenant: globex}\n"
                 "spec:\n  data: {source: globex/accounts, entity: account_id, timestamp: event_timestamp, label: upgraded}\n"
                 "  training: {resources: {gpu: 5}}\n")
BROKEN_ACME = ("apiVersion: mlplatform.io/v1\nkind: Pipeline\nmetadata: {name: oops, tenant: acme}\n"
               "spec:\n  data: {source: acme/churn, entity: customer_id, timestamp: event_timestamp, label: churned}\n"
               "  trainig: {framework: sklearn}\n")


def ensure_chromium() -> Path:
    if not CHROMIUM.exists():
        proc = subprocess.run(["sh", str(REPO / "tests" / "setup_browser.sh")], capture_output=True, text=True,
                              timeout=1200)
        if proc.returncode == 2:
            pytest.skip(proc.stderr.strip())
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert CHROMIUM.exists()
    return CHROMIUM


def auth_env(home: Path) -> dict[str, str]:
    """SimpleAuthManager with real users and teams (not the local default "everyone is admin")."""
    home.mkdir(parents=True, exist_ok=True)
    passwords = home / "simple_auth_manager_passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    users = ",".join(f"{u}:{role}" + (f":{team}" if team else "") for u, (role, team) in USERS.items())
    return {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": users,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__CORE__MULTI_TEAM": "True",
    }


def token(base_url: str, user: str) -> str:
    r = httpx.post(f"{base_url}/auth/token", json={"username": user, "password": PASSWORDS[user]}, timeout=30)
    r.raise_for_status()
    return r.json()["access_token"]


@contextmanager
def airflow_with_users(root: Path, broken: bool = True):
    """Example specs (plus two broken ones), pools synced, users above; yields a dict with env, api (admin),
    base_url, procs, config."""
    from mlplatform.config import load_config
    from mlplatform.local_airflow import ApiClient, airflow, airflow_env, free_port, running_airflow

    specs = root / "specs"
    shutil.copytree(REPO / "dags" / "specs", specs)
    if broken:
        write_spec(specs, "globex", "broken", BROKEN_GLOBEX)
        write_spec(specs, "acme", "oops", BROKEN_ACME)
    platform = {"MLPLATFORM_HOME": str(root / "home"), "MLPLATFORM_SPECS_DIR": str(specs),
                "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'home' / 'mlflow.db'}"}
    (root / "home").mkdir(parents=True, exist_ok=True)
    restore = set_platform_environ(platform)
    extra = {**platform, **auth_env(root / "airflow")}
    try:
        # multi-team: the auth manager refuses users whose teams are not in the metadata DB
        cli_env = airflow_env(root / "airflow", free_port(), None, extra)
        airflow(cli_env, "db", "migrate")
        for team in sorted({team for _, team in USERS.values() if team}):
            airflow(cli_env, "teams", "create", team)
        with running_airflow(root / "airflow", extra=extra) as (env, _, procs):
            base = procs.base_url
            api = ApiClient(base, token(base, "admin"))
            yield {"env": env, "api": api, "base_url": base, "procs": procs, "config": load_config(), "root": root}
    finally:
        restore()


@contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    ensure_chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM),
                              args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def login(context, base_url: str, user: str):
    """Log in through the SimpleAuthManager's login page; returns the page, on the Airflow UI."""
    page = context.new_page()
    page.goto(f"{base_url}/")
    page.wait_for_url("**/auth/login**")
    page.locator("input[name=username]").fill(user)
    page.locator("input[name=password]").fill(PASSWORDS[user])
    page.locator("button[type=submit]").click()
    page.wait_for_url(lambda url: "/auth/login" not in url, timeout=60_000)
    return page
