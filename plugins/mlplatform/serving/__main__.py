"""``python -m mlplatform.serving``: the standalone model gateway.

    python -m mlplatform.serving [serve] [--host H] [--port P] [--reload-interval S] [--tokens-file F]
                                         [--allow-anonymous]
    python -m mlplatform.serving token <tenant> [--tokens-file F]   # print a new token, store its digest
    python -m mlplatform.serving token '*' --from-env VAR           # store the platform token held in $VAR

Settings (environment, as set on the compose ``gateway`` service):

- ``MLPLATFORM_GATEWAY_HOST`` / ``MLPLATFORM_GATEWAY_PORT``: bind address, default 127.0.0.1:8000.
- ``MLFLOW_TRACKING_URI``: the registry the routing table is derived from (champion / challenger aliases and
  the canary share tag of every ``<tenant>.<pipeline>`` model); re-read every ``--reload-interval`` seconds,
  so moved aliases are hot-reloaded and a restart restores the table.
- ``MLPLATFORM_PREDICTION_LOG_URL``: ``postgresql://...`` logs predictions to PostgreSQL; unset: JSONL files
  under ``$MLPLATFORM_HOME/gateway/predictions``.
- Tokens: ``$MLPLATFORM_HOME/gateway/tokens.json`` (``--tokens-file``), tenant -> SHA-256 digests of its
  bearer tokens (see ``mlplatform.serving.auth``). Without a tokens file every request but the probes is
  refused (401) unless ``--allow-anonymous`` is given (local development only).
- ``MLPLATFORM_GATEWAY_MAX_BODY_BYTES``, ``_MAX_INSTANCES``, ``_MAX_HEADER_BYTES``, ``_READ_TIMEOUT``,
  ``_MAX_CONNECTIONS``: request limits (see ``mlplatform.serving.guard``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger("mlplatform.serving")


def settings() -> dict:
    from mlplatform.config import load_config
    from mlplatform.serving.predlog import default_location

    config = load_config()
    return {
        "host": os.environ.get("MLPLATFORM_GATEWAY_HOST", "").strip() or "127.0.0.1",
        "port": int(os.environ.get("MLPLATFORM_GATEWAY_PORT", "").strip() or 8000),
        "prediction_log": default_location(config.home),
        "tokens_file": config.home / "gateway" / "tokens.json",
        "tracking_uri": config.tracking_uri,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mlplatform.serving", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gateway (the default)")
    for p in (parser, serve):
        p.add_argument("--host")
        p.add_argument("--port", type=int)
        p.add_argument("--reload-interval", type=float, default=10.0, help="seconds between registry reads")
        p.add_argument("--tokens-file", type=Path)
        p.add_argument("--allow-anonymous", action="store_true",
                       help="serve without tokens when no tokens file exists (development only)")
    token = sub.add_parser("token", help="create a bearer token for a tenant")
    token.add_argument("tenant", help="a tenant name, or '*' for a platform token (any tenant, canary bakes)")
    token.add_argument("--tokens-file", type=Path)
    token.add_argument("--from-env", metavar="VAR", help="store the token held in environment variable VAR "
                       "instead of a new one (idempotent; for deployments whose secrets come from outside)")
    return parser


class _DenyAll:
    """Auth when no tokens are configured: nobody may call anything but the probes."""

    MESSAGE = "the gateway has no tokens configured (see python -m mlplatform.serving token)"

    def identify(self, authorization: str | None):
        from mlplatform.serving.auth import AuthError

        raise AuthError(401, self.MESSAGE)

    def check(self, tenant: str, authorization: str | None) -> None:
        from fastapi import HTTPException

        raise HTTPException(401, self.MESSAGE)


def serve(args: argparse.Namespace, conf: dict, stop: threading.Event | None = None) -> None:
    from mlflow import MlflowClient

    from mlplatform.serving.auth import TokenAuth
    from mlplatform.serving.gateway import GatewayServer, RoutingTable, create_app
    from mlplatform.serving.predlog import open_log
    from mlplatform.serving.registry_sync import RegistryWatcher, routes_from_registry

    tokens_file = args.tokens_file or conf["tokens_file"]
    if Path(tokens_file).exists():
        auth = TokenAuth.from_file(tokens_file)
        log.info("tokens for tenants %s from %s", sorted(auth.digests), tokens_file)
    elif args.allow_anonymous:
        auth = None
        log.warning("no tokens file at %s: serving WITHOUT authentication (--allow-anonymous)", tokens_file)
    else:
        auth = _DenyAll()
        log.warning("no tokens file at %s: every model request is refused until one exists", tokens_file)

    client = MlflowClient(tracking_uri=conf["tracking_uri"], registry_uri=conf["tracking_uri"])
    try:
        initial = routes_from_registry(client)
    except Exception:  # noqa: BLE001 - start anyway; the watcher fills the table when MLflow answers
        log.exception("registry unreachable at start; starting with an empty routing table")
        initial = {}
    log.info("routing table from %s: %s", conf["tracking_uri"], {n: str(r) for n, r in initial.items()})
    watcher: list[RegistryWatcher] = []

    def start_watcher(gateway) -> None:
        w = RegistryWatcher(gateway, client, args.reload_interval)
        watcher.append(w)
        w.start()

    app = create_app(conf["tracking_uri"], RoutingTable(initial), prediction_log=open_log(conf["prediction_log"]),
                     auth=auth, on_startup=start_watcher)
    host, port = args.host or conf["host"], args.port if args.port is not None else conf["port"]
    stop = stop or threading.Event()
    with GatewayServer(app, startup_timeout=600, host=host, port=port) as server:
        log.info("gateway listening on %s:%s", host, server.port)
        print(f"mlplatform gateway listening on {host}:{server.port}", flush=True)
        while not stop.wait(0.5):
            if not server._thread.is_alive():
                raise SystemExit("gateway server stopped")
    for w in watcher:
        w.stop()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    conf = settings()
    if args.command == "token":
        from mlplatform.serving.auth import add_token

        path = args.tokens_file or conf["tokens_file"]
        if args.from_env:
            value = os.environ.get(args.from_env, "").strip()
            if not value:
                print(f"environment variable {args.from_env} is empty or unset", file=sys.stderr)
                return 2
            add_token(path, args.tenant, value)
            print(f"token from {args.from_env} stored for {args.tenant!r} in {path}", file=sys.stderr)
            return 0
        print(add_token(path, args.tenant))
        print(f"(its SHA-256 digest is stored in {path}; the token itself is not)", file=sys.stderr)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(args, conf, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
