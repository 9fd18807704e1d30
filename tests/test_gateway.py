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
