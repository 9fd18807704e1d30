"""Evaluate stage: score the candidate and the current champion on the holdout, then gate the candidate.

The gate, with ``evaluation.metric``, ``minimum`` and ``margin_over_champion`` from the spec:

* roc_auc, accuracy, f1 (higher is better): value >= minimum, and value > champion + margin;
* log_loss (lower is better): ``minimum`` is the highest acceptable loss: value <= minimum, and
  value < champion - margin.

The candidate must beat the champion by strictly more than the margin: a tie (improvement 0, or exactly the
margin) is rejected, so an identical model is never registered and promoted again. Before any scoring, a
candidate trained on the same data (``mlplatform.data_fingerprint``), from the same spec
(``mlplatform.spec_sha256``) with the same effective hyperparameters (``mlplatform.hyperparameters_sha256``)
as the champion version is rejected as a duplicate of it; a champion registered before the hyperparameters
tag existed is only compared by its metric.

Without a champion (or one that needs columns the holdout lacks) only the minimum applies. Models are
loaded through the platform's tracking server and registry only (``registry.local_model``).
"""

from __future__ import annotations

from typing import Any

from mlplatform.stages import registry
from mlplatform.stages.context import RunContext, StageFailed

HIGHER_IS_BETTER = {"roc_auc": True, "accuracy": True, "f1": True, "log_loss": False}
CHAMPION = "champion"
_EPSILON = 1e-12


def evaluate_model(ctx: RunContext, train_result: dict, features: dict) -> dict[str, Any]:
    """Accept or reject the trained candidate; logs eval_<metric> (and champion_<metric>) to its run."""
    import pandas as pd

    ev = ctx.spec.spec.evaluation
    holdout = pd.read_parquet(features["holdout_path"])
    model, _ = load_classifier(train_result["model_uri"], ctx.config)
    value = score(model, holdout, list(features["feature_columns"]), ctx.spec.spec.data.label, ev.metric)

    client = registry.client(ctx)
    champion_version = registry.get_alias_version(client, ctx.spec.model_name, CHAMPION)
    champion_value, note = None, ""
    duplicate = None
    if champion_version is not None:
        duplicate = same_as_champion(ctx, client, champion_version, train_result)
    if duplicate:
        accepted, reason = False, duplicate
    else:
        if champion_version is not None:
            champion_value, note = score_champion(ctx, champion_version, holdout)
        accepted, reason = gate(ev.metric, value, ev.minimum, ev.margin_over_champion, champion_value,
                                champion_version)

    run_id = train_result["run_id"]
    client.log_metric(run_id, f"eval_{ev.metric}", value)
    if champion_value is not None:
        client.log_metric(run_id, f"champion_{ev.metric}", champion_value)
    client.set_tag(run_id, "mlplatform.evaluation", "accepted" if accepted else "rejected")
    return {
        "decision": "accepted" if accepted else "rejected",
        "reason": reason + note,
        "metric": ev.metric,
        "value": value,
        "minimum": ev.minimum,
        "champion_version": champion_version,
        "champion_value": champion_value,
    }


def same_as_champion(ctx: RunContext, client, champion_version: str, train_result: dict) -> str | None:
    """The rejection reason when the candidate repeats the champion version's training exactly: same data
    fingerprint, spec hash and effective hyperparameters (all three known on both sides); else None."""
    from mlplatform.stages.register import HYPERPARAMETERS_TAG, hyperparameters_sha256

    tags = client.get_model_version(ctx.spec.model_name, champion_version).tags or {}
    fingerprint = str(train_result.get("data_fingerprint") or "unknown")
    hp_sha = hyperparameters_sha256(ctx.hyperparameters())
    mine = {"mlplatform.data_fingerprint": fingerprint, "mlplatform.spec_sha256": ctx.spec_sha256,
            HYPERPARAMETERS_TAG: hp_sha}
    if any(v in ("", "unknown") or tags.get(k) != v for k, v in mine.items()):
        return None
    return (f"same training as champion v{champion_version}: data fingerprint {fingerprint}, spec sha256 "
            f"{ctx.spec_sha256[:12]}, hyperparameters sha256 {hp_sha[:12]} all equal the champion's; "
            f"not registered again")


