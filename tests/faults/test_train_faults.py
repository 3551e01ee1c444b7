"""Training under faults: kills anywhere (mid-checkpoint too), a full disk, an unwritable file, a second
command on the directory, NaN losses and gradients, on one process and on two ranks.

One SVPO run is killed or failed at a chain of points, resumed after each, and must end with the
metrics and the final checkpoint of an uninterrupted run, byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faultlib import clean_error, run_in_one_process, tree_digest

ROOT = Path(__file__).resolve().parents[2]
PROG = "sppd-megatron train"


def train_cmd(config: str, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "sppd_megatron", "train", config, f"output_dir={out}", "logging.progress=false",
            "logging.tensorboard=false", *overrides]


def env(fault: str | None = None) -> dict:
    extra = {"SPPD_FAULT": fault} if fault else {}
    return {**{k: v for k, v in os.environ.items() if k != "SPPD_FAULT"}, "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": "1", **extra}


def train(cmd: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(fault), capture_output=True, text=True, timeout=600)


def metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "step_time_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text()


SVPO = ["configs/tiny-cpu/svpo.yaml", "schedule.train_steps=4", "checkpoint.save_interval=1", "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def svpo_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("svpo") / "reference"
    proc = train(train_cmd(SVPO[0], out, *SVPO[1:]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_killed_and_failed_anywhere_resumes_to_the_uninterrupted_result(svpo_reference, tmp_path, tally):
    out = tmp_path / "chain"
    cmd = train_cmd(SVPO[0], out, *SVPO[1:])

    # Killed in the 2nd checkpoint save, between the model's files and the optimizer's: the 1st stays the
    # latest, complete and loadable (the next command resumes from it).
    proc = train(cmd, "ckpt.model:2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert latest(out) == "1" and (out / "checkpoints/iter_0000002/model").is_dir()
    assert not (out / "checkpoints/iter_0000002/optimizer").exists()
    tally.fault("train[svpo]", "ckpt.model", "recovered")

    # Killed after the state file of save 2, before `latest` moves: still resumes from 1.
    proc = train(cmd, "ckpt.latest:1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert latest(out) == "1" and (out / "checkpoints/iter_0000002/trainer_state.json").is_file()
    tally.fault("train[svpo]", "ckpt.latest", "recovered")

    # Stuck after step 2 (saved): a second command on the directory is refused, naming the holder.
    stuck = subprocess.Popen(cmd, cwd=ROOT, env=env("train.step:1:hang"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ((out / "checkpoints/latest").is_file() and latest(out) == "2"):
            assert stuck.poll() is None, stuck.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        second = train(cmd)
        assert second.returncode == 2
        clean_error(second.stderr, PROG, str(out), f"pid {stuck.pid}", f"host {socket.gethostname()}", alone=False)
        tally.fault("train[svpo]", "second writer", "clean error")
    finally:
        stuck.kill()  # SIGKILL: its lock stays behind, stale
        stuck.wait()
        stuck.stderr.close()
    tally.fault("train[svpo]", "train.step", "recovered")

    # Then, in one process: the disk is full when step 3's metrics line is written (the stale lock is
    # taken over); trainer_state.json of save 3 cannot be written; then space is back.
    argv = cmd[4:]
    full, denied, done = run_in_one_process([
        {"verb": "train", "argv": argv, "fault": "train.metrics:1:enospc"},
        {"verb": "train", "argv": argv, "fault": "ckpt.state:1:eacces"},
        {"verb": "train", "argv": argv, "fault": None},
    ], tmp_path / "worker")
    assert full["rc"] == 2 and "took over the lock" in full["stderr"]
    clean_error(full["stderr"], PROG, str(out / "metrics.jsonl"), "No space left on device", alone=False)
    tally.fault("train[svpo]", "train.metrics", "clean error")
    assert denied["rc"] == 2
    clean_error(denied["stderr"], PROG, "iter_0000003/trainer_state.json", "Permission denied", alone=False)
    tally.fault("train[svpo]", "ckpt.state", "clean error")
    assert done["rc"] == 0, done["stderr"][-3000:]

    # Exactly as if nothing had happened.
    assert metrics(out) == metrics(svpo_reference)
    final = "checkpoints/iter_0000004"
    assert tree_digest(out / final, "*.distcp") == tree_digest(svpo_reference / final, "*.distcp")
    state = [{k: v for k, v in json.loads((d / final / "trainer_state.json").read_text()).items()
              if k != "config_fingerprint"} for d in (out, svpo_reference)]  # the fingerprint holds output_dir
    assert state[0] == state[1]
    assert not (out / ".sppd-lock").exists()


STEP_DPO = ["configs/tiny-cpu/step_dpo.yaml", "schedule.train_steps=3", "checkpoint.save_interval=1"]


def _export(out: Path) -> dict:
    """``convert mcore-to-hf`` of the latest checkpoint of ``out`` (a worker case) into ``out/hf``."""
    ckpt = out / "checkpoints" / f"iter_{int(latest(out)):07d}"
    return {"verb": "convert", "argv": ["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out / "hf")], "fault": None}


def _finite(hf: Path) -> bool:
    from safetensors.torch import load_file

    tensors = load_file(str(hf / "model.safetensors"))
    return bool(tensors) and all(bool(t.isfinite().all()) for t in tensors.values())


@pytest.fixture(scope="module")
def nonfinite_runs(tmp_path_factory) -> dict:
    """In one process: a learning rate that overflows (stop), a NaN gradient at step 2 (skip), a full disk
    while the reference log-probs are written; each checkpoint left is exported to HF."""
    tmp = tmp_path_factory.mktemp("nonfinite")
    runs = {"lr": (tmp / "lr", ["optim.optimizer=adamw", "optim.lr=1e10"], None),
            "skip": (tmp / "skip", ["on_nonfinite=skip"], "train.grad:2:nan"),
            "reference": (tmp / "reference", [], "train.reference:1:enospc")}
    cases = [{"verb": "train", "argv": train_cmd(STEP_DPO[0], out, *STEP_DPO[1:], *extra)[4:], "fault": fault}
             for out, extra, fault in runs.values()]
    results = dict(zip(runs, run_in_one_process(cases, tmp / "worker")))
    exports = [name for name, (out, _, _) in runs.items() if (out / "checkpoints" / "latest").is_file()]
    for name, result in zip(exports, run_in_one_process([_export(runs[n][0]) for n in exports], tmp / "export")):
        assert result["rc"] == 0, result["stderr"][-3000:]
    return {name: (runs[name][0], result) for name, result in results.items()}


def test_a_learning_rate_that_overflows_stops_in_one_line_and_no_checkpoint_is_non_finite(nonfinite_runs, tally):
    out, result = nonfinite_runs["lr"]
    assert result["rc"] == 2, result["stderr"][-3000:]
    line = clean_error(result["stderr"], PROG, "step 2: rank 0: loss is ", "before the optimizer step", alone=False)
    assert "on_nonfinite=skip" in line and "iter_0000001" in line
    assert latest(out) == "1" and [m["step"] for m in metrics(out)] == [1]
    assert _finite(out / "hf")
    tally.fault("train[step_dpo]", "non-finite loss (lr 1e10)", "clean error")


def test_skip_leaves_the_weights_and_counts_the_step(nonfinite_runs, tally):
    out, result = nonfinite_runs["skip"]
    assert result["rc"] == 0, result["stderr"][-3000:]
    rows = metrics(out)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert "gradient of " in rows[1]["skipped"] and rows[1]["grad_norm"] is None
    assert "skipped" not in rows[0] and "skipped" not in rows[2]
    # No update and no schedule step (a row's lr is the one set for the next step): step 3 runs at the
    # learning rate step 2 would have had.
    assert rows[1]["lr"] == rows[0]["lr"] > rows[2]["lr"] and math.isfinite(rows[2]["loss"])
    assert json.loads((out / "checkpoints/iter_0000003/trainer_state.json").read_text())["skipped_steps"] == 1
    assert _finite(out / "hf")
    tally.fault("train[step_dpo]", "train.grad", "recovered")


def test_a_full_disk_before_anything_is_trained_leaves_nothing_half_written(nonfinite_runs, tally):
    out, result = nonfinite_runs["reference"]
    assert result["rc"] == 2
    clean_error(result["stderr"], PROG, str(out / "reference_logps.jsonl"), "No space left on device", alone=False)
    assert not (out / "reference_logps.jsonl").exists() and not (out / "checkpoints").exists()
    tally.fault("train[step_dpo]", "train.reference", "clean error")


@pytest.mark.distributed
def test_a_nan_on_one_rank_stops_every_rank_before_the_step(tmp_path, tally):
    from sppd_megatron.testing.distributed import torchrun

    out = tmp_path / "dp2"
    args = ["-m", "sppd_megatron", "train", *STEP_DPO, f"output_dir={out}", "logging.progress=false",
            "logging.tensorboard=false"]
    proc = torchrun(args, nproc=2, cwd=ROOT, check=False, env={"SPPD_FAULT": "train.grad@1:2:nan"})
    assert proc.returncode != 0
    both = proc.stdout + proc.stderr
    # torchrun's launcher prints its own traceback when a rank exits non-zero; the ranks print none.
    assert not [line for line in both.splitlines() if 'File "' in line and "torch/distributed" not in line
                and "<frozen" not in line], both[-4000:]
    # Each rank stops with the same line (rank 0 too, whose own gradients were finite).
    assert both.count(f"{PROG}: error: step 2: rank 1: gradient of ") == 2, both[-4000:]
    assert latest(out) == "1" and [m["step"] for m in metrics(out)] == [1]
    tally.fault("train[step_dpo, DP=2]", "train.grad", "clean error")
