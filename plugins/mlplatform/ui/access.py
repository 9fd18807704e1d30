"""Which tenants a signed-in Airflow user may see on the platform page: ``tenants_of(user)``.

Rules, first match wins:

1. **Platform admin -> every tenant** (``ALL``): the SimpleAuthManager role ``admin`` (also the user of
   ``simple_auth_manager_all_admins`` mode), or a FAB user with the ``Admin`` role.
2. **Teams -> those tenants**: with ``[core] multi_team = True`` a tenant is an Airflow team of the same
   name (``[core] simple_auth_manager_users = "acme_user:user:acme"``; a user may be in several:
   ``acme|globex``). The user object carries them as ``user.teams``.
3. **Fallback without teams (multi_team off) -> the tenant its user name starts with**: ``acme`` or
   ``acme_<anything>`` / ``acme-<anything>`` sees tenant ``acme``. User names are chosen by the platform
   team (auth manager config), so this is a naming convention, not something a user can pick.
4. Anything else sees **no tenant** (fail closed): the page then says so.

Names that are not tenants (a team without a tenant file, say) are dropped by the caller, which intersects
with the known tenants (:func:`visible`).
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

    def __reduce__(self) -> str:
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


def tenants_of(user: Any, known_tenants: Iterable[str] | None = None) -> set[str] | _AllTenants:
    """``ALL`` for platform admins, else the tenant names the user may see (possibly empty).

    ``known_tenants`` is only needed for the user-name fallback (rule 3).
    """
    if user is None:
        return set()
    if is_platform_admin(user):
        return ALL
    teams = [t for t in (getattr(user, "teams", None) or []) if t]
    if teams:
        return set(teams)
    name = user_name(user)
    if not getattr(user, "role", "x"):  # SimpleAuthManager user without a role has no access anywhere
        return set()
    for tenant in sorted(known_tenants or (), key=len, reverse=True):
        if name == tenant or name.startswith((f"{tenant}_", f"{tenant}-")):
            return {tenant}
    return set()


def visible(scope: set[str] | _AllTenants, tenants: Iterable[str]) -> list[str]:
    """The known tenants inside ``scope``, sorted."""
    return sorted(t for t in tenants if t in scope)
