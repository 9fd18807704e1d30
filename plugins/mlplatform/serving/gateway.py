"""Embedded model gateway: FastAPI serving each model's champion and challenger with a traffic split.

``create_app`` builds the app; ``GatewayServer`` runs it with uvicorn in a background thread on
127.0.0.1 and an ephemeral port. Models are loaded from the MLflow registry by version and cached;
``Gateway.set_route`` swaps versions while serving. Never imported by DAG parsing (mlflow and pandas
are still imported lazily, so the app starts fast and loads models in the background).

Endpoints: ``POST /v1/models/<tenant>/<pipeline>:predict`` (``inputs``: one row, or ``instances``: rows
served by one variant), ``:batchPredict`` (``instances`` with optional per-row ``routing_keys``: each row is
routed on its own), ``GET /v1/models/<tenant>/<pipeline>/stats`` (per-variant counters the canary gates
read), ``GET /v1/routes``, ``/healthz``, ``/readyz``, ``/metrics``. With a ``TokenAuth`` every endpoint but
the probes needs a bearer token (see ``mlplatform.serving.auth``): a model endpoint the tenant's (or the
platform's), ``/v1/routes`` and ``/metrics`` show the platform token everything and a tenant's token only
that tenant's models. ``mlplatform.serving.guard`` checks the token and the limits (body size, instances per
request, header size and time) before a handler runs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from starlette.concurrency import run_in_threadpool

from mlplatform.serving.auth import Principal, TokenAuth
from mlplatform.serving.guard import (
    KEEP_ALIVE_SECONDS, Guard, Limits, RequestError, batch_rows, hardened_protocol, predict_rows, principal_of,
)
from mlplatform.serving.predlog import JsonlLog, PredictionLog

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
LATENCY_WINDOW = 100_000  # latencies kept per variant for percentiles
PREDICTION_WINDOW = 20_000  # predictions kept per variant for the distribution-shift gate
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
Predictor = Callable[[list[dict[str, Any]]], list[Any]]
Version = str | int


@dataclass(frozen=True)
class Route:
    """One model's versions: the champion, and optionally a challenger taking ``share`` of the traffic."""

    champion: str
    challenger: str | None = None
    share: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"challenger share {self.share} is outside 0..1")

    def versions(self) -> dict[str, str]:
        """Variant -> model version."""
        if self.challenger is None:
            return {CHAMPION: self.champion}
        return {CHAMPION: self.champion, CHALLENGER: self.challenger}

    def choose(self, rng: random.Random, routing_key: str | None = None) -> str:
        """Weighted random variant, or sticky by a hash of ``routing_key`` when given."""
        if self.challenger is None or self.share <= 0.0:
            return CHAMPION
        if routing_key is None:
            draw = rng.random()
        else:
            draw = int.from_bytes(hashlib.sha256(routing_key.encode()).digest()[:8], "big") / 2**64
        return CHALLENGER if draw < self.share else CHAMPION


@dataclass
class RoutingTable:
    """Routes per registered model name (``<tenant>.<pipeline>``)."""

    routes: dict[str, Route] = field(default_factory=dict)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(len(sorted_values) * q / 100))
    return sorted_values[rank - 1]


@dataclass
class VariantStats:
    """In-memory counters of one (model, variant, version), read by the deploy stage's gates."""

    requests: int = 0
    errors: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    predictions: deque[float] = field(default_factory=lambda: deque(maxlen=PREDICTION_WINDOW))

    def summary(self, with_predictions: bool = False) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        out = {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else 0.0,
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
        }
        if with_predictions:
            out["predictions"] = list(self.predictions)
        return out


def numeric_outputs(predictions: list[Any] | None) -> list[float]:
    """The scalar numeric predictions of a response (for the distribution-shift gate)."""
    if not predictions:
        return []
    out = []
    for p in predictions:
        if isinstance(p, list) and len(p) == 1:
            p = p[0]
        if isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p):
            out.append(float(p))
    return out


