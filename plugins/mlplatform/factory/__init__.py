"""Spec + template -> DAG. Imports nothing heavy: this runs on every DAG-file parse."""
