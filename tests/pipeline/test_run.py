"""``sppd-megatron run`` end to end on toy settings: stages, manifests, skip, refuse.

The run is the session's ``pipeline_reference`` (tests/conftest.py); tests/faults/test_kill_resume.py
kills copies of it at every fault point and resumes them to the same result.
"""

from __future__ import annotations

import json

from pipeline_run import command, final_metrics, run


def test_run_writes_every_stage_with_manifest_and_report(pipeline_reference, demo_data):
    for stage in ("sample", "score", "pairs", "sft_prm", "dpo_prm", "step_dpo", "eval/base", "eval/step_dpo"):
        manifest = json.loads((pipeline_reference / "iter1" / stage / "manifest.json").read_text())
        assert manifest["status"] == "done", stage
        assert manifest["code_version"] and manifest["outputs"]
    train = json.loads((pipeline_reference / "iter1" / "dpo_prm" / "manifest.json").read_text())
    # chained: DPO-PRM starts from SFT-PRM's final Megatron checkpoint, and was exported to HF
    assert "sft_prm/train/checkpoints/iter_0000003" in train["config"]["init"]["path"]
    assert (pipeline_reference / "iter1" / "dpo_prm" / "hf" / "config.json").is_file()
    stats = json.loads((pipeline_reference / "iter1" / "pairs" / "pairs_stats.json").read_text())
    assert stats["step"]["pairs"] > 0 and stats["dpo"]["pairs"] > 0, "the fitted policy should give pairs"
    metrics = final_metrics(pipeline_reference)
    assert set(metrics["train"]) == {"sft_prm", "dpo_prm", "step_dpo"}
    assert all(m["step"] == 3 for m in metrics["train"].values())
    for model in ("base", "sft_prm", "dpo_prm", "step_dpo"):
        result = metrics["eval"][model]["results"]["fitted"]
        assert result["greedy"]["n"] == 6 and result["maj@2"]["n"] == 6
    assert "| Base |" in (pipeline_reference / "report.md").read_text()


def test_rerun_skips_finished_stages_and_refuses_a_changed_config(pipeline_reference, demo_data):
    before = (pipeline_reference / "iter1" / "step_dpo" / "manifest.json").read_text()
    proc = run(command(demo_data, pipeline_reference))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped") >= 10 and "running in" not in proc.stdout
    assert (pipeline_reference / "iter1" / "step_dpo" / "manifest.json").read_text() == before
    proc = run(command(demo_data, pipeline_reference, "sample.K=5"))
    assert proc.returncode == 2
    assert "refusing to mix outputs" in proc.stderr and "config.K: 4 -> 5" in proc.stderr


def test_pairs_too_long_for_training_go_to_rejects_and_the_run_goes_on(pipeline_reference, demo_data, tmp_path):
    """The reference's scored trees, with SFT-PRM's data.max_length one token short of its longest
    examples: those land in pairs/rejects.jsonl with the reason, and SFT-PRM trains on the rest."""
    from sppd_megatron.records import SFTExample, read_jsonl
    from sppd_megatron.tokenization import load_tokenizer
    from sppd_megatron.training.data import build_example

    tokenizer = load_tokenizer(demo_data["policy"])
    examples = list(read_jsonl(pipeline_reference / "iter1" / "pairs" / "sft.jsonl", SFTExample))
    lengths = [len(build_example(e, tokenizer, 10_000).rows[0].ids) for e in examples]
    max_length = max(lengths) - 1
    too_long = sum(n > max_length for n in lengths)
    assert 0 < too_long < len(examples), lengths
    run_dir = tmp_path / "run"
    (run_dir / "iter1" / "score").mkdir(parents=True)
    (run_dir / "iter1" / "score" / "scored").symlink_to(pipeline_reference / "iter1" / "score" / "scored")
    proc = run(command(demo_data, run_dir, "stages=[pairs, sft_prm]",
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