def load_classifier(model_uri: str, config):
    """(model with predict_proba, its signature's input columns or None) for a logged model: the native
    xgboost/sklearn model, else its pyfunc whose predict must return P(label=1). ``model_uri`` is resolved
    and downloaded through ``config``'s tracking server and registry, never MLflow's process default."""
    import mlflow
    from mlflow.models import Model

    path = registry.local_model(config, model_uri)
    info = Model.load(path)
    columns = info.signature.inputs.input_names() if info.signature else None
    if "xgboost" in info.flavors:
        return mlflow.xgboost.load_model(path), columns
    if "sklearn" in info.flavors:
        return mlflow.sklearn.load_model(path), columns
    if "python_function" in info.flavors:  # e.g. the trainer's pytorch MLP: predict returns P(label=1)
        return PyfuncProbabilities(mlflow.pyfunc.load_model(path)), columns
    raise StageFailed(f"{model_uri} has no xgboost, sklearn or pyfunc flavor: {sorted(info.flavors)}")


class PyfuncProbabilities:
    """``predict_proba`` for a pyfunc model whose ``predict`` returns P(label=1) per row (1-D, or 2-D with
    one column or the two class columns); anything else (e.g. labels outside [0, 1]) is a StageFailed."""

    def __init__(self, model):
        self.model = model

    def predict_proba(self, frame):
        import numpy as np

        out = self.model.predict(frame)
        try:
            p1 = np.asarray(out.to_numpy() if hasattr(out, "to_numpy") else out, dtype="float64")
        except (TypeError, ValueError):
            raise StageFailed(f"pyfunc model predictions are not numeric: {type(out).__name__}") from None
        if p1.ndim == 2 and p1.shape[1] in (1, 2):
            p1 = p1[:, -1]
        if p1.shape != (len(frame),) or not np.all((p1 >= 0) & (p1 <= 1)):
            seen = f"range {np.nanmin(p1):.3g}..{np.nanmax(p1):.3g}" if p1.size else "empty"
            raise StageFailed(f"pyfunc model predictions are not one probability per row in [0, 1] "
                              f"(shape {p1.shape}, {seen})")
        return np.column_stack([1.0 - p1, p1])


def score(model, holdout, columns: list[str], label: str, metric: str) -> float:
    """The metric of the model on the holdout (probabilities for roc_auc/log_loss, 0.5 cut for labels)."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

    y = holdout[label].astype("int64")
    proba = model.predict_proba(holdout[columns].astype("float64"))[:, 1]
    if metric == "roc_auc":
        if y.nunique() < 2:
            raise StageFailed(f"roc_auc needs both classes in the holdout; {label!r} has only {y.iloc[0]}")
        return float(roc_auc_score(y, proba))
    if metric == "log_loss":
        return float(log_loss(y, proba, labels=[0, 1]))
    pred = (proba >= 0.5).astype("int64")
    return float(accuracy_score(y, pred) if metric == "accuracy" else f1_score(y, pred, zero_division=0))


def score_champion(ctx: RunContext, version: str, holdout) -> tuple[float | None, str]:
    """(champion's metric on the holdout or None, note for the reason) using the champion's own columns."""
    model, columns = load_classifier(f"models:/{ctx.spec.model_name}/{version}", ctx.config)
    columns = columns or ctx.spec.feature_columns(list(holdout.columns))
    missing = [c for c in columns if c not in holdout.columns]
    if missing:
        return None, f" (champion v{version} not compared: it needs column(s) {', '.join(missing)})"
    return score(model, holdout, columns, ctx.spec.spec.data.label, ctx.spec.spec.evaluation.metric), ""


def gate(
    metric: str,
    value: float,
    minimum: float,
    margin: float,
    champion_value: float | None = None,
    champion_version: str | None = None,
) -> tuple[bool, str]:
    """(accepted, reason) following the rule in the module docstring."""
    higher = HIGHER_IS_BETTER[metric]
    if (value < minimum - _EPSILON) if higher else (value > minimum + _EPSILON):
        bound = "below the minimum" if higher else "above the maximum"
        return False, f"{metric} {value:.4f} is {bound} {minimum:g}"
    if champion_value is None:
        return True, f"{metric} {value:.4f} meets the minimum {minimum:g}; no champion to compare with"
    gain = value - champion_value if higher else champion_value - value
    versus = f"champion v{champion_version} ({champion_value:.4f})"
    shown = f"{gain:+.4f}" if abs(gain) >= 1e-4 or abs(gain) <= _EPSILON else f"{gain:+.2e}"
    if gain <= margin + _EPSILON:  # strictly more than the margin: a tie never wins
        return False, (f"{metric} {value:.4f} does not beat {versus} by more than the margin {margin:g} "
                       f"(improvement {shown})")
    return True, f"{metric} {value:.4f} beats {versus} by {shown} (more than the margin {margin:g})"
