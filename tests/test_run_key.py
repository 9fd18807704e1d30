"""Run ids are chosen by whoever triggers a run (REST API, trigger form): their path form stays inside the run's folder."""

from __future__ import annotations

import pytest

from mlplatform.config import load_config
from mlplatform.stages.context import run_key


@pytest.mark.parametrize("run_id", ["..", ".", "", "../../other-tenant", "./x", "/etc/passwd", "a/../../b", "x" * 500])
def test_run_key_never_leaves_the_pipeline_folder(tmp_path, monkeypatch, run_id):
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path))
    config = load_config()
    key = run_key(run_id)
    folder = config.artifact_dir("acme", "churn", key).resolve()
    assert folder.parent == (tmp_path / "artifacts" / "acme" / "churn").resolve()
    assert not key.startswith(".") and "/" not in key and len(key) <= 201


def test_run_key_keeps_ordinary_ids_readable():
    assert run_key("manual__2026-01-01T00:00:00+00:00") == "manual__2026-01-01T00_00_00_00_00"
