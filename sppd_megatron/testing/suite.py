"""What the opt-in suites (GPU, real model, vLLM) share: one summary table each, rows recorded by the
tests, printed by ``tests/conftest.py`` at the end of the run and written as markdown beside the run's
other outputs; a runner for the command line; a timer.

Each row is a check with the figure it measured, its limit and pass / FAIL / not run. The table's
header names the machine and its footer the wall time of the whole pytest run, so a table quoted
in the README says what it took.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TABLES: dict[str, "SummaryTable"] = {}
_started = time.time()


def session_started() -> None:
    """Called by ``pytest_sessionstart``: the wall time counts from here."""
    global _started
    _started = time.time()


def cpu_machine() -> str:
    import torch

    return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}"


class SummaryTable:
    """Rows of one suite; ``name`` picks the markdown file (``runs/<name>-report.md``, or ``$env_var``)."""

    def __init__(self, name: str, title: str, env_var: str, machine=cpu_machine):
        self.name, self.title, self.env_var, self.machine = name, title, env_var, machine
        self.rows: list[dict] = []
        TABLES[name] = self

    def record(self, check: str, config: str, figure: str, limit: str, ok: bool | None) -> None:
        """One row (ok None: not run, with the reason as the figure)."""
        self.rows.append({"check": check, "config": config, "figure": figure, "limit": limit,
                          "result": "not run" if ok is None else ("pass" if ok else "FAIL")})

    def not_run(self, check: str, config: str, reason: str) -> None:
        self.record(check, config, reason, "", None)
        pytest.skip(f"{check} [{config}]: {reason}")

    def markdown(self) -> str:
        lines = [f"{self.title} on {self.machine()}", "",
                 "| check | configuration | measured | limit | result |", "|---|---|---|---|---|"]
        lines += [f"| {r['check']} | {r['config']} | {r['figure']} | {r['limit']} | {r['result']} |" for r in self.rows]
        lines += ["", f"wall time of the run: {(time.time() - _started) / 60:.1f} min"]
        return "\n".join(lines) + "\n"

    def path(self) -> Path:
        return Path(os.environ.get(self.env_var, REPO / "runs" / f"{self.name}-report.md"))


def table(name: str, title: str, env_var: str, machine=cpu_machine) -> SummaryTable:
    """The suite's table, made on first use: test modules of one suite in several folders share it."""
    return TABLES.get(name) or SummaryTable(name, title, env_var, machine)


def write_tables() -> None:
    """Every table with rows written to its file; called after each test too, so a suite stopped
    part-way (a time limit on a lent machine) still leaves the rows it finished."""
    for table in TABLES.values():
        if table.rows:
            path = table.path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(table.markdown())


def print_tables(terminalreporter) -> None:
    """The ``pytest_terminal_summary`` body: every table that has rows, printed and written."""
    for table in TABLES.values():
        if not table.rows:
            continue
        text = table.markdown()
        terminalreporter.write_sep("=", f"{table.title} summary")
        terminalreporter.write(text)
        path = table.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        terminalreporter.write_line(f"written to {path}")


def run_cli(*args: str, env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    """``python -m sppd_megatron ARGS`` from the repository root; raises with the tail of its output."""
    proc = subprocess.run([sys.executable, "-m", "sppd_megatron", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"sppd-megatron {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-5000:]}")
    return proc


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self):
        self.t0 = time.time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.time() - self.t0
