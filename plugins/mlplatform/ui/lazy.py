"""An ASGI app that imports and builds the real one on its first request.

Airflow's plugin manager imports plugin modules in every component (scheduler listeners, every task's
macros), while only the api-server serves ``fastapi_apps``: building FastAPI routes, Airflow's security
dependencies and the page module at plugin import would cost every one of them. Only the standard library
is imported here.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any, Callable


class LazyASGIApp:
    """Delegates to ``factory()`` (``"module:function"``), called once, on the first HTTP request."""

    def __init__(self, factory: str):
        self.factory = factory
        self._app: Callable[..., Any] | None = None
        self._lock = threading.Lock()

    def _load(self) -> Callable[..., Any]:
        with self._lock:
            if self._app is None:
                module, _, name = self.factory.partition(":")
                self._app = getattr(importlib.import_module(module), name)()
        return self._app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        app = self._app or self._load()
        await app(scope, receive, send)
