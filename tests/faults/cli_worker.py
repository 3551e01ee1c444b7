"""Runs many sppd-megatron commands in one process, so Megatron's start-up is paid once for all of them.

    python cli_worker.py CASES.json RESULTS.json

CASES.json is a list of ``{"verb": "train", "argv": [...], "fault": "SPPD_FAULT value or null"}``; each
runs as ``sppd-megatron VERB ARGV`` would (its ``main(argv)``), with the fault armed and counted afresh.
RESULTS.json gets ``{"rc", "stderr", "stdout"}`` per case; a case that raises instead of returning gets
rc ``"traceback"`` and the traceback as its stderr.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
import traceback


def run_case(case: dict) -> dict:
    from sppd_megatron import faults
    from sppd_megatron.cli import VERBS

    os.environ.pop(faults.ENV, None)
    if case.get("fault"):
        os.environ[faults.ENV] = case["fault"]
    faults.reset()
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = importlib.import_module(VERBS[case["verb"]][0]).main(list(case["argv"]))
        except SystemExit as exc:
            rc = exc.code
        except BaseException:
            traceback.print_exc()
            rc = "traceback"
    return {"rc": rc, "stderr": err.getvalue(), "stdout": out.getvalue()[-4000:]}


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    results = [run_case(case) for case in cases]
    with open(sys.argv[2], "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
