"""`sppd-megatron demo --quick` (the CI-sized embedded default) runs every stage on real records.

Not only "it exits 0": the quick base model solves some prompts, so the pairs stage builds records
of each kind (SFT-PRM, DPO-PRM, D_step), every training stage takes optimizer steps on them, and
the table and the misconception split are printed and written.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAINED = ("sft_prm", "dpo_prm", "step_dpo_none", "step_dpo_fixed", "step_dpo")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~6 min on 2 cores; more when they are shared
def test_demo_quick_trains_every_stage_on_real_records(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "sppd_megatron", "demo", "--quick", "--out", str(out), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=1700,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = proc.stdout

    pairs = re.search(r"\[pairs\] SFT-PRM (\d+), DPO-PRM (\d+), step pairs (\d+) from (\d+) trees", printed)
    assert pairs, printed[-3000:]
    assert all(int(n) > 0 for n in pairs.groups()), pairs.group(0)
    assert "refused by training (in pairs/rejects.jsonl): SFT-PRM" in printed  # the check ran
    for stage in TRAINED:
        steps = re.search(rf"\[{stage}\] (\d+) steps, final loss", printed)
        assert steps and int(steps.group(1)) > 0, f"{stage} took no optimizer step:\n{printed[-3000:]}"
    assert "passes its starting policy through" not in printed

    for row in ("Base", "+SFT-PRM", "+SFT-PRM & DPO-PRM", "+SPPD", "step-DPO, no margin", "step-DPO, fixed margin"):
        assert row in printed
    assert 'problems with a "triples" step' in printed

    report = json.loads((out / "report.json").read_text())
    it = report["iterations"]["1"]
    assert {k: it["pairs"][k] > 0 for k in ("sft", "dpo", "step")} == {"sft": True, "dpo": True, "step": True}
    assert all(it["train"][stage]["step"] > 0 for stage in TRAINED), it["train"]
    assert len(report["demo"]["misconception_breakdown"]) == len(report["config"]["eval"]["models"])
    md = (out / "report.md").read_text()
    assert "Pairs (iteration 1): SFT-PRM" in md and "not trained" not in md
