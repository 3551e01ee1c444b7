"""`sppd-megatron demo --quick` (the CI-sized embedded default) runs end to end and prints the table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_quick_prints_the_table(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "sppd_megatron", "demo", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    for row in ("Base", "+SFT-PRM", "+SFT-PRM & DPO-PRM", "+SPPD"):
        assert row in proc.stdout
    assert (out / "report.md").is_file() and (out / "report.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert len(report["demo"]["misconception_breakdown"]) == len(report["config"]["eval"]["models"])
    assert "with a triples step" in proc.stdout
