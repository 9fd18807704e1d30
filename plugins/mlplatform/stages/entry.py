"""The tenant-influenced half of each stage, as the sandbox runs it (``mlplatform.sandbox``).

Each function takes the ``RunContext`` and JSON-able upstream results and returns the stage's JSON-able
result; no Airflow here. The operators call them through ``sandbox.run("mlplatform.stages.entry:<name>", ...)``,
so they execute in a child process that holds none of the platform's secrets; their log lines reach the task
log through the sandbox.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mlplatform.stages.context import RunContext

log = logging.getLogger("mlplatform.stages")


def partitions(ctx: RunContext) -> tuple[list[Path], list[Path], str]:
    """(training files, current files, current date) of the spec's source as of the run."""
    from mlplatform.data.partitions import list_partitions, split_partitions

    training, current = split_partitions(list_partitions(ctx.spec.spec.data.source, ctx.config,
                                                         ctx.tenant.spec.data.allowed_prefixes), ctx.as_of)
    return [f for p in training for f in p.files], list(current.files), current.date


def validate(ctx: RunContext) -> dict[str, Any]:
    from mlplatform.stages.validate import validate_data

    training_files, _, current_date = partitions(ctx)
    result = validate_data(ctx, training_files)
    log.info("validation passed: %s rows, %s expectations, %s warnings",
             result["rows"], result["evaluated"], len(result["warnings"]))
    for w in result["warnings"]:
        log.warning("expectation warning: %s", w)
    return {**result, "as_of": current_date, "training_files": [str(f) for f in training_files]}


def features(ctx: RunContext) -> dict[str, Any]:
    from mlplatform.stages.features import build_features

    training_files, current_files, _ = partitions(ctx)
    result = build_features(ctx, training_files, current_files)
    result["current_files"] = [str(f) for f in current_files]
    log.info("training set: %s rows (%s train / %s holdout), fingerprint %s",
             result["rows"], result["train_rows"], result["holdout_rows"], result["fingerprint"])
    return result


def train_local(ctx: RunContext, features: dict) -> dict[str, Any]:
    from mlplatform.stages.train_local import run_local_trainer

    result = run_local_trainer(ctx, features)
    log.info("trained run %s: %s", result["run_id"], json.dumps(result.get("metrics", {}), sort_keys=True))
    return result


def evaluate(ctx: RunContext, train: dict, features: dict) -> dict[str, Any]:
    from mlplatform.stages.evaluate import evaluate_model

    result = evaluate_model(ctx, train, features)
    log.info("evaluation %s: %s", result["decision"].upper(), result["reason"])
    return result


def drift_monitor(ctx: RunContext, features: dict) -> dict[str, Any]:
    from mlplatform.stages.drift import compute_drift, summary_lines

    result = compute_drift(ctx, Path(features["train_path"]), [Path(f) for f in features["current_files"]],
                           features["feature_columns"])
    for line in summary_lines(result):
        log.info("%s", line)
    return result


def drift_check(ctx: RunContext, reference: str, current_files: list[str], out_dir: str, model_name: str,
                champion_version: str, champion_eval: float | None, features: list[str]) -> dict[str, Any]:
    """The monitor DAG's data work: feature drift between the champion's training snapshot and the current
    data, and the champion's prediction drift and (with labels) performance. Loading the champion model
    happens here too: a model artifact is the output of tenant-influenced training."""
    from mlplatform.stages.drift import drift_between

    current = [Path(f) for f in current_files]
    result = drift_between(ctx.spec, [Path(reference)], current, features, Path(out_dir))
    result.update(_model_checks(ctx, model_name, champion_version, champion_eval, Path(reference), current,
                                features, Path(out_dir)))
    return result


def _model_checks(ctx: RunContext, model_name: str, version: str, champion_eval: float | None, reference: Path,
                  current_files: list[Path], features: list[str], out_dir: Path) -> dict[str, Any]:
    """Prediction drift and (with labels) performance of the champion; a failure here is reported, not
    raised: the feature-drift verdict stands on its own."""
    import pandas as pd

    from mlplatform.stages.monitor_data import champion_model, performance, performance_skipped, prediction_drift

    try:  # the champion comes through the platform's tracking server and registry only (ctx.config)
        model, columns = champion_model(ctx.config, model_name, version)
        columns = columns or features
        ref = pd.read_parquet(reference)
        cur = pd.concat([pd.read_parquet(f) for f in current_files], ignore_index=True)
        pred = prediction_drift(ctx.spec, model, columns, ref, cur, out_dir)
        return {"prediction_drift": pred, "performance": performance(ctx.spec, model, columns, cur, champion_eval),
                "performance_note": performance_skipped(ctx.spec, cur)}
    except Exception as exc:  # noqa: BLE001 - e.g. a champion whose model cannot load here
        log.warning("prediction drift / performance not computed: %s: %s", type(exc).__name__, exc)
        return {"prediction_drift": None, "performance": None, "model_checks_error": f"{type(exc).__name__}: {exc}"}
