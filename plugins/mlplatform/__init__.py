"""mlplatform: per-tenant YAML pipeline specs become Airflow 3 DAGs.

Importing this package must stay cheap: the DAG loader imports it on every parse.
"""

__version__ = "0.1.0"
