"""``sppd-megatron run`` end to end on toy settings: stages, manifests, skip, refuse, kill and resume.

One uninterrupted run is the reference. A second run of the same config and seed is killed with
SIGKILL at random points while sampling, while scoring and while training (the trainer child dies
with it), re-launched after each kill, and must finish with the same datasets and final metrics.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/tiny-cpu/run.yaml"


def _command(data: dict, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sppd_megatron", "run", CONFIG, f"run_dir={run_dir}", f"policy={data['policy']}",
            f"prompts.path={data['prompts']}", f"eval.benchmarks={{fitted: {{path: {data['prompts']}}}}}",
            "progress=false", "tensorboard=false", *extra]


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(extra or {})}


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=600)


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def _status(run_dir: Path, stage: str) -> str | None:
    path = run_dir / "iter1" / stage / "manifest.json"
    return json.loads(path.read_text())["status"] if path.is_file() else None


def _kill_when(cmd: list[str], ready, delay: float) -> None:
    """Start the run, wait until ``ready()``, then ``delay`` seconds, and SIGKILL its whole process group."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
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


def _final_metrics(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text())["iterations"]["1"]
    train = {stage: {k: v for k, v in m.items() if k != "step_time_s"} for stage, m in report["train"].items()}
    return {"eval": report["eval"], "train": train}


def _datasets(run_dir: Path) -> dict[str, bytes]:
    files = sorted((run_dir / "iter1" / "score" / "scored").glob("trees-*.jsonl"))
    files += [run_dir / "iter1" / "pairs" / n for n in ("sft.jsonl", "dpo.jsonl", "step_pairs.jsonl")]
    return {f.name: f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = _run(_command(demo_data, run_dir))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def test_run_writes_every_stage_with_manifest_and_report(reference, demo_data):
    for stage in ("sample", "score", "pairs", "sft_prm", "dpo_prm", "step_dpo", "eval/base", "eval/step_dpo"):
        manifest = json.loads((reference / "iter1" / stage / "manifest.json").read_text())
        assert manifest["status"] == "done", stage
        assert manifest["code_version"] and manifest["outputs"]
    train = json.loads((reference / "iter1" / "dpo_prm" / "manifest.json").read_text())
    # chained: DPO-PRM starts from SFT-PRM's final Megatron checkpoint, and was exported to HF
    assert "sft_prm/train/checkpoints/iter_0000003" in train["config"]["init"]["path"]
    assert (reference / "iter1" / "dpo_prm" / "hf" / "config.json").is_file()
    stats = json.loads((reference / "iter1" / "pairs" / "pairs_stats.json").read_text())
    assert stats["step"]["pairs"] > 0 and stats["dpo"]["pairs"] > 0, "the fitted policy should give pairs"
    metrics = _final_metrics(reference)
    assert set(metrics["train"]) == {"sft_prm", "dpo_prm", "step_dpo"}
    assert all(m["step"] == 3 for m in metrics["train"].values())
    for model in ("base", "sft_prm", "dpo_prm", "step_dpo"):
        result = metrics["eval"][model]["results"]["fitted"]
        assert result["greedy"]["n"] == 6 and result["maj@2"]["n"] == 6
    assert "| Base |" in (reference / "report.md").read_text()


def test_rerun_skips_finished_stages_and_refuses_a_changed_config(reference, demo_data):
    before = (reference / "iter1" / "step_dpo" / "manifest.json").read_text()
    proc = _run(_command(demo_data, reference))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped") >= 10 and "running in" not in proc.stdout
    assert (reference / "iter1" / "step_dpo" / "manifest.json").read_text() == before
    proc = _run(_command(demo_data, reference, "sample.K=5"))
    assert proc.returncode == 2
    assert "refusing to mix outputs" in proc.stderr and "config.K: 4 -> 5" in proc.stderr


def test_killed_at_random_points_resumes_to_the_same_result(reference, demo_data, tmp_path):
    rng = random.Random(7)
    run_dir = tmp_path / "run"
    cmd = _command(demo_data, run_dir)
    # 1. during sampling: the sampler's own hook SIGKILLs the run after a random number of trees
    proc = _run(cmd, env={"SPPD_SAMPLE_KILL_AFTER_TREES": str(rng.randint(1, 5))})
    assert proc.returncode == -signal.SIGKILL and _status(run_dir, "sample") == "running"
    # 2. during scoring: as soon as the first scored trees are on disk (Monte-Carlo rollouts still running)
    scored = run_dir / "iter1" / "score" / "scored" / "trees-00000.jsonl"
    _kill_when(cmd, lambda: _lines(scored) >= 1, rng.uniform(0.0, 0.05))
    assert _status(run_dir, "sample") == "done" and _status(run_dir, "score") == "running"
    # 3. during training: after SFT-PRM's first optimizer step (a checkpoint every step, so it resumes
    # from one); the trainer child dies with the run
    metrics = run_dir / "iter1" / "sft_prm" / "train" / "metrics.jsonl"
    _kill_when(cmd, lambda: _lines(metrics) >= 1, rng.uniform(0.0, 0.3))
    assert _status(run_dir, "sft_prm") == "running"
    # 4. resume to the end
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming the unfinished stage" in proc.stdout
    assert _datasets(run_dir) == _datasets(reference)
    assert _final_metrics(run_dir) == _final_metrics(reference)


def test_pairs_too_long_for_training_go_to_rejects_and_the_run_goes_on(reference, demo_data, tmp_path):
    """The reference's scored trees, with SFT-PRM's data.max_length one token short of its longest
    examples: those land in pairs/rejects.jsonl with the reason, and SFT-PRM trains on the rest."""
    from sppd_megatron.records import SFTExample, read_jsonl
    from sppd_megatron.tokenization import load_tokenizer
    from sppd_megatron.training.data import build_example

    tokenizer = load_tokenizer(demo_data["policy"])
    examples = list(read_jsonl(reference / "iter1" / "pairs" / "sft.jsonl", SFTExample))
    lengths = [len(build_example(e, tokenizer, 10_000).rows[0].ids) for e in examples]
    max_length = max(lengths) - 1
    too_long = sum(n > max_length for n in lengths)
    assert 0 < too_long < len(examples), lengths
    run_dir = tmp_path / "run"
    (run_dir / "iter1" / "score").mkdir(parents=True)
    (run_dir / "iter1" / "score" / "scored").symlink_to(reference / "iter1" / "score" / "scored")
    proc = _run(_command(demo_data, run_dir, "stages=[pairs, sft_prm]",
                         f"train.sft_prm.overrides.data.max_length={max_length}"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"[pairs] SFT-PRM {len(examples) - too_long}," in proc.stdout
    assert f"refused by training (in pairs/rejects.jsonl): SFT-PRM {too_long}" in proc.stdout
    rejects = [json.loads(line) for line in (run_dir / "iter1" / "pairs" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == too_long and {r["output"] for r in rejects} == {"sft.jsonl"}
    assert all(r["category"] == "too long for training" for r in rejects)
    assert all(f"sequence of {max(lengths)} tokens is longer than data.max_length={max_length}" in r["reason"]
               for r in rejects)
    report = json.loads((run_dir / "report.json").read_text())["iterations"]["1"]
    assert report["pairs"]["untrainable"] == {"sft": too_long, "dpo": 0, "step": 0}
    assert report["train"]["sft_prm"]["step"] == 3
