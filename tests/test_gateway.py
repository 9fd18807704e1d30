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
                         headers={"Authorization": "Bearer wrong"}).status_code == 403
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
    port = _free_port()
    env = {"MLFLOW_TRACKING_URI": registry["uri"], "MLPLATFORM_HOME": str(home),
           "MLPLATFORM_GATEWAY_HOST": "127.0.0.1", "MLPLATFORM_GATEWAY_PORT": str(port)}
    url = f"http://127.0.0.1:{port}"
    row = registry["x"].head(1).to_dict("records")
    auth = {"Authorization": f"Bearer {token}"}
    proc = _start_gateway(env, tmp_path / "gateway.log")
    try:
        _wait_ready(url, proc)
        assert httpx.post(url + URL_PATH, json={"instances": row}).status_code == 401
        assert httpx.post(url + URL_PATH, json={"instances": row}, headers=auth).json()["model_version"] == "1"
        # the deploy stage moves a canary in: challenger 2 at 40%
        client.set_registered_model_alias(NAME, "challenger", "2")
        client.set_registered_model_tag(NAME, SHARE_TAG, "0.4")
        want = {"champion": "1", "challenger": "2", "share": 0.4}
        deadline = time.monotonic() + 30
        while httpx.get(url + "/v1/routes").json()["routes"].get(NAME) != want:
            assert time.monotonic() < deadline, "hot reload did not happen"
            time.sleep(0.2)
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        proc = _start_gateway(env, tmp_path / "gateway.log")
        _wait_ready(url, proc)
        assert httpx.get(url + "/v1/routes").json()["routes"][NAME] == want
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
