"""``token_logprobs`` over sequences longer than one chunk equals a plain ``log_softmax``, values and gradients."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("logprobs_worker.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results():
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("padded_vocab", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_long_sequence_matches_log_softmax(results, dtype, batch, padded_vocab, grad):
    r = results[f"{dtype}-b{batch}-v{123 if padded_vocab else 128}-{'grad' if grad else 'nograd'}"]
    assert "error" not in r, r.get("error")
    # Both sides compute in fp32 from the same logits; only summation order differs.
    assert r["value_max_abs_diff"] < 1e-4
    assert r["input_unchanged"], "token_logprobs changed the logits it was given"
    if grad:
        # bf16 gradients are rounded to bf16 on both sides: allow one rounding step of the largest.
        tol = (1e-6 if dtype == "float32" else 2 ** -8) * r["grad_max_abs"]
        assert r["grad_max_abs_diff"] <= tol
