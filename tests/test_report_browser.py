"""The drift report opens in a real browser (Debian's headless Chromium) without JavaScript errors.

The session fixture runs tests/setup_browser.sh, which apt-installs chromium when /usr/bin/chromium is
missing (root only; otherwise the test is skipped with the command to run). The screenshot is saved as
test-artifacts/drift_report.png.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import ARTIFACTS
from helpers_browser import ensure_chromium

pytestmark = pytest.mark.slow

SPEC = {"apiVersion": "mlplatform.io/v1", "kind": "Pipeline", "metadata": {"name": "browser", "tenant": "acme"},
        "spec": {"data": {"source": "acme/x", "entity": "id", "timestamp": "ts", "label": "y"},
                 "monitoring": {"columns": {"b": {"method": "psi", "threshold": 0.2}}}}}
_ERROR = re.compile(r"CONSOLE.*(Uncaught|Error|is not defined|Failed to load)|ERR_FILE_NOT_FOUND|net::ERR_", re.I)


@pytest.fixture(scope="session")
def chromium():
    return ensure_chromium()


@pytest.fixture(scope="session")
def report(tmp_path_factory):
    import numpy as np
    import pandas as pd

    from mlplatform.spec.model import PipelineSpec
    from mlplatform.stages.drift import drift_between

    d = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(3)

    def frame(n, shift):
        return pd.DataFrame({"id": np.arange(n), "ts": pd.Timestamp("2026-11-01", tz="UTC") + pd.to_timedelta(np.arange(n), "s"),
                             "a": rng.normal(shift, 1, n), "b": rng.gamma(2 + shift, 1, n), "c": rng.integers(0, 4, n)})

    frame(3000, 0).to_parquet(d / "ref.parquet")
    frame(2000, 0.6).to_parquet(d / "cur.parquet")
    result = drift_between(PipelineSpec.model_validate(SPEC), [d / "ref.parquet"], [d / "cur.parquet"],
                           ["a", "b", "c"], d)
    assert result["drift_detected"]
    return Path(result["html"])


def _chromium(chromium, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--window-size=1400,2400", "--virtual-time-budget=15000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_console_errors_are_seen(chromium, tmp_path):
    """Negative control: a page with an uncaught error is flagged by the same check."""
    page = tmp_path / "bad.html"
    page.write_text("<html><body><h1>x</h1><script>undefinedFunction();</script></body></html>")
    proc = _chromium(chromium, tmp_path / "profile", f"--screenshot={tmp_path / 'bad.png'}", page.as_uri())
    assert [line for line in proc.stderr.splitlines() if _ERROR.search(line)]


def test_report_renders_without_js_errors(chromium, report, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "drift_report.png"
    shot.unlink(missing_ok=True)
    dom = _chromium(chromium, tmp_path / "dom-profile", "--dump-dom", report.as_uri())
    assert "Dataset Drift" in dom.stdout and "Drifted Columns" in dom.stdout, "the report did not render"
    proc = _chromium(chromium, tmp_path / "profile", f"--screenshot={shot}", report.as_uri())
    (ARTIFACTS / "drift_report.chromium.log").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shot.is_file() and shot.stat().st_size > 20_000, "no (or an empty) screenshot"
    errors = [line for line in proc.stderr.splitlines() if _ERROR.search(line)]
    assert errors == [], "\n".join(errors)
    # The page really rendered the report: a mostly-white screenshot would mean an empty page.
    from PIL import Image

    img = Image.open(shot).convert("L")
    dark = sum(1 for p in img.getdata() if p < 200)
    assert dark > 0.005 * img.width * img.height, "the screenshot is blank"
