"""Registers the mlplatform AirflowPlugin (the platform page): Airflow's plugin manager executes every .py
directly under plugins/. Kept to one import of a module that imports nothing heavy (mlplatform.plugin)."""

from mlplatform.plugin import MlplatformPlugin  # noqa: F401
