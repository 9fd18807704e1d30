"""Backing services of the production-like topology as local processes on loopback, for tests.

``moto_server`` (an S3-compatible server over real HTTP, moto's server mode) and ``mlflow_server`` (a real
tracking server and model registry, backend store on PostgreSQL, artifacts proxied to S3), each started in
its own process group and stopped (group-wide) on exit; their output goes to a log file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

BIN = Path(sys.executable).parent
# Dummy credentials: moto accepts any; set for every S3 client and the MLflow server.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
LOOPBACK = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def free_port() -> int:
    from mlplatform.local_airflow import free_port as _free_port

    return _free_port()


@contextmanager
def service_process(cmd: list[str], env: dict[str, str], log_path: Path, health_url: str,
                    timeout: float = 120) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in its own process group until ``health_url`` answers 200; stop the group on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n"
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(health_url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{health_url} not healthy after {timeout}s; see {log_path}")
            time.sleep(0.5)
        yield proc
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:  # also whatever the leader left behind in its group (e.g. server worker processes)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name=S3_ENV["AWS_DEFAULT_REGION"])


@contextmanager
def moto_server(log_dir: Path, buckets: tuple[str, ...] = ()) -> Iterator[str]:
    """``moto_server`` on 127.0.0.1 (S3 over HTTP); creates ``buckets``; yields its endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, **S3_ENV, **LOOPBACK}
    with service_process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env,
                         log_dir / "moto_server.log", f"{endpoint}/moto-api/"):
        client = s3_client(endpoint)
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint


@contextmanager
def mlflow_server(backend_store_uri: str, artifacts_destination: str, s3_endpoint: str, log_dir: Path,
                  workers: int = 2) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1: tracking and registry in ``backend_store_uri``, artifacts proxied to
    ``artifacts_destination`` (``s3://bucket/prefix`` on ``s3_endpoint``), so clients need no S3
    credentials; yields the tracking URI (``http://127.0.0.1:<port>``)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **S3_ENV, **LOOPBACK, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
           "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts_destination]
    with service_process(cmd, env, log_dir / "mlflow_server.log", f"{url}/health", timeout=180):
        yield url
