"""Reference log-probs: stored with the dataset (precompute-ref), computed before training, or co-resident."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sppd_megatron.records import PreferencePair, read_jsonl

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/tiny-cpu/step_dpo.yaml"


def _cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "sppd_megatron", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(out: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_three_ways_to_the_reference_agree(tmp_path):
    common = ["schedule.train_steps=4", "checkpoint.save_final=false", "logging.progress=false"]
    stored = tmp_path / "pairs_with_ref.jsonl"
    _cli("precompute-ref", CONFIG, "--out", str(stored), "logging.progress=false")  # overrides after --out
    records = list(read_jsonl(stored, PreferencePair))
    assert len(records) == 32 and all(r.ref_chosen_logp is not None and r.ref_rejected_logp is not None for r in records)

    _cli("train", CONFIG, f"output_dir={tmp_path / 'auto'}", *common)
    _cli("train", CONFIG, f"output_dir={tmp_path / 'stored'}", f"data.train_file={stored}", *common)
    _cli("train", CONFIG, f"output_dir={tmp_path / 'co'}", "loss.reference=co_resident", *common)
    assert (tmp_path / "auto" / "reference_logps.jsonl").is_file()
    assert not (tmp_path / "stored" / "reference_logps.jsonl").exists()  # the dataset carried them
    auto = _losses(tmp_path / "auto")
    assert _losses(tmp_path / "stored") == pytest.approx(auto, rel=1e-6)
    assert _losses(tmp_path / "co") == pytest.approx(auto, rel=1e-6)
