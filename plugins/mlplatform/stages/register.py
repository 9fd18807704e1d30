"""Register stage: the accepted candidate becomes a version of ``<tenant>.<pipeline>`` aliased challenger.

The tags carry the version's lineage: run key, spec hash, data fingerprint, the hash of the effective
hyperparameters (``mlplatform.hyperparameters_sha256``; evaluate refuses a candidate whose fingerprint, spec
hash and hyperparameters hash all equal the champion's), code, evaluation and the training snapshot.

Idempotent per DAG run: the version gets its ``mlplatform.run_key`` tag (with all the others) in the
same call that creates it, so a retry always finds it, re-applies the tags and the alias, and never
creates a second version.
"""

from __future__ import annotations

import json
from typing import Any

from mlplatform.stages import registry
from mlplatform.stages.context import RunContext, StageFailed

CHALLENGER = "challenger"
RUN_KEY_TAG = "mlplatform.run_key"
HYPERPARAMETERS_TAG = "mlplatform.hyperparameters_sha256"


def hyperparameters_sha256(hyperparameters: dict) -> str:
    """A stable hash of effective hyperparameters (key order and int/float spelling of whole numbers aside)."""
    import hashlib

    def norm(value):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, dict):
            return {str(k): norm(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        return value

    text = json.dumps(norm(dict(hyperparameters)), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def register_model(ctx: RunContext, train_result: dict, evaluation: dict, lineage: dict) -> dict[str, Any]:
    """Register (or find) this run's model version, tag it and point the challenger alias at it."""
    if evaluation.get("decision") != "accepted":
        raise StageFailed(f"the candidate was rejected and is not registered: {evaluation.get('reason')}")
    import mlflow

    name = ctx.spec.model_name
    key = f"{ctx.dag_id}/{ctx.run_id}"
    tags = version_tags(ctx, train_result, evaluation, lineage)
    client = registry.client(ctx)
    version = find_version(client, name, key)
    created = version is None
    if created:
        with registry.tracking(ctx.config):  # runs:/ resolves through the fluent API: scoped to the platform's
            version = str(mlflow.register_model(train_result["model_uri"], name, tags=tags).version)
    else:
        for tag, value in tags.items():
            client.set_model_version_tag(name, version, tag, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return {
        "model_name": name,
        "version": version,
        "created": created,
        "alias": CHALLENGER,
        "model_uri": f"models:/{name}/{version}",
    }


def version_tags(ctx: RunContext, train_result: dict, evaluation: dict, lineage: dict) -> dict[str, str]:
    """Tags of the model version: run identity, spec, data, code, evaluation and lineage."""
    tags = {
        RUN_KEY_TAG: f"{ctx.dag_id}/{ctx.run_id}",
        "mlplatform.spec_sha256": ctx.spec_sha256,
        "mlplatform.dag_run_id": ctx.run_id,
        "mlplatform.data_fingerprint": str(train_result.get("data_fingerprint", "unknown")),
        HYPERPARAMETERS_TAG: hyperparameters_sha256(ctx.hyperparameters()),
        "mlplatform.git_commit": ctx.config.git_commit or "unknown",
        "mlplatform.tenant": ctx.spec.metadata.tenant,
        "mlplatform.pipeline": ctx.spec.metadata.name,
        "mlplatform.eval_metric": str(evaluation["metric"]),
        "mlplatform.eval_value": repr(float(evaluation["value"])),
    }
    for key, value in lineage.items():
        tags[f"mlplatform.lineage.{key}"] = value if isinstance(value, str) else json.dumps(value, default=str)
    reference = reference_uri(ctx, lineage)
    if reference:
        tags[REFERENCE_TAG] = reference
    return tags


REFERENCE_TAG = "mlplatform.reference_uri"


def reference_uri(ctx: RunContext, lineage: dict | None = None) -> str | None:
    """Where this run's training-set snapshot (the drift monitor's reference data) is stored, if anywhere.

    ``lineage["train_path"]`` when the caller passes it, else the features stage's ``train.parquet`` in this
    run's artifact folder. A local path becomes a ``file://`` URI; ``s3://`` URIs are kept.
    """
    from pathlib import Path

    value = (lineage or {}).get("train_path")
    if value and str(value).startswith("s3://"):
        return str(value)
    path = Path(value) if value else ctx.config.artifact_dir(ctx.spec.metadata.tenant, ctx.spec.metadata.name,
                                                             ctx.run_key) / "train.parquet"
    return path.resolve().as_uri() if path.is_file() else None


def find_version(client, name: str, run_key: str) -> str | None:
    """The version of ``name`` tagged with this run key, if any (lowest if several)."""
    versions = _tagged_versions(client, name, run_key)
    return min(versions, key=int) if versions else None


def _tagged_versions(client, name: str, run_key: str) -> list[str]:
    from mlflow.exceptions import MlflowException

    if "'" not in run_key:
        try:
            found = client.search_model_versions(f"name = '{name}' AND tags.`{RUN_KEY_TAG}` = '{run_key}'")
            return [str(mv.version) for mv in found]
        except MlflowException as exc:  # a registry that cannot filter on tags
            if exc.error_code != "INVALID_PARAMETER_VALUE":
                raise
    return [str(mv.version) for mv in _all_versions(client, name) if mv.tags.get(RUN_KEY_TAG) == run_key]


def _all_versions(client, name: str):
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        yield from page
        token = page.token
        if not token:
            return