def load_predictor(tracking_uri: str, name: str, version: str) -> Predictor:
    """Load one registered model version: P(label=1) via the native flavor when it has predict_proba."""
    import mlflow
    from mlflow.models import Model

    # Resolve the location through a client: download_artifacts("models:/...") ignores its registry_uri
    # argument and asks the process-wide registry.
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    location = client.get_model_version_download_uri(name, version)
    path = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=tracking_uri)
    flavors = Model.load(path).flavors
    native = None
    if "sklearn" in flavors:
        native = mlflow.sklearn.load_model(path)
    elif "xgboost" in flavors:
        native = mlflow.xgboost.load_model(path)
    if native is not None and hasattr(native, "predict_proba"):
        return _proba_predictor(native)
    return _pyfunc_predictor(mlflow.pyfunc.load_model(path))


def _proba_predictor(model: Any) -> Predictor:
    import pandas as pd

    names = getattr(model, "feature_names_in_", None)
    columns = None if names is None else [str(c) for c in names]

    def predict(rows: list[dict[str, Any]]) -> list[Any]:
        frame = pd.DataFrame.from_records(rows, columns=columns)
        return model.predict_proba(frame)[:, 1].tolist()

    return predict


def _pyfunc_predictor(model: Any) -> Predictor:
    import numpy as np
    import pandas as pd

    def predict(rows: list[dict[str, Any]]) -> list[Any]:
        frame = pd.DataFrame.from_records(rows)
        # JSON has no int/float distinction: a client's 3 for a float feature must not fail MLflow's schema check.
        ints = frame.select_dtypes(include="integer").columns
        frame[ints] = frame[ints].astype("float64")
        out = model.predict(frame)
        return np.asarray(out.to_numpy() if hasattr(out, "to_numpy") else out).tolist()

    return predict


class _TenantMetrics:
    """A registry view with only the samples of the principal's tenants (``tenant`` label)."""

    def __init__(self, registry: CollectorRegistry, principal: Principal):
        self.registry, self.principal = registry, principal

    def collect(self):
        for family in self.registry.collect():
            samples = [s for s in family.samples if self.principal.may_use(s.labels.get("tenant", ""))]
            if samples:
                view = Metric(family.name, family.documentation, family.type, family.unit)
                view.samples = samples
                yield view


