"""Deferrable waits (run in the Airflow triggerer)."""
