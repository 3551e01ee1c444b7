"""Shared by the GPU suite (``./run test-gpu``): what it runs on, the summary table, small runners.

The suite needs CUDA. ``SPPD_GPU_SUITE_ON_CPU=1`` runs the same checks on the CPU (local layers,
no engines but the embedded one) to debug the suite itself before a GPU is at hand; its table then
says ``cpu``. TransformerEngine, vLLM and SGLang checks run where those import and are reported as
not run otherwise, with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ON_CPU = os.environ.get("SPPD_GPU_SUITE_ON_CPU") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS: list[dict] = []

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


def record(check: str, config: str, figure: str, limit: str, ok: bool | None) -> None:
    """One row of the summary table (ok None: not run, with the reason as the figure)."""
    ROWS.append({"check": check, "config": config, "figure": figure, "limit": limit,
                 "result": "not run" if ok is None else ("pass" if ok else "FAIL")})


def not_run(check: str, config: str, reason: str) -> None:
    record(check, config, reason, "", None)
    pytest.skip(f"{check} [{config}]: {reason}")


def machine() -> str:
    if DEVICE == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"cpu (SPPD_GPU_SUITE_ON_CPU dry run), torch {torch.__version__}"


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m sppd_megatron ARGS`` from the repository root; raises with the tail of its output."""
    proc = subprocess.run([sys.executable, "-m", "sppd_megatron", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"sppd-megatron {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


class Timer:
    def __enter__(self):
        self.t0 = time.time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.time() - self.t0
