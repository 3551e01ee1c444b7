"""The GPU suite's summary table: printed at the end of the run and written as markdown.

Written to ``$SPPD_GPU_REPORT`` (default ``runs/gpu-report.md``): one row per check with the figure
it measured, its limit and pass / FAIL / not run.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpu_suite import REPO, ROWS, machine


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not ROWS:
        return
    lines = [f"GPU suite on {machine()}", "",
             "| check | configuration | measured | limit | result |", "|---|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['config']} | {r['figure']} | {r['limit']} | {r['result']} |" for r in ROWS]
    text = "\n".join(lines) + "\n"
    terminalreporter.write_sep("=", "GPU suite summary")
    terminalreporter.write(text)
    path = Path(os.environ.get("SPPD_GPU_REPORT", REPO / "runs" / "gpu-report.md"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
