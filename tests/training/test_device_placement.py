"""The trainer's tensors live where the model lives (issue: the GPU path had never placed anything).

A CPU-only machine cannot run CUDA, but it can run the whole forward/backward with the accelerator
played by ``meta`` (see placement_worker.py): parameters, gradients, the per-micro-batch reports
Megatron all-reduces, and the reference pass must all be on that device, while batches arrive from
the host as a data loader delivers them. A tensor left on the CPU anywhere raises.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_forward_backward_on_the_accelerator_with_host_batches():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "training" / "placement_worker.py")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""},
    )
    line = next((l for l in proc.stdout.splitlines() if l.startswith("PLACEMENT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    for stage, seen in json.loads(line[len("PLACEMENT "):]).items():
        assert seen["batches"] == ["cpu"], stage
        assert seen["parameters"] == ["meta"], stage
        assert seen["grads"] == ["meta"], stage
        assert seen["reports"] == ["meta"], stage
        assert seen["reference"] == ["meta"], stage
