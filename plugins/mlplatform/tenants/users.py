"""Tenant users for Airflow's simple auth manager: ``name:role:team1|team2`` entries and their passwords file.

A user listed in several tenant files is in several teams (with one role). Platform admins have the admin
role and no team: they see everything. Passwords are generated once per user and kept in a 0600 JSON file
(the format the simple auth manager reads); users that are gone lose their entry.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from mlplatform.config import PlatformConfig
from mlplatform.spec.model import TenantFile
from mlplatform.tenants.reconcile import Change, tenant_problem


def user_entries(tenants: dict[str, TenantFile], admins: list[str]) -> dict[str, str]:
    """``{name: "name:role[:teams]"}`` for ``[core] simple_auth_manager_users`` (call after ``user_problems``)."""
    roles: dict[str, str] = {}
    teams: dict[str, list[str]] = {}
    for name, tenant in sorted(tenants.items()):
        for user in tenant.spec.users:
            roles[user.name] = user.role
            teams.setdefault(user.name, []).append(name)
    entries = {admin: f"{admin}:admin" for admin in admins}
    entries.update({user: f"{user}:{roles[user]}:{'|'.join(teams[user])}" for user in sorted(roles)})
    return entries


def user_problems(tenants: dict[str, TenantFile], admins: list[str], config: PlatformConfig) -> list[str]:
    """A user with two roles, or a tenant user named like a platform admin."""
    problems = []
    seen: dict[str, tuple[str, str]] = {}
    for name, tenant in sorted(tenants.items()):
        for index, user in enumerate(tenant.spec.users):
            where = ("spec", "users", index, "name")
            if user.name in admins:
                problems.append(tenant_problem(config, name, where, f"{user.name!r} is a platform admin user name"))
            elif user.name in seen and seen[user.name][1] != user.role:
                other, role = seen[user.name]
                problems.append(tenant_problem(config, name, where, f"user {user.name!r} has role {role!r} in tenant "
                                               f"{other!r}; a user has one role in all its tenants"))
            seen.setdefault(user.name, (name, user.role))
    return problems


def sync_users(path: Path, entries: dict[str, str], old_entries: set[str], dry_run: bool = False) -> list[Change]:
    """Give every user a password (kept when it has one); drop the passwords of users that are gone.

    ``old_entries``: the ``name:role:teams`` entries Airflow runs with now, to report role and team changes.
    """
    have: dict[str, str] = json.loads(path.read_text() or "{}") if path.is_file() else {}
    want = {user: have.get(user) or secrets.token_urlsafe(12) for user in entries}
    changes = []
    for user, entry in entries.items():
        role_teams = entry.split(":", 1)[1]
        if user not in have:
            changes.append(Change("user", "create", user, f"{role_teams}; password in {path}"))
        else:
            changes.append(Change("user", "unchanged" if entry in old_entries else "update", user, role_teams))
    changes += [Change("user", "delete", user, "in no tenant file") for user in sorted(set(have) - set(entries))]
    if want != have and not dry_run:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(want, indent=1) + "\n")
        tmp.replace(path)
    return changes
