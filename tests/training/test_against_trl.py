"""Sentence DPO (and DPO + chosen NLL, RPO) through our data path and Megatron model equals TRL's DPOTrainer loss."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("trl_reference_worker.py")


def test_dpo_loss_matches_trl():
    pytest.importorskip("trl")
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS "))
    for family, r in json.loads(line[len("RESULTS "):]).items():
        assert r["ours"] == pytest.approx(r["trl"], rel=1e-5), family
