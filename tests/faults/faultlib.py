"""What every fault test checks: a command that fails ends in one clean line."""

from __future__ import annotations

import hashlib
from pathlib import Path


def clean_error(err: str, prog: str, *needles: str, alone: bool = True) -> str:
    """The one ``PROG: error: ...`` line of ``err`` (a failed command's stderr), checked: no traceback, it
    is the last line, it names every needle; with ``alone`` it is the only line at all."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in lines if f"{prog}: error: " in line]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    if alone:
        assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert str(needle) in errors[0], (needle, errors[0])
    return errors[0]


def tree_digest(root: Path, pattern: str = "*") -> dict[str, str]:
    """sha256 of each file under ``root`` matching ``pattern`` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob(pattern)) if p.is_file()}


def run_in_one_process(cases: list[dict], tmp: Path, timeout: float = 900) -> list[dict]:
    """Each ``{"verb", "argv", "fault"}`` case through ``tests/faults/cli_worker.py``, all in one process."""
    import json
    import os
    import subprocess
    import sys

    worker = Path(__file__).with_name("cli_worker.py")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "cases.json").write_text(json.dumps(cases))
    env = {**{k: v for k, v in os.environ.items() if k != "SPPD_FAULT"}, "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(worker), str(tmp / "cases.json"), str(tmp / "results.json")],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "results.json").read_text())
