"""Kill the whole loop anywhere, resume it, get the uninterrupted run's result.

``sppd-megatron run configs/tiny-cpu/run.yaml`` (the fitted tiny policy) is killed at a fault point of
every stage in turn: inside sampling, at a random moment of Monte-Carlo scoring, between the pairs
files, after an SFT-PRM step, after a DPO-PRM step, between the safetensors shards of DPO-PRM's HF
export, in the middle of a step-DPO checkpoint save (before its trainer_state.json), in evaluation,
before the report. After each kill the same command runs again. It must end with the scored trees,
datasets, training metrics, exported weights and predictions of the session's uninterrupted run
(tests/conftest.py), byte for byte. (Checkpoint saves are killed at every point in
test_train_faults.py; the Monte-Carlo and HF PRMs in test_disk_faults.py.)

A kill inside the pipeline process is the pipeline's death (status -9); one inside a training or
export child is that child's, which the pipeline reports in one line and exits 2.
"""

from __future__ import annotations

import random
import signal

from faultlib import clean_error, tree_digest
from pipeline_run import command, datasets, final_metrics, kill_when, lines, run, status

PROG = "sppd-megatron run"
MODELS = ("sft_prm", "dpo_prm", "step_dpo")


def test_the_loop_killed_at_every_stage_resumes_to_the_same_result(pipeline_reference, demo_data, tmp_path, tally):
    rng = random.Random(7)
    run_dir = tmp_path / "run"
    cmd = command(demo_data, run_dir)

    def killed(fault: str, stage: str) -> None:
        """The pipeline process itself dies at ``fault``."""
        proc = run(cmd, {"SPPD_FAULT": fault})
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert status(run_dir, stage) == "running", (fault, stage)
        tally.fault(stage, fault.split(":")[0], "recovered")

    def child_killed(fault: str, stage: str, child: str) -> None:
        """A ``child`` (train / convert) of ``stage`` dies at ``fault``: the run stops in one line."""
        proc = run(cmd, {"SPPD_FAULT": fault})
        assert proc.returncode == 2, proc.stderr[-3000:]
        clean_error(proc.stderr, PROG, f"{child} ", "was killed by SIGKILL", "run the same command again to resume",
                    alone=False)
        assert status(run_dir, stage) == "running", (fault, stage)
        tally.fault(stage, fault.split(":")[0], "clean error")
        tally.fault(stage, fault.split(":")[0], "recovered")

    killed(f"sample.tree:{rng.randint(2, 5)}", "sample")
    scored = run_dir / "iter1" / "score" / "scored" / "trees-00000.jsonl"
    kill_when(cmd, lambda: lines(scored) >= 1, rng.uniform(0.0, 0.05))  # mid Monte-Carlo rollouts
    assert status(run_dir, "sample") == "done" and status(run_dir, "score") == "running"
    tally.fault("score[mc]", "SIGKILL at a random moment", "recovered")
    killed("pairs.write:2", "pairs")
    child_killed("train.step[sft]:2", "sft_prm", "train")
    child_killed("train.step[dpo]:2", "dpo_prm", "train")  # SFT-PRM resumes first, then DPO-PRM dies
    child_killed("export.shard:1", "dpo_prm", "convert mcore-to-hf")
    child_killed("ckpt.state[step_dpo]:2", "step_dpo", "train")  # DPO-PRM's export again, no trainer
    killed("eval.question:2", "eval/base")
    proc = run(cmd, {"SPPD_FAULT": "report.write:1"})
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "report.json").exists()
    tally.fault("report", "report.write", "recovered")

    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref = pipeline_reference
    assert datasets(run_dir) == datasets(ref)
    assert final_metrics(run_dir) == final_metrics(ref)
    for model in MODELS:
        hf = f"iter1/{model}/hf"
        assert tree_digest(run_dir / hf, "*.safetensors") == tree_digest(ref / hf, "*.safetensors"), model
    for model in ("base", *MODELS):
        predictions = f"iter1/eval/{model}/predictions.jsonl"
        assert (run_dir / predictions).read_bytes() == (ref / predictions).read_bytes(), model
    assert not list(run_dir.rglob(".sppd-lock"))
