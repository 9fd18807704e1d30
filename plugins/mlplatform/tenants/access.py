"""Which tenants the calling user may see, for code inside the api-server (FastAPI plugin apps).

Tenant = Airflow team. In multi-team mode a user sees the teams the auth manager authorizes it for (an
admin: every team); in the single-bundle mode every user sees every tenant, as it sees every DAG.

    @app.get("/overview")
    def overview(tenants: CurrentTenantsDep): ...   # 401 without a valid token, like /api/v2
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import Depends


def visible_tenants(user, tenants: Iterable[str]) -> set[str]:
    """The names of ``tenants`` whose DAGs, runs and pools ``user`` (an auth-manager user) may see."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.configuration import conf

    names = set(tenants)
    if not conf.getboolean("core", "multi_team"):
        return names
    return names & get_auth_manager().get_authorized_teams(user=user)


def current_tenants(user: GetUserDep) -> set[str]:
    """FastAPI dependency: the calling user's tenants, from the platform's tenant files."""
    from mlplatform.config import get_config
    from mlplatform.spec.loader import load_catalog

    return visible_tenants(user, load_catalog(get_config(), only=[]).tenants)


CurrentTenantsDep = Annotated[set[str], Depends(current_tenants)]
