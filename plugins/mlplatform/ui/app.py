"""The platform page's FastAPI app, mounted by the api-server at ``/mlplatform`` (see mlplatform.plugin).

``GET /mlplatform/`` is the HTML page, ``GET /mlplatform/api/summary`` the same data as JSON. The user is
the Airflow auth manager's user of the request (Airflow's own ``get_user`` dependency: the UI's JWT
cookie or an ``Authorization: Bearer`` token); without one the browser is sent to the auth manager's login
page. What a user sees is cut to :func:`mlplatform.ui.access.tenants_of`.
"""

# No ``from __future__ import annotations``: FastAPI resolves the route annotations (Request, imported
# inside create_app) at definition time.
from typing import Any


def create_app():
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

    from mlplatform.config import load_config
    from mlplatform.spec.loader import load_catalog
    from mlplatform.ui.access import tenants_of, user_name
    from mlplatform.ui.page import collect, render

    app = FastAPI(title="mlplatform platform page", docs_url=None, redoc_url=None, openapi_url=None)

    async def optional_user(request: Request, credentials=Depends(bearer_scheme)) -> Any:
        try:
            return await get_user(request, None, credentials)
        except HTTPException as exc:
            if exc.status_code in (401, 403):
                return None
            raise

    def page_data(user: Any):
        config = load_config()  # uncached: the api-server's environment, re-read per request
        known = load_catalog(config, only=[]).tenants  # tenant files only; collect() loads the specs
        return collect(config, tenants_of(user, known), user_name(user))

    def login_redirect(request: Request) -> RedirectResponse:
        return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)

    @app.get("/", response_class=HTMLResponse)
    def platform_page(request: Request, user: Any = Depends(optional_user)):
        if user is None:
            return login_redirect(request)
        return HTMLResponse(render(page_data(user)), headers={"Cache-Control": "no-store"})

    @app.get("/api/summary")
    def summary(user: Any = Depends(optional_user)):
        if user is None:
            return JSONResponse({"detail": "Not authenticated"}, status_code=401)
        return JSONResponse(page_data(user).to_json(), headers={"Cache-Control": "no-store"})

    return app
