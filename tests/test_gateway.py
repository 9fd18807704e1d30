"""The embedded gateway over real HTTP, serving models from a real MLflow SQLite registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from mlplatform.serving.gateway import GatewayServer, Route, RoutingTable, create_app

NAME = "acme.churn"
URL_PATH = "/v1/models/acme/churn:predict"
FEATURES = ["f1", "f2", "f3"]


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised MLflow database to copy (creating the tables takes seconds; a copy is instant)."""
    path = tmp_path_factory.getbasetemp() / "mlflow-template.db"
    if not path.exists():
        from mlflow import MlflowClient

        MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def wrong_process_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway must use the URI it is given, never the process-wide one (nor ./mlflow.db)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/not-the-registry.db")


def training_frame(seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    x = pd.DataFrame(np.random.default_rng(seed).normal(size=(200, 3)), columns=FEATURES)
    return x, (x["f1"] + 0.5 * x["f2"] > 0).astype(int)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path):
    """Versions 1 and 2: logistic regressions; version 3: a pyfunc model that raises."""
    import mlflow
    from sklearn.linear_model import LogisticRegression

    class Raising(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            raise RuntimeError("model exploded")

    root = tmp_path_factory.mktemp("gateway")
    shutil.copy(mlflow_template_db, root / "mlflow.db")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        exp = mlflow.MlflowClient(uri).create_experiment("gateway", artifact_location=str(root / "artifacts"))
        x, y = training_frame()
        models = [LogisticRegression(C=c).fit(x, y) for c in (1.0, 0.01)]
        for model in models:
            with mlflow.start_run(experiment_id=exp):
                mlflow.sklearn.log_model(
                    model, name="model", registered_model_name=NAME, pip_requirements=[],
                    serialization_format="cloudpickle",
                )
        with mlflow.start_run(experiment_id=exp):
            mlflow.pyfunc.log_model(
                name="model", python_model=Raising(), registered_model_name=NAME, pip_requirements=[]
            )
    return {"uri": uri, "models": models, "x": x}


def serve(registry: dict, tmp_path: Path, route: Route, seed: int = 0) -> GatewayServer:
    app = create_app(registry["uri"], RoutingTable({NAME: route}), tmp_path / "predictions", seed=seed)
    return GatewayServer(app)


def test_predict_over_http(registry, tmp_path):
    x = registry["x"]
    rows = x.head(3).to_dict("records")
    with serve(registry, tmp_path, Route("1")) as server, httpx.Client(base_url=server.url) as http:
        assert server.url.startswith("http://127.0.0.1:") and server.port > 0
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").json()["ready"] is True

        body = http.post(URL_PATH, json={"instances": rows}).json()
        expected = registry["models"][0].predict_proba(x.head(3))[:, 1]
        assert body["variant"] == "champion" and body["model_version"] == "1" and body["request_id"]
        assert np.allclose(body["predictions"], expected)

        # single-instance form, with the columns in another order than at training
        reordered = {c: rows[0][c] for c in reversed(FEATURES)}
        single = http.post(URL_PATH, json={"inputs": reordered})
        assert np.allclose(single.json()["predictions"], expected[:1])

        assert http.post(URL_PATH, json={"rows": rows}).status_code == 422
        assert http.post("/v1/models/acme/other:predict", json={"instances": rows}).status_code == 404

    lines = [json.loads(line) for line in (tmp_path / "predictions" / f"{NAME}.jsonl").read_text().splitlines()]
    assert [line["n_instances"] for line in lines] == [3, 1]
    assert lines[0]["request_id"] == body["request_id"]
    assert {"time", "variant", "model_version", "latency_ms", "status"} <= set(lines[0])


def test_split_roughly_matches_share(registry, tmp_path):
    row = registry["x"].head(1).to_dict("records")
    with serve(registry, tmp_path, Route("1", "2", 0.3), seed=7) as server, httpx.Client(base_url=server.url) as http:
        variants = [http.post(URL_PATH, json={"instances": row}).json()["variant"] for _ in range(400)]
        stats = server.gateway.stats(NAME)
    share = variants.count("challenger") / len(variants)
    assert 0.23 <= share <= 0.37, share
    assert stats["challenger"]["requests"] == variants.count("challenger")
    assert stats["champion"]["requests"] == variants.count("champion")
    assert stats["challenger"]["version"] == "2" and stats["challenger"]["p99_ms"] > 0


def test_sticky_routing_key(registry, tmp_path):
    row = registry["x"].head(1).to_dict("records")
    with serve(registry, tmp_path, Route("1", "2", 0.5)) as server, httpx.Client(base_url=server.url) as http:

        def variant(key: str) -> str:
            return http.post(URL_PATH, json={"instances": row}, headers={"X-Routing-Key": key}).json()["variant"]

        assert len({variant("customer-42") for _ in range(30)}) == 1
        by_key = {key: variant(key) for key in (f"customer-{i}" for i in range(60))}
        assert set(by_key.values()) == {"champion", "challenger"}
        assert all(variant(key) == v for key, v in list(by_key.items())[:20])


def test_failing_variant_is_500_and_counted_in_metrics(registry, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    row = registry["x"].head(1).to_dict("records")
    with serve(registry, tmp_path, Route("1", "3", 0.5)) as server, httpx.Client(base_url=server.url) as http:
        responses = [http.post(URL_PATH, json={"instances": row}) for _ in range(40)]
        text = http.get("/metrics").text
        stats = server.gateway.stats(NAME)

    codes = {r.json()["variant"]: r.status_code for r in responses}
    assert codes == {"champion": 200, "challenger": 500}
    failed = sum(r.status_code == 500 for r in responses)
    samples = {
        (s.name, s.labels["variant"]): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
        if s.labels.get("tenant") == "acme" and s.labels.get("pipeline") == "churn" and "le" not in s.labels
    }
    assert samples[("mlplatform_gateway_requests_total", "challenger")] == failed
    assert samples[("mlplatform_gateway_requests_total", "champion")] == 40 - failed
    assert samples[("mlplatform_gateway_errors_total", "challenger")] == failed
    assert samples[("mlplatform_gateway_latency_seconds_count", "champion")] == 40 - failed
    assert stats["challenger"]["errors"] == stats["challenger"]["requests"] == failed
    assert stats["champion"]["errors"] == 0


def test_hot_reload_changes_served_version(registry, tmp_path):
    row = registry["x"].head(1).to_dict("records")
    with serve(registry, tmp_path, Route("1")) as server, httpx.Client(base_url=server.url) as http:
        assert http.post(URL_PATH, json={"inputs": row[0]}).json()["model_version"] == "1"
        server.set_route(NAME, champion=2)
        body = http.post(URL_PATH, json={"inputs": row[0]}).json()
        assert body["model_version"] == "2"
        assert np.allclose(body["predictions"], registry["models"][1].predict_proba(registry["x"].head(1))[:, 1])
        assert http.get("/readyz").json()["ready"] is True


def test_unloadable_version_fails_startup(registry, tmp_path):
    with pytest.raises(RuntimeError, match="could not load"):
        with serve(registry, tmp_path, Route("99")):
            pass


# --- batch form, auth, registry-derived routes, prediction log in PostgreSQL, the standalone process -----


def test_batch_predict_routes_each_row(registry, tmp_path):
    x = registry["x"]
    rows = x.head(40).to_dict("records")
    keys = [f"customer-{i}" for i in range(40)]
    with serve(registry, tmp_path, Route("1", "2", 0.5)) as server, httpx.Client(base_url=server.url) as http:
        body = http.post("/v1/models/acme/churn:batchPredict", json={"instances": rows, "routing_keys": keys}).json()
        again = http.post("/v1/models/acme/churn:batchPredict", json={"instances": rows, "routing_keys": keys}).json()
        assert http.post("/v1/models/acme/churn:batchPredict",
                         json={"instances": rows, "routing_keys": keys[:3]}).status_code == 422
    assert set(body["variants"]) == {"champion", "challenger"}
    assert body["variants"] == again["variants"]  # sticky per row
    for i, (variant, p) in enumerate(zip(body["variants"], body["predictions"])):
        model = registry["models"][0 if variant == "champion" else 1]
        assert np.isclose(p, model.predict_proba(x.iloc[[i]])[:, 1][0])
    assert len(body["request_ids"]) == 2


def test_tenant_tokens(registry, tmp_path):
    from mlplatform.serving.auth import TokenAuth, add_token

    tokens = tmp_path / "tokens.json"
    acme, globex = add_token(tokens, "acme"), add_token(tokens, "globex")
    assert acme not in tokens.read_text()  # only digests are stored
    auth = TokenAuth.from_file(tokens)
    row = registry["x"].head(1).to_dict("records")
    app = create_app(registry["uri"], RoutingTable({NAME: Route("1")}), tmp_path / "p", auth=auth)
    with GatewayServer(app) as server, httpx.Client(base_url=server.url) as http:
        assert http.post(URL_PATH, json={"instances": row}).status_code == 401
        assert http.post(URL_PATH, json={"instances": row},
                         headers={"Authorization": f"Bearer {globex}"}).status_code == 403
        assert http.post(URL_PATH, json={"instances": row},
                         headers={"Authorization": "Bearer wrong"}).status_code == 401  # unknown token
        ok = http.post(URL_PATH, json={"instances": row}, headers={"Authorization": f"Bearer {acme}"})
        assert ok.status_code == 200 and ok.json()["model_version"] == "1"
        assert http.get("/v1/models/acme/churn/stats").status_code == 401
        assert http.get("/v1/models/acme/churn/stats",
                        headers={"Authorization": f"Bearer {acme}"}).json()["champion"]["requests"] == 1
        assert http.get("/healthz").status_code == 200  # probes need no token


def test_routes_follow_registry_aliases(registry, tmp_path):
    from mlflow import MlflowClient

    from mlplatform.serving.registry_sync import SHARE_TAG, RegistryWatcher, routes_from_registry

    client = MlflowClient(registry["uri"], registry["uri"])
    client.set_registered_model_alias(NAME, "champion", "1")
    client.set_registered_model_alias(NAME, "challenger", "2")
    client.set_registered_model_tag(NAME, SHARE_TAG, "0.25")
    try:
        assert routes_from_registry(client) == {NAME: Route("1", "2", 0.25)}
        app = create_app(registry["uri"], RoutingTable(routes_from_registry(client)), tmp_path / "p")
        with GatewayServer(app) as server, httpx.Client(base_url=server.url) as http:
            watcher = RegistryWatcher(server.gateway, client)
            assert watcher.sync_once() == {}
            client.set_registered_model_tag(NAME, SHARE_TAG, "0")  # rolled back: challenger kept, no traffic
            assert NAME in watcher.sync_once()
            assert http.get("/v1/routes").json()["routes"][NAME] == {"champion": "1", "challenger": None, "share": 0.0}
            client.set_registered_model_alias(NAME, "champion", "2")
            watcher.sync_once()
            row = registry["x"].head(1).to_dict("records")
            assert http.post(URL_PATH, json={"instances": row}).json()["model_version"] == "2"
            # MLflow unreachable: the table stays
            class Down:
                def search_registered_models(self, *args, **kwargs):
                    raise ConnectionError("MLflow is down")

            watcher.client = Down()
            assert watcher.sync_once() == {} and watcher.last_error
            assert http.post(URL_PATH, json={"instances": row}).json()["model_version"] == "2"
    finally:
        client.set_registered_model_alias(NAME, "champion", "1")
        client.delete_registered_model_alias(NAME, "challenger")
        client.delete_registered_model_tag(NAME, SHARE_TAG)


@pytest.fixture
def postgres_url():
    psycopg = pytest.importorskip("psycopg")
    import uuid

    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432: {exc}")
    db = f"mlplatform_test_{uuid.uuid4().hex[:10]}"  # created by the gateway's PostgresLog itself
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{db}"
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.close()


def test_prediction_log_in_postgres(registry, tmp_path, postgres_url):
    import psycopg

    from mlplatform.serving.predlog import PostgresLog

    plog = PostgresLog(postgres_url, flush_seconds=0.05)
    rows = registry["x"].head(2).to_dict("records")
    app = create_app(registry["uri"], RoutingTable({NAME: Route("1", "3", 0.5)}), prediction_log=plog, seed=3)
    with GatewayServer(app) as server, httpx.Client(base_url=server.url) as http:
        ids = [http.post(URL_PATH, json={"instances": rows}).json()["request_id"] for _ in range(30)]
        plog.flush()
    with psycopg.connect(postgres_url) as conn:
        got = conn.execute("SELECT request_id, model, variant, model_version, inputs, outputs, status, latency_ms "
                           "FROM mlplatform_predictions").fetchall()
    assert sorted(r[0] for r in got) == sorted(ids)
    by_variant = {r[2]: r for r in got}
    champion, challenger = by_variant["champion"], by_variant["challenger"]
    assert champion[1] == NAME and champion[3] == "1" and champion[6] == "ok" and len(champion[5]) == 2
    assert champion[4][0].keys() == set(FEATURES) and champion[7] > 0
    assert challenger[3] == "3" and challenger[6] == "error" and challenger[5] is None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_gateway(env: dict, log_path: Path):
    import os
    import subprocess
    import sys

    handle = log_path.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "mlplatform.serving", "--reload-interval", "0.5"],
                            env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT)
    return proc


