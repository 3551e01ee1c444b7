"""Shared by the GPU suite (``./run test-gpu``): what it runs on, the summary table, small runners.

The suite needs CUDA. ``SPPD_GPU_SUITE_ON_CPU=1`` runs the same checks on the CPU (local layers,
no engines but the embedded one) to debug the suite itself before a GPU is at hand; its table then
says ``cpu``. TransformerEngine, vLLM and SGLang checks run where those import and are reported as
not run otherwise, with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sppd_megatron.testing.suite import SummaryTable, Timer, run_cli  # noqa: F401 (Timer: for the tests)

REPO = Path(__file__).resolve().parents[2]
ON_CPU = os.environ.get("SPPD_GPU_SUITE_ON_CPU") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

needs_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU, reason="needs a CUDA GPU (./run test-gpu)"),
]


def import_error(module: str) -> str | None:
    """None when ``module`` imports, else its error in one line (a broken install raises more than ImportError)."""
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
    return None


def te_error() -> str | None:
    if DEVICE != "cuda":
        return "no CUDA"
    return import_error("transformer_engine.pytorch")


def fp8_error() -> str | None:
    err = te_error()
    if err:
        return err
    major, minor = torch.cuda.get_device_capability()
    return None if (major, minor) >= (8, 9) else f"FP8 needs compute capability 8.9+, this GPU is {major}.{minor}"


def machine() -> str:
    if DEVICE == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"cpu (SPPD_GPU_SUITE_ON_CPU dry run), torch {torch.__version__}"


# Written to $SPPD_GPU_REPORT (default runs/gpu-report.md).
TABLE = SummaryTable("gpu", "GPU suite", "SPPD_GPU_REPORT", machine)
record = TABLE.record
not_run = TABLE.not_run


def cli(*args: str, env: dict | None = None, timeout: float = 600):
    return run_cli(*args, env=env, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
