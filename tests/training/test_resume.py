"""A run killed after a checkpoint resumes and continues exactly like an uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sppd_megatron.testing.distributed import torchrun

REPO = Path(__file__).resolve().parents[2]


OPTIMIZERS = {
    "adamw": ["optim.optimizer=adamw", "optim.lr=1e-3"],
    "sgd": ["optim.optimizer=sgd", "optim.lr=1e-2", "optim.sgd_momentum=0.9"],
}


def _train(out: Path, *overrides: str, env: dict | None = None, optimizer: str = "adamw") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sppd_megatron", "train", "configs/tiny-cpu/step_dpo.yaml",
           f"output_dir={out}", "schedule.train_steps=6", "checkpoint.save_interval=2",
           *OPTIMIZERS[optimizer], "optim.warmup_steps=2", "logging.progress=false", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=sorted(OPTIMIZERS))
def runs(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"resume-{request.param}")
    full = _train(tmp / "full", optimizer=request.param)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _train(tmp / "killed", env={"SPPD_FAULT": "train.step:3"}, optimizer=request.param)
    assert killed.returncode == -9, killed.stderr[-3000:]
    return tmp, request.param


def test_killed_run_resumes_with_identical_losses(runs):
    runs, optimizer = runs
    killed_dir = runs / "killed"
    assert (killed_dir / "checkpoints" / "latest").read_text() == "2"
    assert [m["step"] for m in _metrics(killed_dir)] == [1, 2, 3]
    resumed = _train(killed_dir, optimizer=optimizer)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full, after = _metrics(runs / "full"), _metrics(killed_dir)
    assert [m["step"] for m in after] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, after):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), a["step"]
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]


def test_resume_with_a_different_config_is_refused(runs):
    runs, optimizer = runs
    proc = _train(runs / "full", "loss.beta=0.2", "schedule.train_steps=8", optimizer=optimizer)
    assert proc.returncode != 0
    assert "different config" in proc.stderr


@pytest.mark.distributed
def test_distributed_optimizer_resume_under_torchrun(tmp_path):
    """DP=2 with the distributed optimizer (Adam state sharded over ranks): killed, resumed, identical."""
    args = ["-m", "sppd_megatron", "train", "configs/tiny-cpu/step_dpo.yaml", "schedule.train_steps=5",
            "checkpoint.save_interval=2", "optim.optimizer=adamw", "optim.lr=1e-3", "optim.weight_decay=0.1",
            "parallel.use_distributed_optimizer=true", "logging.progress=false"]
    torchrun([*args, f"output_dir={tmp_path / 'full'}"], nproc=2, cwd=REPO)
    killed = torchrun([*args, f"output_dir={tmp_path / 'killed'}"], nproc=2, cwd=REPO, check=False,
                      env={"SPPD_FAULT": "train.step:3"})
    assert killed.returncode != 0
    torchrun([*args, f"output_dir={tmp_path / 'killed'}"], nproc=2, cwd=REPO)
    full, resumed = _metrics(tmp_path / "full"), _metrics(tmp_path / "killed")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(full, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]
