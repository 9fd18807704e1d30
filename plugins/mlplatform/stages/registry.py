"""Small MLflow model-registry helpers shared by the evaluate, register and deploy stages."""

from __future__ import annotations

from typing import Any

from mlplatform.config import PlatformConfig


def use_tracking(config: PlatformConfig) -> None:
    """Point MLflow's fluent API (model loading, ``register_model``) at the platform's server."""
    import mlflow

    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)


def client(ctx_or_config: Any):
    """An ``MlflowClient`` for the platform's tracking server and registry (same URI)."""
    from mlflow import MlflowClient

    config = getattr(ctx_or_config, "config", ctx_or_config)
    return MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)


def get_alias_version(client, name: str, alias: str) -> str | None:
    """Version the alias points at, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    # Read from the model's alias map: a missing alias via get_model_version_by_alias is reported
    # as INVALID_PARAMETER_VALUE, indistinguishable from a malformed request.
    version = model.aliases.get(alias)
    return None if version is None else str(version)
