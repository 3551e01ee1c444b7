"""A full disk or an unwritable file in the middle of every stage's writes: one line naming the path,
what was finished stays readable, and the same command finishes the job once the disk is back, with
the bytes of an uninterrupted run. In-process (each verb's ``main``), on the fitted tiny policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faultlib import clean_error, tree_digest
from sppd_megatron import faults
from sppd_megatron.records import PreferencePair, SFTExample, Tree, read_jsonl

ROOT = Path(__file__).resolve().parents[2]
# The fitted policy's prompt format (tests/conftest.py), as overrides (JSON values are YAML).
TEMPLATE = ["template.use_chat_template=false", "template.system_prompt=",
            f"template.plain_format={json.dumps('Q: {question}' + chr(10) + 'A: ')}"]


def _sample_args(demo_data, out: Path) -> list[str]:
    return [str(ROOT / "configs/tiny-cpu/sample.yaml"), f"input={demo_data['prompts']}", f"output_dir={out}",
            f"model={demo_data['policy']}", "K=4", "max_depth=6", "max_step_tokens=40", "max_total_tokens=120",
            "questions_per_round=2", "shard_size=4", "num_questions=6", "progress=false", *TEMPLATE]


def _check_then_resume(main, argv, fault, out: Path, reference: Path, pattern: str, needles, capsys, arm, tally,
                       stage: str) -> None:
    """``main(argv)`` under ``fault`` ends in one line naming the path; without it, it finishes like ``reference``."""
    point, _, action = fault.split(":")
    arm(fault)
    assert main(argv) == 2
    clean_error(capsys.readouterr().err, f"sppd-megatron {stage.split('[')[0]}", *needles)
    tally.fault(stage, f"{point} ({action})", "clean error")
    arm(None)
    assert main(argv) == 0
    capsys.readouterr()
    assert tree_digest(out, pattern) == tree_digest(reference, pattern)
    tally.fault(stage, f"{point} ({action})", "recovered")


@pytest.fixture(scope="module")
def reference_dirs(demo_data, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted sample -> score -> pairs -> eval of the fitted policy."""
    from sppd_megatron.evaluation.cli import main as evaluate
    from sppd_megatron.pairs.cli import main as pairs
    from sppd_megatron.sampling.cli import main as sample
    from sppd_megatron.scoring.cli import main as score

    root = tmp_path_factory.mktemp("disk-reference")
    dirs = {k: root / k for k in ("trees", "scored", "pairs", "eval")}
    assert sample(_sample_args(demo_data, dirs["trees"])) == 0
    assert score(_score_args(dirs["trees"], dirs["scored"])) == 0
    assert pairs(_pairs_args(dirs["scored"], dirs["pairs"])) == 0
    assert evaluate(_eval_args(demo_data, dirs["eval"])) == 0
    return dirs


def _score_args(trees: Path, out: Path) -> list[str]:
    return [str(ROOT / "configs/tiny-cpu/score.yaml"), f"input_dir={trees}", f"output_dir={out}", "scorers=[tree]",
            "trees_per_batch=2", "progress=false"]


def _pairs_args(scored: Path, out: Path) -> list[str]:
    return [str(ROOT / "configs/tiny-cpu/pairs.yaml"), f"input_dir={scored}", f"output_dir={out}", "step.threshold=0.3",
            "progress=false"]


def _eval_args(demo_data, out: Path) -> list[str]:
    return ["--model", str(demo_data["policy"]), "--bench", f"fitted={demo_data['prompts']}", "--modes", "greedy,maj@2",
            "--max-new-tokens", "60", "--out", str(out), "--no-progress", "questions_per_batch=2", *TEMPLATE]


