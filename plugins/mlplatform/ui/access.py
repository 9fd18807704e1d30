"""Which tenants a signed-in Airflow user may see on the platform page: ``tenants_of(user)``.

One definition of "a user's tenants" for the whole platform: tenant = Airflow team, and the auth manager
decides (:func:`mlplatform.tenants.access.visible_tenants`, the contract ``mlplatform sync`` sets up).
First match wins:

1. no user -> no tenant;
2. **platform admin -> every tenant** (``ALL``): SimpleAuthManager role ``admin`` (also the user of
   ``simple_auth_manager_all_admins``, the local default), or a FAB user with the ``Admin`` role;
3. **multi-team mode** (``[core] multi_team = True``, made by ``mlplatform sync``): the tenants whose team
   the auth manager authorizes the user for (``get_authorized_teams``; for the simple auth manager the
   ``teams`` of ``simple_auth_manager_users = "acme-dev:user:acme"``). A user in no team sees no tenant;
4. **single-bundle mode** (multi-team off): every tenant, as the user also sees every tenant's DAGs in
   Airflow itself; hiding them on one page would only pretend to isolate.

The page intersects the result with the tenants that have a tenant file (:func:`visible`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class _AllTenants:
    """Every tenant: ``"x" in ALL`` is always true."""

    def __contains__(self, item: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALL"


ALL = _AllTenants()
ADMIN_ROLES = frozenset({"admin"})


def is_platform_admin(user: Any) -> bool:
    role = getattr(user, "role", None)  # SimpleAuthManagerUser: one role name (or None: no access at all)
    if isinstance(role, str) and role.lower() in ADMIN_ROLES:
        return True
    roles = getattr(user, "roles", None) or []  # FAB: Role objects
    return any(str(getattr(r, "name", r)).lower() in ADMIN_ROLES for r in roles)


def user_name(user: Any) -> str:
    for attr in ("get_name", "get_id"):
        fn = getattr(user, attr, None)
        if callable(fn):
            try:
                value = fn()
            except Exception:  # noqa: BLE001 - an auth manager's user without that method
                continue
            if value:
                return str(value)
    return str(getattr(user, "username", "") or "")


def tenants_of(user: Any, known_tenants: Iterable[str], multi_team: bool | None = None) -> set[str] | _AllTenants:
    """``ALL`` or the names among ``known_tenants`` that ``user`` may see (possibly none).

    ``multi_team`` defaults to Airflow's ``[core] multi_team``; rule 3 asks the running api-server's auth
    manager, so it only works inside the api-server.
    """
    if user is None:
        return set()
    if is_platform_admin(user):
        return ALL
    if multi_team is None:
        from airflow.configuration import conf

        multi_team = conf.getboolean("core", "multi_team")
    if not multi_team:
        return ALL
    from mlplatform.tenants.access import visible_tenants

    return set(visible_tenants(user, known_tenants))


def visible(scope: set[str] | _AllTenants, tenants: Iterable[str]) -> list[str]:
    """The known tenants inside ``scope``, sorted."""
    return sorted(t for t in tenants if t in scope)