class Gateway:
    """Routes, model cache, stats, Prometheus metrics and the prediction log behind one app."""

    def __init__(self, tracking_uri: str, routes: RoutingTable, log_dir: Path | None = None, seed: int = 0,
                 prediction_log: PredictionLog | None = None, auth: TokenAuth | None = None,
                 loader: Callable[[str, str, str], Predictor] | None = None):
        self.tracking_uri = tracking_uri
        self.routes: dict[str, Route] = dict(routes.routes)
        if prediction_log is None:
            if log_dir is None:
                raise ValueError("give log_dir or prediction_log")
            prediction_log = JsonlLog(log_dir)
        self.prediction_log = prediction_log
        self.auth = auth
        self.loader = loader or load_predictor
        self.rng = random.Random(seed)
        self.load_error: str | None = None
        self._models: dict[tuple[str, str], Predictor] = {}
        self._stats: dict[tuple[str, str, str], VariantStats] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self.registry = CollectorRegistry()
        labels = ("tenant", "pipeline", "variant")
        self._requests = Counter("mlplatform_gateway_requests", "Prediction requests.", labels, registry=self.registry)
        self._errors = Counter("mlplatform_gateway_errors", "Failed predictions.", labels, registry=self.registry)
        self._latency = Histogram(
            "mlplatform_gateway_latency_seconds", "Prediction latency.", labels,
            registry=self.registry, buckets=LATENCY_BUCKETS,
        )

    def _ensure_loaded(self, name: str, route: Route) -> None:
        with self._load_lock:
            for version in route.versions().values():
                if (name, version) not in self._models:
                    self._models[(name, version)] = self.loader(self.tracking_uri, name, version)

    def load_all(self) -> None:
        """Load every routed version (run in the background at startup; failures show in /readyz)."""
        try:
            for name, route in list(self.routes.items()):
                self._ensure_loaded(name, route)
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and GatewayServer
            log.exception("gateway could not load its models")
            self.load_error = f"{type(exc).__name__}: {exc}"

    def missing(self) -> list[str]:
        """Routed ``name/version`` pairs not loaded yet."""
        with self._lock:
            routed = [(n, v) for n, r in self.routes.items() for v in r.versions().values()]
        return [f"{n}/{v}" for n, v in routed if (n, v) not in self._models]

    def ready(self) -> bool:
        return self.load_error is None and not self.missing()

    def set_route(self, name: str, champion: Version, challenger: Version | None = None, share: float = 0.0) -> None:
        """Hot reload: load the new versions first, then swap the route and drop unused models."""
        self.apply_route(name, Route(str(champion), None if challenger is None else str(challenger), share))

    def apply_route(self, name: str, route: Route) -> None:
        """Load the route's versions, then swap it in (requests never see a half-loaded route)."""
        self._ensure_loaded(name, route)
        with self._lock:
            self.routes[name] = route
            self._drop_unused()

    def remove_route(self, name: str) -> None:
        with self._lock:
            self.routes.pop(name, None)
            self._drop_unused()

    def _drop_unused(self) -> None:
        used = {(n, v) for n, r in self.routes.items() for v in r.versions().values()}
        for key in [k for k in self._models if k not in used]:
            del self._models[key]

    def route_table(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {n: {"champion": r.champion, "challenger": r.challenger, "share": r.share}
                    for n, r in sorted(self.routes.items())}

    def reset_stats(self, name: str) -> None:
        """Forget the in-memory stats of ``name`` (the canary does this at the start of every step)."""
        with self._lock:
            for key in [k for k in self._stats if k[0] == name]:
                del self._stats[key]

    def pick(self, name: str, routing_key: str | None) -> tuple[str, str, Predictor]:
        """Variant, version and predictor for one request."""
        with self._lock:
            route = self.routes.get(name)
            if route is None:
                raise HTTPException(404, f"no model {name!r} is served here")
            variant = route.choose(self.rng, routing_key)
            version = route.versions()[variant]
            predictor = self._models.get((name, version))
        if predictor is None:
            raise HTTPException(503, f"model {name} version {version} is still loading")
        return variant, version, predictor

    def serve(self, name: str, variant: str, version: str, predictor: Predictor,
              rows: list[dict[str, Any]]) -> tuple[list[Any] | None, str | None, str]:
        """Run the model on ``rows``, record the request; (predictions, error, request id)."""
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        try:
            predictions, error = predictor(rows), None
        except Exception as exc:  # noqa: BLE001 - a failing model is a 500 for this request only
            predictions, error = None, f"{type(exc).__name__}: {exc}"
        latency_ms = (time.perf_counter() - started) * 1000
        self.record(name, variant, version, {
            "request_id": request_id, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "variant": variant, "model_version": version, "n_instances": len(rows),
            "inputs": rows, "outputs": predictions, "latency_ms": round(latency_ms, 3),
            "status": "ok" if error is None else "error", "error": error,
        })
        return predictions, error, request_id

    def record(self, name: str, variant: str, version: str, entry: dict[str, Any]) -> None:
        """Count one request in stats and metrics and append it to the model's prediction log."""
        tenant, _, pipeline = name.partition(".")
        labels = (tenant, pipeline, variant)
        failed = entry["status"] != "ok"
        self._requests.labels(*labels).inc()
        self._latency.labels(*labels).observe(entry["latency_ms"] / 1000)
        if failed:
            self._errors.labels(*labels).inc()
        outputs = numeric_outputs(entry.get("outputs"))
        with self._lock:
            stats = self._stats.setdefault((name, variant, version), VariantStats())
            stats.requests += 1
            stats.errors += failed
            stats.latencies_ms.append(entry["latency_ms"])
            stats.predictions.extend(outputs)
        self.prediction_log.write(name, entry)

    def stats(self, name: str, with_predictions: bool = False) -> dict[str, dict[str, Any]]:
        """Variant -> stats summary for the versions currently routed for ``name``."""
        with self._lock:
            route = self.routes[name]
            return {
                variant: self._stats.get((name, variant, version), VariantStats()).summary(with_predictions)
                | {"version": version}
                for variant, version in route.versions().items()
            }

    def close(self) -> None:
        self.prediction_log.close()


def create_app(tracking_uri: str, routes: RoutingTable, log_dir: str | Path | None = None, seed: int = 0, *,
               prediction_log: PredictionLog | None = None, auth: TokenAuth | None = None,
               loader: Callable[[str, str, str], Predictor] | None = None,
               on_startup: Callable[[Gateway], None] | None = None, limits: Limits | None = None) -> FastAPI:
    """The gateway app; its ``Gateway`` is ``app.state.gateway``.

    Prediction logs go to ``prediction_log``, else JSONL files in ``log_dir``. ``on_startup`` runs in the
    background after the routed models are loaded (the standalone gateway starts its registry watcher there).
    ``limits`` default to ``Limits.from_env()`` (see ``mlplatform.serving.guard``).
    """
    limits = limits or Limits.from_env()
    gateway = Gateway(tracking_uri, routes, None if log_dir is None else Path(log_dir), seed,
                      prediction_log=prediction_log, auth=auth, loader=loader)

    def start() -> None:
        gateway.load_all()
        if on_startup is not None:
            on_startup(gateway)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        threading.Thread(target=start, name="gateway-loader", daemon=True).start()
        yield
        gateway.close()

    # No /docs, /redoc or /openapi.json: nothing a client needs, and less to expose.
    app = FastAPI(title="mlplatform gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    app.state.limits = limits
    # Outermost: the token and the body limits are checked before any routing, parsing or logging.
    app.add_middleware(Guard, auth=lambda: gateway.auth, limits=limits)

    @app.exception_handler(RequestError)
    async def refused(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        """Ready or not for anyone (probes); which models are missing and why only for a token that sees them."""
        principal = principal_of(request.scope)
        body: dict[str, Any] = {"ready": gateway.ready()}
        if principal.platform or principal.tenants:
            body["missing"] = [m for m in gateway.missing() if principal.sees(m)]
            body["error"] = gateway.load_error if principal.platform else None
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        principal = principal_of(request.scope)
        registry = gateway.registry if principal.platform else _TenantMetrics(gateway.registry, principal)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/routes")
    def routes_view(request: Request) -> dict[str, Any]:
        principal = principal_of(request.scope)
        return {"routes": {n: r for n, r in gateway.route_table().items() if principal.sees(n)}}

    def predict_sync(name: str, routing_key: str | None, rows: list[dict[str, Any]]) -> JSONResponse:
        variant, version, predictor = gateway.pick(name, routing_key)
        predictions, error, request_id = gateway.serve(name, variant, version, predictor, rows)
        head = {"variant": variant, "model_version": version, "request_id": request_id}
        if error is not None:
            return JSONResponse({"error": error, **head}, status_code=500)
        return JSONResponse({"predictions": predictions, **head})

    def allow(request: Request, tenant: str) -> None:
        """The Guard has checked this already; checked again where the handler takes ``tenant`` from the route."""
        if not principal_of(request.scope).may_use(tenant):
            raise HTTPException(403, f"this token may not use tenant {tenant!r}'s models")

    # The Guard has authorized the path's tenant and read the body within the limit; the handlers parse it
    # on the event loop (one at a time, bounded by the instance cap) and predict in the thread pool.
    @app.post("/v1/models/{tenant}/{pipeline}:predict")
    async def predict(tenant: str, pipeline: str, request: Request) -> JSONResponse:
        allow(request, tenant)
        rows = predict_rows(await request.body(), limits.max_instances)
        return await run_in_threadpool(predict_sync, f"{tenant}.{pipeline}",
                                       request.headers.get("x-routing-key"), rows)

    @app.post("/v1/models/{tenant}/{pipeline}:batchPredict")
    async def batch_predict(tenant: str, pipeline: str, request: Request) -> JSONResponse:
        """Each row routed on its own; rows of one variant are predicted together (one log entry per group)."""
        allow(request, tenant)
        rows, keys = batch_rows(await request.body(), limits.max_instances)
        return await run_in_threadpool(batch_sync, f"{tenant}.{pipeline}", rows, keys)

    def batch_sync(name: str, rows: list[dict[str, Any]], keys: list[str | None]) -> JSONResponse:
        groups: dict[str, list[int]] = {}
        chosen: dict[str, tuple[str, Predictor]] = {}
        for i, key in enumerate(keys):
            variant, version, predictor = gateway.pick(name, key)
            groups.setdefault(variant, []).append(i)
            chosen[variant] = (version, predictor)
        predictions: list[Any] = [None] * len(rows)
        variants: list[str] = [""] * len(rows)
        versions: list[str] = [""] * len(rows)
        errors, request_ids = [], []
        for variant, idx in groups.items():
            version, predictor = chosen[variant]
            out, error, request_id = gateway.serve(name, variant, version, predictor, [rows[i] for i in idx])
            request_ids.append(request_id)
            if error is not None:
                errors.append({"variant": variant, "model_version": version, "error": error})
                continue
            for i, p in zip(idx, out):
                predictions[i], variants[i], versions[i] = p, variant, version
        body_out = {"predictions": predictions, "variants": variants, "model_versions": versions,
                    "request_ids": request_ids}
        if errors:
            return JSONResponse({**body_out, "errors": errors}, status_code=500)
        return JSONResponse(body_out)

    @app.get("/v1/models/{tenant}/{pipeline}/stats")
    def stats_view(request: Request, tenant: str, pipeline: str, predictions: bool = False) -> dict[str, Any]:
        allow(request, tenant)
        name = f"{tenant}.{pipeline}"
        if name not in gateway.route_table():
            raise HTTPException(404, f"no model {name!r} is served here")
        return gateway.stats(name, with_predictions=predictions)

    return app


class GatewayServer:
    """Context manager running a gateway app with uvicorn in a thread on 127.0.0.1 and a free port."""

    def __init__(self, app: FastAPI, startup_timeout: float = 120.0, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.gateway: Gateway = app.state.gateway
        self.startup_timeout = startup_timeout
        self.host = host
        self.bind_port = port
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def set_route(self, name: str, champion: Version, challenger: Version | None = None, share: float = 0.0) -> None:
        """Hot reload (see ``Gateway.set_route``)."""
        self.gateway.set_route(name, champion, challenger, share)

    def __enter__(self) -> GatewayServer:
        limits: Limits = getattr(self.app.state, "limits", None) or Limits.from_env()
        config = uvicorn.Config(
            self.app, host=self.host, port=self.bind_port, log_config=None, access_log=False,
            timeout_graceful_shutdown=5, server_header=False,
            # slow clients and floods: see mlplatform.serving.guard
            http=hardened_protocol(limits), h11_max_incomplete_event_size=limits.max_header_bytes,
            timeout_keep_alive=KEEP_ALIVE_SECONDS, limit_concurrency=limits.max_connections,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="gateway-server", daemon=True)
        self._thread.start()
        try:
            self._wait_started(time.monotonic() + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_started(self, deadline: float) -> None:
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("gateway server exited during startup")
            self._check_deadline(deadline, "start")
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        while not self.gateway.ready():
            if self.gateway.load_error:
                raise RuntimeError(f"gateway could not load its models: {self.gateway.load_error}")
            self._check_deadline(deadline, "load its models")

    def _check_deadline(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"gateway did not {what} within {self.startup_timeout:.0f}s")
        time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
