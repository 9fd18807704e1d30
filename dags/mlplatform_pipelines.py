"""Airflow DAG file: every tenant pipeline spec under dags/specs/ becomes a DAG (see mlplatform.factory).

A broken spec becomes a paused stand-in DAG showing its errors; it never hides another DAG.
"""

from mlplatform.factory.loader import load_dags

globals().update(load_dags())
