"""launch/nemo_run_launch.py: Slurm dry runs print sbatch scripts; a LocalExecutor torchrun job trains on CPU.

nemo-run is the ``launch`` extra; these tests skip only when ``nemo_run`` cannot be imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nemo_run")

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launch" / "nemo_run_launch.py"


def _launch(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "NEMORUN_HOME": str(tmp_path / "nemorun_home"),
        # nemo-run's local torchrun resolves `torchrun` / `python` on PATH: use this interpreter's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "COLUMNS": "400",  # rich wraps long lines at the terminal width
        "PYTHONWARNINGS": "ignore",
    }
    return subprocess.run([sys.executable, str(LAUNCHER), *args, "--job-dir", str(tmp_path / "jobs")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


SLURM = ["--executor", "slurm", "--account", "sppd", "--partition", "batch", "--dryrun",
         "--container-image", "nvcr.io/nvidia/pytorch:25.01-py3", "--workdir", "/lustre/sppd-megatron"]


def test_slurm_dryrun_of_the_70b_recipe_prints_a_multi_node_torchrun_sbatch(tmp_path):
    proc = _launch(tmp_path, ["train", "configs/recipes/llama3-70b/sft-4n8g-tp8pp4.yaml", *SLURM])
    assert proc.returncode == 0, proc.stderr[-4000:]
    script = proc.stdout + proc.stderr
    for part in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --account=sppd",
                 "#SBATCH --partition=batch", "torchrun", "--nnodes 4", "--nproc-per-node 8",
                 "--container-image", "/lustre/sppd-megatron/launch/entry.py /lustre/sppd-megatron train "
                 "configs/recipes/llama3-70b/sft-4n8g-tp8pp4.yaml"):
        assert part in script, part


def test_slurm_dryrun_of_sampling_is_one_process_on_one_node_with_all_gpus(tmp_path):
    proc = _launch(tmp_path, ["sample", "configs/recipes/qwen2.5-7b-base/sample.yaml", *SLURM, "--nodes", "2",
                              "--gpus-per-node", "8"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    script = proc.stdout + proc.stderr
    assert "#SBATCH --nodes=1" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --gpus-per-node=8" in script and "torchrun" not in script
    assert "entry.py /lustre/sppd-megatron sample configs/recipes/qwen2.5-7b-base/sample.yaml" in script


def test_slurm_needs_account_and_partition(tmp_path):
    proc = _launch(tmp_path, ["train", "configs/tiny-cpu/sft.yaml", "--executor", "slurm", "--dryrun"])
    assert proc.returncode != 0 and "needs --account and --partition" in proc.stderr


@pytest.mark.distributed
def test_local_executor_torchrun_trains_the_tiny_recipe_on_cpu(tmp_path):
    out = tmp_path / "sft"
    proc = _launch(tmp_path, ["train", "configs/tiny-cpu/sft.yaml", f"output_dir={out}", "logging.progress=false",
                              "checkpoint.save_final=false", "schedule.train_steps=2",
                              "--executor", "local", "--nproc-per-node", "2"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert "--nproc-per-node" in proc.stdout + proc.stderr or "nproc_per_node" in proc.stdout + proc.stderr


def test_a_failing_task_fails_the_launcher(tmp_path):
    proc = _launch(tmp_path, ["pairs", "configs/tiny-cpu/pairs.yaml", f"input_dir={tmp_path / 'none'}",
                              f"output_dir={tmp_path / 'pairs'}", "--executor", "local"])
    assert proc.returncode == 1 and "did not succeed" in proc.stderr
