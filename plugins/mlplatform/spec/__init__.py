"""Spec format v1: models, safe YAML loading with file:line errors, JSON Schema export."""
