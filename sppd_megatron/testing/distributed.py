"""Launch CPU torchrun jobs from tests and benchmarks: gloo, one free port per launch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int, cwd: str | Path | None = None, timeout: float = 600,
             env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc ARGS`` on 127.0.0.1 with a fresh port; raises with output on failure.

    ``args`` is a script path or ``-m module`` followed by its arguments.
    """
    port = free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc}", "--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={port}",
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"torchrun exited {proc.returncode}: {' '.join(cmd)}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc
