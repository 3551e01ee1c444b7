"""Through our data path and Megatron model, sentence DPO (and DPO + chosen NLL, RPO) equals TRL's
DPOTrainer loss, and SFT (token-level, and per-sequence) equals TRL's SFTTrainer loss and gradient norm.

``pytest -s`` prints the largest relative difference measured (the README quotes it).
"""

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
    results = json.loads(line[len("RESULTS "):])
    worst = max(abs(r["ours"] - r["trl"]) / abs(r["trl"]) for r in results.values())
    print(f"\nours vs TRL, {len(results)} losses and gradient norms: max relative difference {worst:.2g}")
    for name, r in results.items():
        assert r["ours"] == pytest.approx(r["trl"], rel=1e-5), name