def test_sample_score_pairs_eval_under_a_full_disk_and_unwritable_files(reference_dirs, demo_data, tmp_path, capsys,
                                                                         arm, tally):
    from sppd_megatron.evaluation.cli import main as evaluate
    from sppd_megatron.pairs.cli import main as pairs
    from sppd_megatron.sampling.cli import main as sample
    from sppd_megatron.scoring.cli import main as score

    ref = reference_dirs
    trees, scored, built, evald = (tmp_path / k for k in ("trees", "scored", "pairs", "eval"))
    # sample: the 3rd tree cannot be written; the two before it stay, whole and valid.
    arm("sample.tree:3:enospc")
    assert sample(_sample_args(demo_data, trees)) == 2
    clean_error(capsys.readouterr().err, "sppd-megatron sample", str(trees / "trees-00000.jsonl"),
                "No space left on device", "run the same command again to resume")
    assert len(list(read_jsonl(trees / "trees-00000.jsonl", Tree))) == 2
    tally.fault("sample", "sample.tree (enospc)", "clean error")
    arm(None)
    assert sample(_sample_args(demo_data, trees)) == 0
    assert tree_digest(trees, "trees-*.jsonl") == tree_digest(ref["trees"], "trees-*.jsonl")
    tally.fault("sample", "sample.tree (enospc)", "recovered")
    capsys.readouterr()

    _check_then_resume(score, _score_args(trees, scored), "score.tree:4:eacces", scored, ref["scored"], "trees-*.jsonl",
                       [str(scored / "trees-00000.jsonl"), "Permission denied"], capsys, arm, tally, "score[tree]")
    # pairs: sft.jsonl is written, then the disk fills up at dpo.jsonl; sft.jsonl stays readable.
    arm("pairs.write:2:enospc")
    assert pairs(_pairs_args(scored, built)) == 2
    clean_error(capsys.readouterr().err, "sppd-megatron pairs", str(built / "dpo.jsonl"), "No space left on device")
    assert list(read_jsonl(built / "sft.jsonl", SFTExample)) and not (built / "dpo.jsonl").exists()
    tally.fault("pairs", "pairs.write (enospc)", "clean error")
    arm(None)
    assert pairs(_pairs_args(scored, built)) == 0
    capsys.readouterr()
    for name in ("sft.jsonl", "dpo.jsonl", "step_pairs.jsonl", "svpo_pairs.jsonl"):
        assert (built / name).read_bytes() == (ref["pairs"] / name).read_bytes(), name
    assert list(read_jsonl(built / "step_pairs.jsonl", PreferencePair))
    tally.fault("pairs", "pairs.write (enospc)", "recovered")

    _check_then_resume(evaluate, _eval_args(demo_data, evald), "eval.question:3:enospc", evald, ref["eval"],
                       "*.json*", [str(evald / "predictions.jsonl"), "No space left on device"], capsys, arm, tally,
                       "eval")
    assert json.loads((evald / "summary.json").read_text())["results"]


def test_export_under_a_full_disk(demo_data, tmp_path, capsys, arm, tally):
    """``convert`` in both directions: a safetensors shard that cannot be written, then the same command."""
    from sppd_megatron.conversion.cli import main as convert

    ckpt = tmp_path / "ckpt"
    assert convert(["hf-to-mcore", "--hf", str(demo_data["policy"]), "--out", str(ckpt)]) == 0
    reference, out = tmp_path / "reference", tmp_path / "export"
    args = ["mcore-to-hf", "--ckpt", str(ckpt), "--max-shard-size", "40KB", "--overwrite"]
    assert convert([*args, "--out", str(reference)]) == 0
    assert len(list(reference.glob("model-*.safetensors"))) > 2
    capsys.readouterr()
    arm("export.shard:2:enospc")
    assert convert([*args, "--out", str(out)]) == 2
    clean_error(capsys.readouterr().err, "sppd-megatron convert", str(out / ".shard-00001.safetensors.tmp"),
                "No space left on device")
    tally.fault("export", "export.shard (enospc)", "clean error")
    arm(None)
    assert convert([*args, "--out", str(out)]) == 0
    assert tree_digest(out, "*.safetensors") == tree_digest(reference, "*.safetensors")
    tally.fault("export", "export.shard (enospc)", "recovered")


def test_hf_prm_scoring_killed_resumes_to_the_same_trees(reference_dirs, tmp_path, capsys, tally):
    """``score`` with a (tiny, value-head) HF PRM, SIGKILLed before its 3rd scored tree, run again."""
    import os
    import signal
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    from sppd_megatron.models.tiny import save_tiny_hf_checkpoint
    from sppd_megatron.scoring.cli import main as score

    prm = save_tiny_hf_checkpoint(tmp_path / "prm", family="llama", seed=2)
    torch.manual_seed(0)
    save_file({"v_head.summary.weight": torch.randn(1, 64) * 0.1}, str(Path(prm) / "value_head.safetensors"))

    def args(out: Path) -> list[str]:
        return [*_score_args(reference_dirs["trees"], out), "scorers=[tree, hf]", f"hf.path={prm}", "hf.device=cpu"]

    assert score(args(tmp_path / "reference")) == 0
    out = tmp_path / "scored"
    proc = subprocess.run([sys.executable, "-m", "sppd_megatron", "score", *args(out)], cwd=ROOT,
                          env={**os.environ, faults.ENV: "score.tree:3", "PYTHONWARNINGS": "ignore"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert len(list(read_jsonl(out / "trees-00000.jsonl", Tree))) == 2
    assert score(args(out)) == 0
    capsys.readouterr()
    assert tree_digest(out, "trees-*.jsonl") == tree_digest(tmp_path / "reference", "trees-*.jsonl")
    assert all("hf" in n.values for t in read_jsonl(out / "trees-00000.jsonl", Tree) for n in t.nodes[1:])
    tally.fault("score[hf]", "score.tree", "recovered")
