"""Helpers of the tests that run the tiny loop (``sppd-megatron run configs/tiny-cpu/run.yaml``) as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny-cpu/run.yaml"


def command(data: dict, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sppd_megatron", "run", CONFIG, f"run_dir={run_dir}", f"policy={data['policy']}",
            f"prompts.path={data['prompts']}", f"eval.benchmarks={{fitted: {{path: {data['prompts']}}}}}",
            "progress=false", "tensorboard=false", *extra]


def env(extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(extra or {})}


def run(cmd: list[str], extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(extra_env), capture_output=True, text=True, timeout=600)


def lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def status(run_dir: Path, stage: str) -> str | None:
    path = run_dir / "iter1" / stage / "manifest.json"
    return json.loads(path.read_text())["status"] if path.is_file() else None


def kill_when(cmd: list[str], ready, delay: float) -> None:
    """Start the run, wait until ``ready()``, then ``delay`` seconds, and SIGKILL its whole process group."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 300
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before the kill point:\n"
                                 f"{proc.stderr.read().decode()[-3000:]}")
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.02)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def final_metrics(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text())["iterations"]["1"]
    train = {stage: {k: v for k, v in m.items() if k != "step_time_s"} for stage, m in report["train"].items()}
    return {"eval": report["eval"], "train": train}


def datasets(run_dir: Path) -> dict[str, bytes]:
    files = sorted((run_dir / "iter1" / "score" / "scored").glob("trees-*.jsonl"))
    files += [run_dir / "iter1" / "pairs" / n for n in ("sft.jsonl", "dpo.jsonl", "step_pairs.jsonl")]
    return {f.name: f.read_bytes() for f in files}
