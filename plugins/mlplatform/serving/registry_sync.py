"""The standalone gateway's routing table, derived from the MLflow registry (so a restart restores it).

For every registered model named ``<tenant>.<pipeline>`` with a ``champion`` alias the route is: champion,
plus the ``challenger`` alias at the share recorded by the deploy stage's canary in the registered-model tag
``mlplatform.canary_share`` (absent or 0: the challenger gets no traffic, e.g. after a rollback, while its
alias stays for inspection). ``RegistryWatcher`` re-reads the registry every few seconds and hot-swaps
changed routes; when MLflow is unreachable it keeps serving the last table it read.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from mlplatform.serving.gateway import Gateway, Route

log = logging.getLogger(__name__)

SHARE_TAG = "mlplatform.canary_share"
MODEL_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z][a-z0-9-]*$")


def route_for(aliases: dict[str, Any], tags: dict[str, str]) -> Route | None:
    champion = aliases.get("champion")
    if champion is None:
        return None
    challenger = aliases.get("challenger")
    try:
        share = float(tags.get(SHARE_TAG, "0") or 0)
    except ValueError:
        share = 0.0
    share = min(max(share, 0.0), 1.0)
    if challenger is None or str(challenger) == str(champion) or share <= 0.0:
        return Route(str(champion))
    return Route(str(champion), str(challenger), share)


def routes_from_registry(client: Any) -> dict[str, Route]:
    """``<tenant>.<pipeline>`` -> Route for every registered model with a champion."""
    routes = {}
    page_token = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=page_token)
        for model in page:
            if not MODEL_NAME_RE.match(model.name):
                continue
            aliases = dict(model.aliases or {})
            if not aliases:  # some stores leave aliases out of search results
                model = client.get_registered_model(model.name)
                aliases = dict(model.aliases or {})
            route = route_for(aliases, dict(model.tags or {}))
            if route is not None:
                routes[model.name] = route
        page_token = getattr(page, "token", None)
        if not page_token:
            return routes


class RegistryWatcher:
    """Polls the registry and applies route changes to a gateway (one model's failure spares the others)."""

    def __init__(self, gateway: Gateway, client: Any, interval: float = 10.0):
        self.gateway = gateway
        self.client = client
        self.interval = interval
        self.last_error: str | None = None
        self.syncs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync_once(self) -> dict[str, str]:
        """Apply the registry's routes; returns name -> what changed."""
        try:
            wanted = routes_from_registry(self.client)
        except Exception as exc:  # noqa: BLE001 - MLflow down: keep the current table
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("registry unreachable, keeping the current routing table: %s", self.last_error)
            return {}
        current = self.gateway.routes
        changes = {}
        for name, route in wanted.items():
            if current.get(name) == route:
                continue
            try:
                self.gateway.apply_route(name, route)
                self.gateway.reset_stats(name)  # stats describe the current route only (a canary step)
                changes[name] = f"{current.get(name)} -> {route}"
                log.info("route %s: %s", name, changes[name])
            except Exception as exc:  # noqa: BLE001 - a model that cannot load keeps its old route
                log.exception("route %s: could not load %s, keeping %s", name, route, current.get(name))
                changes[name] = f"load failed: {exc}"
        for name in [n for n in list(current) if n not in wanted]:
            self.gateway.remove_route(name)
            changes[name] = "removed"
            log.info("route %s removed (no champion any more)", name)
        self.last_error = None
        self.syncs += 1
        return changes

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="registry-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sync_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
