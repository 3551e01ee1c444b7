"""The GPU suite's summary table: printed at the end of the run and written as markdown.

Written to ``$SPPD_GPU_REPORT`` (default ``runs/gpu-report.md``) after every test, so a run cut short
still leaves the rows it finished: one row per check with the figure it measured, its limit and
pass / FAIL / not run.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpu_suite import REPO, ROWS, machine


def _table() -> str:
    lines = [f"GPU suite on {machine()}", "",
             "| check | configuration | measured | limit | result |", "|---|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['config']} | {r['figure']} | {r['limit']} | {r['result']} |" for r in ROWS]
    return "\n".join(lines) + "\n"


def _write() -> None:
    path = Path(os.environ.get("SPPD_GPU_REPORT", REPO / "runs" / "gpu-report.md"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_table())


def pytest_runtest_logfinish(nodeid, location):
    if ROWS:
        _write()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not ROWS:
        return
    terminalreporter.write_sep("=", "GPU suite summary")
    terminalreporter.write(_table())
    _write()
