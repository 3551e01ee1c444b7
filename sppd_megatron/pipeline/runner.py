"""The self-training loop, read top to bottom (SPPD section 4: stage 1, then re-sampling for stage 2).

    policy -> sample trees -> score -> pairs -> SFT-PRM -> DPO-PRM -> step-DPO (+ margin ablation)
           -> evaluate -> next iteration's policy

and the optional branches beside the chain: the learned process reward (``prm``: a value head trained
on the scored trees, ``prm_score``: the trees scored by it, ``prm_pairs``: pairs from its values,
``step_dpo_prm``: step-DPO on them from the DPO-PRM checkpoint, with the margin ablation) and SVPO
(``svpo``: on the pairs stage's SVPO pairs, from SFT-PRM). ``sample.algorithm: mcts`` runs the same
loop on MCTS trees (``pairs.value_name: mcts_q``).

Each arrow is a stage with a manifest in ``run_dir/iter<k>/<stage>/`` (see :mod:`.manifest`): a
re-run skips finished stages, resumes an interrupted one and refuses a changed config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from sppd_megatron import faults
from sppd_megatron.config import config_to_dict
from sppd_megatron.locking import locked
from sppd_megatron.pipeline.config import TRAIN_STAGES, RunConfig
from sppd_megatron.pipeline.report import pairs_counts, print_table, results, write_report
from sppd_megatron.pipeline.stages import (
    StageFailed,
    eval_stage,
    pairs_stage,
    prepare_policy,
    prm_score_stage,
    sample_stage,
    score_stage,
    train_stage,
)

CHAIN = ("sft_prm", "dpo_prm", "step_dpo")
"""The training stages each starting from the previous one; the next iteration starts from the last."""

RUN_CONFIG_FILE = "run_config.json"


def _last_metrics(outputs: dict[str, str]) -> dict | None:
    path = outputs.get("metrics")
    if not path or not Path(path).is_file():
        return None
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def _pairs_counts(outputs: dict[str, str]) -> dict | None:
    path = outputs.get("stats")
    return pairs_counts(json.loads(Path(path).read_text())) if path and Path(path).is_file() else None


def _calibration(summary: Path) -> dict | None:
    return json.loads(summary.read_text()).get("calibration") if summary.is_file() else None


def run_iteration(cfg: RunConfig, it: int, policy_hf: str, log: Callable[[str], None]) -> dict:
    """One pass of the loop from ``policy_hf``; returns the models, their evals and training metrics."""
    it_dir = Path(cfg.run_dir) / f"iter{it}"
    stages = cfg.stages
    trees = str(it_dir / "sample" / "trees")
    scored = str(it_dir / "score" / "scored")
    pairs = {kind: str(it_dir / "pairs" / name) for kind, name in
             (("sft", "sft.jsonl"), ("dpo", "dpo.jsonl"), ("step", "step_pairs.jsonl"), ("svpo", "svpo_pairs.jsonl"))}
    prm_scored = str(it_dir / "prm_score" / "scored")
    if "sample" in stages:
        trees = sample_stage(cfg, it_dir / "sample", policy_hf, log)
    if "score" in stages:
        scored = score_stage(cfg, it_dir / "score", trees, policy_hf, log)
    if "pairs" in stages:
        pairs.update(pairs_stage(cfg, it_dir / "pairs", scored, policy_hf, log))

    models: dict[str, dict[str, str]] = {"base": {"hf": policy_hf}}
    current: dict[str, str] = {"hf": policy_hf}

    def step_dpo(name: str, init: dict[str, str], data: str) -> dict[str, str]:
        for mode in cfg.train.margin_ablation:  # the margin ablation, from the same checkpoint
            label = f"{name}_{mode}"
            models[label] = train_stage(cfg, name, it_dir / label, init, data, log, margin_mode=mode, label=label)
        return train_stage(cfg, name, it_dir / name, init, data, log)

    for name in CHAIN:
        if name in stages:
            data = pairs[TRAIN_STAGES[name][1]]
            current = step_dpo(name, current, data) if name == "step_dpo" else train_stage(
                cfg, name, it_dir / name, current, data, log)
            models[name] = current
    prm_pairs: dict[str, str] = {}
    if "prm" in stages:
        models["prm"] = train_stage(cfg, "prm", it_dir / "prm", {"hf": policy_hf}, scored, log)
    if "prm_score" in stages:
        if "checkpoint" not in models["prm"]:
            raise StageFailed(f"{scored}: no scored trees to train the learned process reward on (stage prm)")
        prm_scored = prm_score_stage(cfg, it_dir / "prm_score", scored, str(models["prm"]["checkpoint"]), log)
    if "prm_pairs" in stages:
        prm_pairs = pairs_stage(cfg, it_dir / "prm_pairs", prm_scored, policy_hf, log, value_name="value_head",
                                label="prm_pairs")
    if "step_dpo_prm" in stages:
        models["step_dpo_prm"] = step_dpo("step_dpo_prm", models["dpo_prm"], prm_pairs["step"])
    if "svpo" in stages:
        models["svpo"] = train_stage(cfg, "svpo", it_dir / "svpo", models.get("sft_prm", {"hf": policy_hf}),
                                     pairs["svpo"], log)

    evals: dict[str, dict] = {}
    if "eval" in stages:
        for model in cfg.eval.models:
            if model in models:
                guide = cfg.eval.value_heads.get(model)
                value_model = str(models[guide]["checkpoint"]) if guide else None
                evals[model] = eval_stage(cfg, it_dir / "eval" / model, model, models[model]["hf"], log, value_model)
    return {
        "policy": policy_hf,
        "pairs": _pairs_counts(pairs),
        "prm_pairs": _pairs_counts(prm_pairs),
        "models": {m: out.get("hf") for m, out in models.items()},
        "train": {m: _last_metrics(out) for m, out in models.items() if m != "base"},
        "prm_calibration": _calibration(it_dir / "prm_score" / "scored" / "score_summary.json"),
        "eval": evals,
        "final": current,
    }


def next_policy(cfg: RunConfig, result: dict) -> str:
    """The policy the next iteration samples with (``last`` trained stage, or ``best`` evaluated model)."""
    if cfg.next_policy == "last" or not result["eval"]:
        return result["final"]["hf"]
    bench = next(iter(cfg.eval.benchmarks))
    mode = cfg.eval.modes[0]
    # Ties go to the later (more trained) model; the ablation runs and side branches are not candidates.
    chain = [m for m in ["base", *CHAIN] if m in result["eval"]]
    best = max(reversed(chain), key=lambda m: results(result["eval"][m])[bench][mode]["accuracy"])
    return result["models"][best]


def _log_tensorboard(cfg: RunConfig, it: int, evals: dict[str, dict]) -> None:
    if not cfg.tensorboard or not evals:
        return
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(Path(cfg.run_dir) / "tensorboard"))
    for model, summary in evals.items():
        for bench, modes in results(summary).items():
            for mode, r in modes.items():
                writer.add_scalar(f"eval/{bench}/{mode}/{model}", r["accuracy"], it)
    writer.close()


def run_pipeline(cfg: RunConfig, log: Callable[[str], None] = print, title: str = "sppd-megatron run",
                 notes: list[str] | None = None) -> dict:
    """Run every iteration of ``cfg`` (skipping finished stages); writes and returns the report.

    The run directory is locked for the whole run: a second run on it refuses to start.
    """
    with locked(cfg.run_dir):
        return _run_locked(cfg, log, title, notes)


def _run_locked(cfg: RunConfig, log: Callable[[str], None], title: str, notes: list[str] | None) -> dict:
    run_dir = Path(cfg.run_dir)
    (run_dir / RUN_CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=2, sort_keys=True) + "\n")
    policy = prepare_policy(cfg, log)
    report: dict = {"run_dir": str(run_dir), "config": config_to_dict(cfg), "iterations": {}}
    for it in range(1, cfg.iterations + 1):
        result = run_iteration(cfg, it, policy, log)
        report["iterations"][str(it)] = {k: v for k, v in result.items() if k != "final"}
        _log_tensorboard(cfg, it, result["eval"])
        if result["eval"]:
            print_table(result["eval"], f"{title}: iteration {it}, accuracy % (correct/n)")
        policy = next_policy(cfg, result)
    report["final_policy"] = policy
    faults.hit("report.write", run_dir / "report.json")
    json_path, md_path = write_report(run_dir, report, title, notes)
    log(f"report: {md_path} and {json_path.name}")
    return report
