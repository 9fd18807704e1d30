"""Small MLflow model-registry helpers shared by the evaluate, register and deploy stages."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mlplatform.config import PlatformConfig

_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def use_tracking(config: PlatformConfig) -> None:
    """Point MLflow's fluent API at the platform's server for the rest of the process (prefer ``tracking``)."""
    import mlflow

    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)


@contextmanager
def tracking(config: PlatformConfig) -> Iterator[None]:
    """MLflow's fluent API (``register_model``, ``runs:/`` and ``models:/`` resolution) pointed at the platform's
    tracking server and registry inside the block; the process's previous settings (globals and the
    ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` variables ``set_tracking_uri`` exports) are restored after.
    Never MLflow's process default (``sqlite:///mlflow.db`` in the working directory)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None),
             {name: os.environ.get(name) for name in _URI_ENV})
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)
    try:
        yield
    finally:
        tracking_uri, registry_uri, env = saved
        mlflow.set_tracking_uri(tracking_uri)
        registry_utils._registry_uri = registry_uri
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def local_model(config: PlatformConfig, model_uri: str, dst: str | Path | None = None) -> str:
    """A local directory holding the logged model ``model_uri`` (``models:/<name>/<version>``, ``runs:/...``, a
    ``models:/m-...`` id, an artifact URI or a path), resolved and downloaded through the platform's tracking
    server and registry only. ``models:/<name>/<version>`` is resolved through an explicit client (the
    registry's source of the version), so no MLflow process default is ever consulted."""
    import mlflow

    uri = str(model_uri)
    if "://" not in uri and Path(uri).exists():
        return uri
    if uri.startswith("models:/"):
        parts = uri[len("models:/"):].strip("/").split("/")
        if len(parts) == 2 and not parts[0].startswith("m-"):
            name, version = parts
            uri = client(config).get_model_version_download_uri(name, version)
    with tracking(config):  # runs:/ and models:/m-<id> resolve through the fluent stores
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=None if dst is None else str(dst),
                                                   tracking_uri=config.tracking_uri,
                                                   registry_uri=config.tracking_uri)


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
