"""Gateway throughput and latency for a small model, and what the split and the prediction log cost.

    .venv/bin/python bench/gateway_bench.py [--seconds 4] [--concurrency 1 8 32]

Model: scikit-learn LogisticRegression on 3 features, served through the gateway's own sklearn predictor
(``_proba_predictor``, the code path of an MLflow-loaded sklearn model; injected with ``loader`` so the
bench needs no registry). Rows: one instance per request (``{"inputs": {...}}``).

Measured:
- ``in_process``: the predictor called directly (no gateway).
- ``in_process_gateway``: ``Gateway.pick`` + ``Gateway.serve`` (split, stats, metrics, JSONL log), no HTTP.
- HTTP on loopback with 1, 8 and 32 closed-loop clients (httpx, one thread each) against a gateway in a
  separate process (uvicorn, one worker), three configurations:
  ``champion_only+nolog``, ``split+nolog`` (50/50 champion/challenger), ``split+jsonl`` (the default).
Clients and server share the machine's cores, so the HTTP figures are a lower bound for a real deployment.
Writes bench/results/gateway.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from mlplatform.serving.gateway import GatewayServer, Route, RoutingTable, _proba_predictor, create_app  # noqa: E402
from mlplatform.serving.predlog import JsonlLog  # noqa: E402

NAME, PATH = "acme.churn", "/v1/models/acme/churn:predict"
RESULTS = Path(__file__).resolve().parent / "results" / "gateway.json"


class NullLog:
    def write(self, name, entry):
        pass

    def close(self):
        pass


def model_and_rows():
    x = pd.DataFrame(np.random.default_rng(0).normal(size=(2000, 3)), columns=["f1", "f2", "f3"])
    y = (x["f1"] + 0.5 * x["f2"] > 0).astype(int)
    return LogisticRegression().fit(x, y), x.to_dict("records")


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(np.ceil(len(values) * q / 100)) - 1))]


def summarise(latencies_s, wall_s):
    ms = [v * 1000 for v in latencies_s]
    return {"requests": len(ms), "rps": round(len(ms) / wall_s, 1), "p50_ms": round(pct(ms, 50), 3),
            "p99_ms": round(pct(ms, 99), 3), "mean_ms": round(statistics.fmean(ms), 3)}


def bench_in_process(fn, rows, seconds):
    lat, i = [], 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn(rows[i % len(rows)])
        lat.append(time.perf_counter() - t)
        i += 1
    return summarise(lat, time.perf_counter() - start)


def bench_http(url, rows, concurrency, seconds):
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(k):
        mine, i = [], k
        with httpx.Client(base_url=url, timeout=30) as http:
            http.post(PATH, json={"inputs": rows[0]})  # connect outside the measurement
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                r = http.post(PATH, json={"inputs": rows[i % len(rows)]})
                mine.append(time.perf_counter() - t)
                if r.status_code != 200:
                    with lock:
                        errors[0] += 1
                i += concurrency
        with lock:
            lat.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = summarise(lat, time.perf_counter() - start)
    out["errors"] = errors[0]
    return out


CONFIGS = {
    "champion_only+nolog": (Route("1"), False),
    "split+nolog": (Route("1", "2", 0.5), False),
    "split+jsonl": (Route("1", "2", 0.5), True),
}


def serve(label: str, log_dir: str) -> int:
    """Child process: one gateway configuration on a free loopback port until stdin closes."""
    model, _ = model_and_rows()
    predictor = _proba_predictor(model)
    route, jsonl = CONFIGS[label]
    app = create_app("unused", RoutingTable({NAME: route}),
                     prediction_log=JsonlLog(log_dir) if jsonl else NullLog(),
                     loader=lambda uri, name, version: predictor)
    with GatewayServer(app) as server:
        print(server.url, flush=True)
        sys.stdin.read()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--serve", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.log_dir)
    model, rows = model_and_rows()
    predictor = _proba_predictor(model)
    loader = lambda uri, name, version: predictor  # noqa: E731
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "loadavg_start": os.getloadavg()}, "seconds_per_case": args.seconds,
                     "in_process": {}, "http": {}}
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))

    results["in_process"]["model_direct"] = bench_in_process(lambda r: predictor([r]), rows, args.seconds)
    app = create_app("unused", RoutingTable({NAME: Route("1", "2", 0.5)}), prediction_log=JsonlLog(tmp / "inproc"),
                     loader=loader)
    gw = app.state.gateway
    gw.load_all()

    def through_gateway(row):
        variant, version, pred = gw.pick(NAME, None)
        gw.serve(NAME, variant, version, pred, [row])

    results["in_process"]["gateway_split_jsonl"] = bench_in_process(through_gateway, rows, args.seconds)
    gw.close()

    for label in CONFIGS:
        # The server runs in its own process (as in production): clients here would otherwise share its GIL.
        proc = subprocess.Popen([sys.executable, __file__, "--serve", label, "--log-dir", str(tmp / "http")],
                                stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        try:
            url = proc.stdout.readline().strip()
            assert url.startswith("http://"), url
            for c in args.concurrency:
                results["http"].setdefault(label, {})[str(c)] = bench_http(url, rows, c, args.seconds)
        finally:
            proc.stdin.close()
            proc.wait(timeout=60)
    results["machine"]["loadavg_end"] = os.getloadavg()

    print(f"{'case':<34}{'clients':>8}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for label, r in results["in_process"].items():
        print(f"{'in-process ' + label:<34}{1:>8}{r['rps']:>10}{r['p50_ms']:>10}{r['p99_ms']:>10}")
    for label, by_c in results["http"].items():
        for c, r in by_c.items():
            print(f"{'http ' + label:<34}{c:>8}{r['rps']:>10}{r['p50_ms']:>10}{r['p99_ms']:>10}")
    d, g = results["in_process"]["model_direct"], results["in_process"]["gateway_split_jsonl"]
    results["overhead_in_process_ms"] = {"split+stats+metrics+jsonl_log_p50": round(g["p50_ms"] - d["p50_ms"], 3)}
    one = results["http"]
    results["overhead_http_1client_ms"] = {
        "http_vs_direct_p50": round(one["champion_only+nolog"]["1"]["p50_ms"] - d["p50_ms"], 3),
        "split_p50": round(one["split+nolog"]["1"]["p50_ms"] - one["champion_only+nolog"]["1"]["p50_ms"], 3),
        "jsonl_log_p50": round(one["split+jsonl"]["1"]["p50_ms"] - one["split+nolog"]["1"]["p50_ms"], 3),
    }
    print("overheads (ms, p50):", json.dumps(results["overhead_in_process_ms"]),
          json.dumps(results["overhead_http_1client_ms"]))
    print(f"load average start {results['machine']['loadavg_start']} end {results['machine']['loadavg_end']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
