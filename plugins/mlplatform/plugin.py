"""The mlplatform AirflowPlugin, registered by plugins/mlplatform_plugin.py (Airflow's plugin manager executes
every .py directly under plugins/; a pyproject entry point would be found twice with the editable install,
once in site-packages and once in plugins/mlplatform.egg-info, and Airflow reports the second as an error).

Airflow imports this module in every component that loads plugins (scheduler, api-server, every task
for macros), so it imports nothing but Airflow's plugin base and a stdlib ASGI shim: the platform page's
FastAPI app is built by the api-server on its first request (:mod:`mlplatform.ui.lazy`).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from mlplatform.ui.lazy import LazyASGIApp

URL_PREFIX = "/mlplatform"


class MlplatformPlugin(AirflowPlugin):
    name = "mlplatform"
    fastapi_apps = [{
        "app": LazyASGIApp("mlplatform.ui.app:create_app"),
        "url_prefix": URL_PREFIX,
        "name": "ML Platform page",
    }]
    # A navigation entry: the UI shows the page at /plugin/mlplatform, in an iframe of href.
    external_views = [{
        "name": "ML Platform",
        "href": f"{URL_PREFIX}/",
        "destination": "nav",
        "url_route": "mlplatform",
        "category": None,
    }]
