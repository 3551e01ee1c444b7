"""launch/torchrun.sh: the commands it builds, and a real 2-process CPU run of the tiny SFT recipe."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sppd_megatron.testing.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "torchrun.sh"


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "NPROC"))}
    return subprocess.run(["bash", str(SCRIPT), *args], env={**clean, **env}, capture_output=True, text=True,
                          timeout=300)


def test_dry_run_reads_the_layout_from_the_recipe_name():
    proc = _run(["train", "configs/recipes/llama3-70b/sft-4n8g-tp8pp4.yaml", "optim.lr=1e-6"],
                DRYRUN="1", NODE_RANK="3", MASTER_ADDR="node0")
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout
    for part in ("-m torch.distributed.run", "--nnodes=4", "--node-rank=3", "--nproc-per-node=8",
                 "--master-addr=node0", "-m sppd_megatron train configs/recipes/llama3-70b/sft-4n8g-tp8pp4.yaml",
                 "optim.lr=1e-6"):
        assert part in cmd, (part, cmd)


def test_slurm_variables_fill_nodes_and_rank():
    proc = _run(["train", "configs/tiny-cpu/sft.yaml"], DRYRUN="1", SLURM_NNODES="2", SLURM_NODEID="1",
                NPROC_PER_NODE="4")
    assert "--nnodes=2 --node-rank=1 --nproc-per-node=4" in proc.stdout


def test_data_verbs_run_one_process():
    proc = _run(["sample", "configs/recipes/qwen2.5-7b-base/sample.yaml"], DRYRUN="1")
    assert "torch.distributed.run" not in proc.stdout
    assert "-m sppd_megatron sample configs/recipes/qwen2.5-7b-base/sample.yaml" in proc.stdout


def test_bad_input_is_explained():
    assert "unknown verb" in _run(["fly", "configs/tiny-cpu/sft.yaml"]).stderr
    assert "no such recipe" in _run(["train", "nope.yaml"]).stderr
    usage = _run([])
    assert usage.returncode == 2 and "launch/torchrun.sh VERB RECIPE" in usage.stdout


@pytest.mark.distributed
def test_two_cpu_workers_train_the_tiny_sft_recipe(tmp_path):
    out = tmp_path / "sft"
    proc = _run(["train", "configs/tiny-cpu/sft.yaml", f"output_dir={out}", "logging.progress=false",
                 "checkpoint.save_final=false", "schedule.train_steps=2"],
                NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    config = json.loads((out / "train_config.json").read_text())
    assert config["stage"] == "sft"