def _wait_ready(url: str, proc, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "gateway process exited"
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("standalone gateway not ready")


def test_standalone_gateway_restores_routes_after_restart(registry, tmp_path):
    """`python -m mlplatform.serving`: routes from MLflow aliases, hot reload, same table after a restart."""
    import time

    from mlflow import MlflowClient

    from mlplatform.serving.auth import add_token
    from mlplatform.serving.registry_sync import SHARE_TAG

    client = MlflowClient(registry["uri"], registry["uri"])
    client.set_registered_model_alias(NAME, "champion", "1")
    home = tmp_path / "home"
    token = add_token(home / "gateway" / "tokens.json", "acme")
    platform = {"Authorization": f"Bearer {add_token(home / 'gateway' / 'tokens.json', '*')}"}
    port = _free_port()
    env = {"MLFLOW_TRACKING_URI": registry["uri"], "MLPLATFORM_HOME": str(home),
           "MLPLATFORM_GATEWAY_HOST": "127.0.0.1", "MLPLATFORM_GATEWAY_PORT": str(port),
           "MLPLATFORM_GATEWAY_MAX_INSTANCES": "5"}
    url = f"http://127.0.0.1:{port}"
    row = registry["x"].head(1).to_dict("records")
    auth = {"Authorization": f"Bearer {token}"}
    proc = _start_gateway(env, tmp_path / "gateway.log")
    try:
        _wait_ready(url, proc)
        assert httpx.post(url + URL_PATH, json={"instances": row}).status_code == 401
        assert httpx.post(url + URL_PATH, json={"instances": row}, headers=auth).json()["model_version"] == "1"
        assert httpx.get(url + "/v1/routes").status_code == 401
        # the limits come from the environment
        too_many = httpx.post(url + URL_PATH, json={"instances": row * 6}, headers=auth)
        assert too_many.status_code == 413 and "limit is 5" in too_many.json()["detail"]
        # issue 11: 19 MB without a token cost 170 MB of RSS before the 401; now the body is never read
        rss = _rss_kib(proc.pid)
        for _ in range(3):
            assert _post_raw(port, b"x" * 19_000_000)[0] == 401
        assert _rss_kib(proc.pid) - rss < 10_000, (rss, _rss_kib(proc.pid))
        # the deploy stage moves a canary in: challenger 2 at 40%
        client.set_registered_model_alias(NAME, "challenger", "2")
        client.set_registered_model_tag(NAME, SHARE_TAG, "0.4")
        want = {"champion": "1", "challenger": "2", "share": 0.4}
        deadline = time.monotonic() + 30
        while httpx.get(url + "/v1/routes", headers=platform).json()["routes"].get(NAME) != want:
            assert time.monotonic() < deadline, "hot reload did not happen"
            time.sleep(0.2)
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        proc = _start_gateway(env, tmp_path / "gateway.log")
        _wait_ready(url, proc)
        assert httpx.get(url + "/v1/routes", headers=platform).json()["routes"][NAME] == want
        variants = {httpx.post(url + URL_PATH, json={"instances": row}, headers=auth).json()["variant"]
                    for _ in range(40)}
        assert variants == {"champion", "challenger"}
        logged = (home / "gateway" / "predictions" / f"{NAME}.jsonl").read_text().splitlines()
        assert len(logged) == 41 and json.loads(logged[0])["inputs"] == row
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        client.set_registered_model_alias(NAME, "champion", "1")
        client.delete_registered_model_alias(NAME, "challenger")
        client.delete_registered_model_tag(NAME, SHARE_TAG)


def test_token_from_env_is_stored_once(tmp_path, monkeypatch):
    """`python -m mlplatform.serving token '*' --from-env VAR` (compose's airflow-init) is idempotent."""
    from mlplatform.serving.__main__ import main
    from mlplatform.serving.auth import TokenAuth, digest

    tokens = tmp_path / "tokens.json"
    monkeypatch.setenv("GATEWAY_PLATFORM_TOKEN", "s3cret-platform-token")
    for _ in range(2):
        assert main(["token", "*", "--tokens-file", str(tokens), "--from-env", "GATEWAY_PLATFORM_TOKEN"]) == 0
    assert TokenAuth.from_file(tokens).digests == {"*": [digest("s3cret-platform-token")]}
    monkeypatch.delenv("GATEWAY_PLATFORM_TOKEN")
    assert main(["token", "*", "--tokens-file", str(tokens), "--from-env", "GATEWAY_PLATFORM_TOKEN"]) == 2


# --- hardening (issue 11): hostile clients and hostile tenants, over real HTTP ----------------------------

import socket  # noqa: E402
import time  # noqa: E402

from mlplatform.serving.guard import Limits  # noqa: E402

SMALL = Limits(max_body_bytes=64 * 1024, max_instances=50, max_header_bytes=8 * 1024, read_timeout=1.0,
               max_connections=64)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response (raises socket.timeout when none comes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without a response: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _request_head(port: int, path: str = URL_PATH, token: str | None = None, length: int | None = None,
                  chunked: bool = False, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{extra}"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    if chunked:
        head += "Transfer-Encoding: chunked\r\n"
    return (head + "\r\n").encode()


def _post_raw(port: int, body: bytes, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """POST ``body`` whole (a server that stops reading early may reset the upload: that is fine)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_request_head(port, token=token, length=len(body)))
        try:
            sock.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return _read_response(sock)


@pytest.fixture
def hardened(tmp_path):
    """A gateway with tokens for acme, globex and the platform, serving acme.churn and globex.fraud with a
    stand-in model that records every call, under small limits."""
    from mlplatform.serving.auth import TokenAuth, add_token

    tokens = tmp_path / "tokens.json"
    acme, globex, platform = (add_token(tokens, t) for t in ("acme", "globex", "*"))
    calls: list[int] = []

    def loader(uri, name, version):
        def predict(rows):
            calls.append(len(rows))
            return [0.5] * len(rows)
        return predict

    routes = RoutingTable({NAME: Route("1"), "globex.fraud": Route("7")})
    app = create_app("unused", routes, tmp_path / "predictions", auth=TokenAuth.from_file(tokens),
                     loader=loader, limits=SMALL)
    with GatewayServer(app) as server:
        yield {"server": server, "port": server.port, "acme": acme, "globex": globex, "platform": platform,
               "calls": calls, "log": tmp_path / "predictions", "url": server.url}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_token_is_checked_before_the_body_is_read(hardened):
    """Only the headers are sent, announcing 19 MB: the answer comes at once, so no body was read."""
    port = hardened["port"]
    for token, want in ((None, 401), ("wrong", 401), (hardened["globex"], 403), (hardened["acme"], 413)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(_request_head(port, token=token, length=19_000_000))
            status, headers, body = _read_response(sock)
            assert status == want, (token, status, body)
            assert headers["connection"] == "close" and sock.recv(1) == b""  # and the upload is cut off
        if want == 413:
            assert "65536 bytes" in json.loads(body)["detail"]
    assert hardened["calls"] == [] and not list(hardened["log"].glob("*.jsonl"))  # no handler ran, nothing logged


def test_streamed_body_is_cut_at_the_limit(hardened):
    """Chunked upload with a valid token: 413 once the limit is passed, without waiting for the end."""
    port = hardened["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_request_head(port, token=hardened["acme"], chunked=True))
        chunk = b"2000\r\n" + b" " * 0x2000 + b"\r\n"  # 8 KiB chunks, never the final 0-chunk
        for _ in range(10):
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        status, _, body = _read_response(sock)
    assert status == 413 and "limit of 65536 bytes" in json.loads(body)["detail"]
    # a chunked body under the limit is served
    rows = json.dumps({"instances": [{"f1": 1.0}] * 3}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_request_head(port, token=hardened["acme"], chunked=True)
                     + b"%x\r\n%s\r\n0\r\n\r\n" % (len(rows), rows))
        status, _, body = _read_response(sock)
    assert status == 200 and json.loads(body)["predictions"] == [0.5] * 3
    assert hardened["calls"] == [3]


def test_instances_are_capped_on_every_predict_route(hardened):
    row, auth = {"f1": 1.0, "f2": "x", "f3": None}, _bearer(hardened["acme"])
    with httpx.Client(base_url=hardened["url"], headers=auth) as http:
        assert http.post(URL_PATH, json={"instances": [row] * 50}).status_code == 200
        assert http.post("/v1/models/acme/churn:batchPredict", json={"instances": [row] * 50}).status_code == 200
        assert http.post(URL_PATH, json={"inputs": row}).status_code == 200
        for path in (URL_PATH, "/v1/models/acme/churn:batchPredict"):
            r = http.post(path, json={"instances": [row] * 51})
            assert r.status_code == 413 and "instances" in r.text and "limit is 50" in r.text, r.text
            # many tiny rows inside the byte limit are stopped while parsing, before they are all built
            r = http.post(path, content=b'{"instances": [' + b",".join([b"{}"] * 20_000) + b"]}")
            assert r.status_code == 413 and "limit is 50" in r.text, r.text
    assert hardened["calls"] == [50, 50, 1]
    logged = (hardened["log"] / f"{NAME}.jsonl").read_text().splitlines()
    assert [json.loads(line)["n_instances"] for line in logged] == [50, 50, 1]


HOSTILE_ROWS = [  # one row (the JSON text of {feature: value}), the status and a word of the message
    (b'{"f1": NaN}', 400, "finite"),
    (b'{"f1": Infinity}', 400, "finite"),
    (b'{"f1": -Infinity}', 400, "finite"),
    (b'{"f1": 1e400}', 400, "finite"),
    (b'{"f1": ' + b"9" * 5000 + b"}", 400, "invalid number"),
    (b'{"a":' * 5_000 + b"1" + b"}" * 5_000, 400, "nested too deeply"),
    (b'{"f1": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400, "nested too deeply"),
    (b'{"f1": {"a": 1}}', 422, "feature values"),
    (b'{"f1": [1, 2]}', 422, "feature values"),
    (b'[1, 2]', 422, "an object"),
    (b'{"f1": 1', 400, "not valid JSON"),
    (b'{"f1": "\xff\xfe"}', 400, "UTF-8"),
]
HOSTILE_BODIES = [
    (b'{"instances": []}', 422, "non-empty"),
    (b'{"instances": [{"f1": 1}], "inputs": {"f1": 1}}', 422, "either"),
    (b'{"inputs": {"f1": 1}, "debug": true}', 422, "nothing else"),
    (b'[{"f1": 1}]', 422, "object"),
    (b'"', 400, "not valid JSON"),
]


@pytest.mark.parametrize("row, status, message", HOSTILE_ROWS)
def test_hostile_values_are_a_clear_4xx_on_every_predict_route(hardened, row, status, message):
    with httpx.Client(base_url=hardened["url"], headers=_bearer(hardened["acme"])) as http:
        for path, body in ((URL_PATH, b'{"inputs": %s}' % row), (URL_PATH, b'{"instances": [%s]}' % row),
                           ("/v1/models/acme/churn:batchPredict", b'{"instances": [{"f1": 1}, %s]}' % row)):
            r = http.post(path, content=body)
            assert r.status_code == status and message in r.json()["detail"], (path, r.text)
            assert len(r.content) < 500  # the body is never echoed
    assert hardened["calls"] == [] and not list(hardened["log"].glob("*.jsonl"))


@pytest.mark.parametrize("body, status, message", HOSTILE_BODIES)
def test_malformed_bodies_are_a_clear_4xx(hardened, body, status, message):
    with httpx.Client(base_url=hardened["url"], headers=_bearer(hardened["acme"])) as http:
        r = http.post(URL_PATH, content=body)
        assert r.status_code == status and message in r.json()["detail"], r.text
        assert 400 <= http.post("/v1/models/acme/churn:batchPredict", content=body).status_code < 500
        assert http.post("/v1/models/acme/churn:batchPredict",
                         json={"instances": [{"f1": 1}], "routing_keys": [{"k": 1}]}).status_code == 422
    assert hardened["calls"] == []


def test_routes_metrics_and_stats_need_a_token_and_show_only_the_callers_tenant(hardened):
    from prometheus_client.parser import text_string_to_metric_families

    url, row = hardened["url"], {"f1": 1.0}
    for tenant, pipeline, token in (("acme", "churn", "acme"), ("globex", "fraud", "globex")):
        assert httpx.post(f"{url}/v1/models/{tenant}/{pipeline}:predict", json={"inputs": row},
                          headers=_bearer(hardened[token])).status_code == 200
    for path in ("/v1/routes", "/metrics", "/v1/models/acme/churn/stats", "/v1/models/acme/churn:predict",
                 "/docs", "/openapi.json", "/no-such-path"):
        r = httpx.request("POST" if "predict" in path else "GET", url + path)
        assert r.status_code == 401 and "acme" not in r.text and "globex" not in r.text, (path, r.text)
        assert httpx.get(url + path, headers=_bearer("wrong")).status_code == 401
    assert httpx.get(url + "/healthz").status_code == 200
    assert httpx.get(url + "/readyz").json() == {"ready": True}  # probes: no token, no model names

    def tenants_in_metrics(token: str) -> set[str]:
        text = httpx.get(url + "/metrics", headers=_bearer(token)).text
        return {s.labels["tenant"] for f in text_string_to_metric_families(text) for s in f.samples
                if "tenant" in s.labels}

    platform, acme = _bearer(hardened["platform"]), _bearer(hardened["acme"])
    assert set(httpx.get(url + "/v1/routes", headers=platform).json()["routes"]) == {NAME, "globex.fraud"}
    assert tenants_in_metrics(hardened["platform"]) == {"acme", "globex"}
    assert httpx.get(url + "/v1/routes", headers=acme).json()["routes"] == {
        NAME: {"champion": "1", "challenger": None, "share": 0.0}}
    assert tenants_in_metrics(hardened["acme"]) == {"acme"}
    assert "globex" not in httpx.get(url + "/metrics", headers=acme).text
    assert httpx.get(url + "/readyz", headers=acme).json() == {"ready": True, "missing": [], "error": None}
    # another tenant's models, stats and names are out of reach; errors name only what the caller sent
    assert httpx.get(url + "/v1/models/globex/fraud/stats", headers=acme).status_code == 403
    assert httpx.get(url + "/v1/models/acme/churn/stats", headers=acme).json()["champion"]["requests"] == 1
    missing = httpx.post(url + "/v1/models/acme/nothing:predict", json={"inputs": row}, headers=acme)
    assert missing.status_code == 404 and "globex" not in missing.text
    assert httpx.get(url + "/no-such-path", headers=acme).status_code == 404


def test_header_size_slow_clients_and_connection_limit(hardened, tmp_path):
    port = hardened["port"]

    def exchange(*parts: bytes, pause: float = 0.0) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            for part in parts:
                try:
                    sock.sendall(part)
                except (BrokenPipeError, ConnectionResetError):
                    break
                time.sleep(pause)
            status, _, body = _read_response(sock)
            return status, body

    # many headers, and one endless header line sent in pieces
    assert exchange(_request_head(port, extra="".join(f"X-H{i}: {'a' * 100}\r\n" for i in range(100))))[0] == 431
    head = f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: ".encode()
    assert exchange(head, *[b"a" * 4096] * 8, pause=0.01)[0] == 431
    assert exchange(b"GET /v1/models/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 431
    # slow-loris: headers never finish, or the body never comes: 408 after read_timeout (1 s), not forever
    started = time.monotonic()
    assert exchange(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")[0] == 408
    status, body = exchange(_request_head(port, token=hardened["acme"], length=100) + b'{"inputs": ')
    assert status == 408 and b"did not arrive" in body
    assert time.monotonic() - started < 6
    with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:  # connects, says nothing
        assert idle.recv(1) == b""
    assert httpx.get(hardened["url"] + "/healthz").status_code == 200
    assert hardened["calls"] == []

    # connections beyond max_connections get 503 at once
    from dataclasses import replace

    app = create_app("unused", RoutingTable({}), tmp_path / "p2",
                     limits=replace(SMALL, max_connections=3, read_timeout=30))
    with GatewayServer(app) as server:
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        try:
            time.sleep(0.2)
            assert httpx.get(server.url + "/healthz").status_code == 503
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(server.url + "/healthz").status_code == 200


def test_limits_from_the_environment(monkeypatch):
    assert Limits.from_env() == Limits() == Limits(1024 * 1024, 1000, 16 * 1024, 10.0, 512)
    monkeypatch.setenv("MLPLATFORM_GATEWAY_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("MLPLATFORM_GATEWAY_MAX_INSTANCES", "7")
    monkeypatch.setenv("MLPLATFORM_GATEWAY_READ_TIMEOUT", "2.5")
    assert Limits.from_env() == Limits(2048, 7, 16 * 1024, 2.5, 512)
    for bad in ("0", "-1", "many", "nan"):
        monkeypatch.setenv("MLPLATFORM_GATEWAY_MAX_INSTANCES", bad)
        with pytest.raises(ValueError, match="MLPLATFORM_GATEWAY_MAX_INSTANCES"):
            Limits.from_env()


def test_bake_trigger_reads_routes_and_stats_with_its_token(hardened):
    """The triggerer's GatewayBakeTrigger (deferrable canary bakes) sends the platform token: it still works."""
    import asyncio

    from mlplatform.triggers.canary import GatewayBakeTrigger

    def bake(token: str | None) -> dict:
        trigger = GatewayBakeTrigger(hardened["url"], NAME, "1", None, 0.0, bake_seconds=0.05, token=token,
                                     route_timeout=2, poll_interval=0.1)

        async def first():
            async for event in trigger.run():
                return event.payload

        return asyncio.run(first())

    assert bake(hardened["platform"])["status"] == "baked"
    assert bake(hardened["acme"])["stats"]["champion"]["version"] == "1"
    assert bake(None)["status"] == "error"  # no token: the routes are not shown
