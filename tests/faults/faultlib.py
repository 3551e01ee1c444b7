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
