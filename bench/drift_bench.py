"""Drift computation: Evidently 0.7 DataDriftPreset vs a plain per-column scipy/numpy floor.

Each (engine, rows) case runs in its own subprocess so peak memory (``ru_maxrss``) is that case's alone.
Data: ``rows`` x 30 columns (24 numeric floats, 6 categorical ints with 8 levels), reference and current
with the same row count, 10 of the columns shifted in the current data.

Evidently picks, above 1,000 reference rows, the normed Wasserstein distance (numeric, drift > 0.1) and
the Jensen-Shannon distance (categorical, drift > 0.1); the floor computes exactly those two statistics
with scipy (``wasserstein_distance`` / std of the reference; ``jensenshannon`` of the two frequency
vectors) and, as a check, the verdicts must agree.

    python bench/drift_bench.py [--rows 100000 1000000] [--out bench/results/drift.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

NUMERIC, CATEGORICAL, SHIFTED = 24, 6, 10
HERE = Path(__file__).resolve().parent


def make_data(rows: int, seed: int = 7):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)

    def frame(shift: bool):
        cols = {}
        for i in range(NUMERIC):
            delta = 0.5 if shift and i < SHIFTED - 2 else 0.0
            cols[f"num_{i}"] = rng.normal(delta, 1.0 + 0.1 * i, rows)
        for j in range(CATEGORICAL):
            p = np.full(8, 1 / 8)
            if shift and j < 2:
                p = np.array([0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
            cols[f"cat_{j}"] = rng.choice(8, size=rows, p=p).astype("int64")
        return pd.DataFrame(cols)

    return frame(False), frame(True)


def run_evidently(ref, cur, html_dir: Path | None):
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    cats = [c for c in ref.columns if c.startswith("cat_")]
    nums = [c for c in ref.columns if c.startswith("num_")]
    definition = DataDefinition(numerical_columns=nums, categorical_columns=cats)
    t0 = time.perf_counter()
    r = Dataset.from_pandas(ref, data_definition=definition)
    c = Dataset.from_pandas(cur, data_definition=definition)
    snapshot = Report([DataDriftPreset(columns=list(ref.columns))], include_tests=True).run(c, r)
    t_run = time.perf_counter() - t0
    t1 = time.perf_counter()
    report = json.loads(snapshot.json())
    t_json = time.perf_counter() - t1
    verdicts = {}
    for test in report["tests"]:
        params = test["metric_config"]["params"]
        if params.get("type") == "evidently:metric_v2:ValueDrift":
            verdicts[params["column"]] = test["status"] != "SUCCESS"
    out = {"seconds_run": t_run, "seconds_json": t_json, "drifted": sorted(k for k, v in verdicts.items() if v)}
    if html_dir is not None:
        t2 = time.perf_counter()
        path = html_dir / f"evidently_{len(ref)}.html"
        snapshot.save_html(str(path))
        out.update(seconds_html=time.perf_counter() - t2, html_bytes=path.stat().st_size)
        path.unlink()
    return out


def run_floor(ref, cur):
    import numpy as np
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import wasserstein_distance

    t0 = time.perf_counter()
    drifted, scores = [], {}
    for col in ref.columns:
        a, b = ref[col].to_numpy(), cur[col].to_numpy()
        if col.startswith("num_"):
            score = wasserstein_distance(a, b) / np.std(a)
        else:
            levels = np.union1d(np.unique(a), np.unique(b))
            pa = np.array([(a == v).sum() for v in levels], dtype=float) / len(a)
            pb = np.array([(b == v).sum() for v in levels], dtype=float) / len(b)
            score = float(jensenshannon(pa, pb))
        scores[col] = float(score)
        if score >= 0.1:
            drifted.append(col)
    return {"seconds_run": time.perf_counter() - t0, "drifted": sorted(drifted)}


def child(engine: str, rows: int, html: bool) -> None:
    import tempfile

    if engine == "evidently":
        import evidently  # noqa: F401  (import time is not part of the measurement)
    small_ref, small_cur = make_data(2_000, seed=1)  # warm-up: lazy imports and caches are not measured
    if engine == "evidently":
        run_evidently(small_ref, small_cur, None)
    else:
        run_floor(small_ref, small_cur)
    ref, cur = make_data(rows)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if engine == "evidently":
        with tempfile.TemporaryDirectory() as tmp:
            out = run_evidently(ref, cur, Path(tmp) if html else None)
    else:
        out = run_floor(ref, cur)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.update(engine=engine, rows=rows, columns=NUMERIC + CATEGORICAL, peak_rss_mb=round(peak / 1024, 1),
               rss_after_data_mb=round(base / 1024, 1),
               data_mb=round((ref.memory_usage().sum() + cur.memory_usage().sum()) / 2**20, 1))
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--out", default=str(HERE / "results" / "drift.json"))
    ap.add_argument("--no-html", action="store_true", help="skip timing the HTML report")
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "ROWS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), not args.no_html)
        return
    results = []
    for rows in args.rows:
        for engine in ("floor", "evidently"):
            cmd = [sys.executable, __file__, "--child", engine, str(rows)] + (["--no-html"] if args.no_html else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                                  env={**os.environ, "DO_NOT_TRACK": "true"})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                results.append({"engine": engine, "rows": rows, "error": proc.stderr[-2000:]})
            else:
                results.append({**json.loads(line[7:]), "wall_seconds_incl_import": time.perf_counter() - t0})
            print(json.dumps(results[-1])[:400], flush=True)
    by = {(r["engine"], r["rows"]): r for r in results}
    summary = []
    for rows in args.rows:
        f, e = by.get(("floor", rows), {}), by.get(("evidently", rows), {})
        if "seconds_run" in f and "seconds_run" in e:
            summary.append({"rows": rows, "evidently_s": round(e["seconds_run"], 2), "floor_s": round(f["seconds_run"], 3),
                            "ratio": round(e["seconds_run"] / f["seconds_run"], 1),
                            "evidently_peak_mb": e["peak_rss_mb"], "floor_peak_mb": f["peak_rss_mb"],
                            "same_verdicts": e["drifted"] == f["drifted"]})
    doc = {"benchmark": "drift", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                             "platform": platform.platform(),
                                             "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
           "columns": {"numeric": NUMERIC, "categorical": CATEGORICAL, "shifted": SHIFTED},
           "summary": summary, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
