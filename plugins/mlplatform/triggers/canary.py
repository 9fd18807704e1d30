"""The canary bake as a trigger: waits in the triggerer while the standalone gateway serves real traffic.

``GatewayBakeTrigger`` (1) polls the gateway's ``/v1/routes`` until it serves the step's route (it follows
the MLflow aliases and share tag on its own; its per-model stats restart when the route changes), (2) sleeps
for the bake time, (3) reads the step's per-variant stats and returns them in the event for the task's
``execute_complete`` to judge. Only httpx and asyncio here: the triggerer imports no ML library.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

MAX_PREDICTIONS = 2000  # prediction sample per variant carried in the event (for the shift gate)


class GatewayBakeTrigger(BaseTrigger):
    def __init__(self, url: str, model: str, champion: str, challenger: str, share: float, bake_seconds: float,
                 token: str | None = None, route_timeout: float = 300.0, poll_interval: float = 1.0):
        super().__init__()
        self.url, self.model, self.champion, self.challenger = url.rstrip("/"), model, champion, challenger
        self.share, self.bake_seconds, self.token = share, bake_seconds, token
        self.route_timeout, self.poll_interval = route_timeout, poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("mlplatform.triggers.canary.GatewayBakeTrigger", {
            "url": self.url, "model": self.model, "champion": self.champion, "challenger": self.challenger,
            "share": self.share, "bake_seconds": self.bake_seconds, "token": self.token,
            "route_timeout": self.route_timeout, "poll_interval": self.poll_interval,
        })

    def _wanted(self) -> dict[str, Any]:
        return {"champion": self.champion, "challenger": self.challenger, "share": self.share}

    async def run(self):
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        tenant, _, pipeline = self.model.partition(".")
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30) as http:
            deadline = time.monotonic() + self.route_timeout
            while True:
                try:
                    routes = (await http.get("/v1/routes")).json()["routes"]
                    if routes.get(self.model) == self._wanted():
                        break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                if time.monotonic() > deadline:
                    yield TriggerEvent({"status": "error", "message": f"the gateway at {self.url} did not serve "
                                        f"{self._wanted()} for {self.model} within {self.route_timeout:.0f}s"})
                    return
                await asyncio.sleep(self.poll_interval)
            started = time.monotonic()
            await asyncio.sleep(self.bake_seconds)
            response = await http.get(f"/v1/models/{tenant}/{pipeline}/stats", params={"predictions": "true"})
            if response.status_code != 200:
                yield TriggerEvent({"status": "error", "message": f"stats: HTTP {response.status_code} "
                                    f"{response.text[:500]}"})
                return
            stats = response.json()
            for variant in stats.values():
                variant["predictions"] = (variant.get("predictions") or [])[-MAX_PREDICTIONS:]
            yield TriggerEvent({"status": "baked", "stats": stats, "share": self.share,
                                "bake_seconds": round(time.monotonic() - started, 2)})
