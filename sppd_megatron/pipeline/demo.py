"""``sppd-megatron demo [--quick] [--out DIR]``: the embedded default, on a CPU, with nothing downloaded.

1. data:     generated arithmetic word problems with numbered steps (:mod:`.problems`): a pretraining
             set and SPPD prompts (2-3 steps), held-out problems (2-3 steps, unseen) and harder
             out-of-distribution ones (4-5 steps).
2. pretrain: a tiny Llama-style model trained from scratch by the ordinary ``train`` SFT stage
             (``configs/demo/pretrain.yaml``), briefly, so it solves some problems and makes step errors.
3. SPPD:     ``sppd-megatron run configs/demo/run.yaml`` from that model: tree sampling, tree-value
             process reward (no other model), SFT-PRM -> DPO-PRM -> step-DPO with the dynamic margin,
             the margin ablation (none / fixed) from the same DPO-PRM checkpoint, and greedy + MAJ@N
             evaluation of every model on held-out and OOD problems.

Prints the paper-shaped table and writes ``report.md`` / ``report.json`` in the run directory.
Every step is a stage with a manifest, so running the demo again skips what is done.

``--with-svpo`` adds, beside the same loop (whose stages it shares, so it can run on a finished
demo's directory): the learned process reward (a value head trained on the trees' values, the trees
scored by it, step-DPO and its margin ablation on its pairs), SVPO on MCTS trees (the run's
``sample.algorithm: mcts`` switch, in ``OUT/mcts``) with greedy, MAJ@N and step-level beam search
guided by its own value head, the learned PRM's calibration against Monte-Carlo labels on trees of
held-out problems, and the precision of every process reward's step pairs by an arithmetic step
checker (:mod:`.step_checker`, a measuring instrument only).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "demo"


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is; ``default`` is tuned for < 30 min on 2 cores, ``quick`` for ~6 min (the tests)."""

    pretrain_problems: int
    """Distinct 2-3 step problems the base model is trained on."""
    pretrain_steps: int
    """Optimizer steps of base-model training (batch 32): short on purpose, the base must be imperfect."""
    prompts: int
    """Questions the SPPD loop samples trees for (disjoint from pretraining and evaluation)."""
    heldout: int
    """In-distribution (2-3 step) evaluation problems."""
    ood: int
    """Out-of-distribution (4-5 step) evaluation problems."""
    K: int
    """Tree-sampling iterations per question (C=2 children each)."""
    maj_n: int
    """N of the MAJ@N column."""
    misconception_rate: float = 0.0
    """Share of the pretraining corpus's "triples" steps written as doublings (see :mod:`.problems`):
    the base model's systematic step error, which SPPD has to find from gold answers alone."""
    train_batch: int | None = None
    """Global (and micro) batch of the SPPD training stages; None keeps the recipes' (16)."""
    calibration_questions: int = 64
    """``--with-svpo``: held-out problems whose trees (K=8) get Monte-Carlo labels to judge the learned PRM."""
    mc_rollouts: int = 8
    """``--with-svpo``: rollouts per state of those labels."""


PRESETS = {
    "default": DemoSize(pretrain_problems=4000, pretrain_steps=600, prompts=1024, heldout=200, ood=200, K=16, maj_n=5,
                        misconception_rate=0.65),
    # Pretrained long enough to solve some prompts (a sixth of held-out problems), so that every pairs
    # dataset gets records and, at batch 4, every training stage takes several optimizer steps.
    "quick": DemoSize(pretrain_problems=1000, pretrain_steps=300, prompts=64, heldout=24, ood=24, K=8, maj_n=3,
                      misconception_rate=0.65, train_batch=4, calibration_questions=8, mc_rollouts=4),
}
DATA_SEED = 0
"""Default seed of the generated problems (``--data-seed``); training and sampling seeds live in the recipes."""
_SPLIT_TITLE = ("Held-out greedy, split by the corpus's misconception (problems with a 'triples' step "
                "vs the rest)")


def _config_file(name: str) -> Path:
    path = CONFIG_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the demo's recipes live in the source tree's configs/demo/ "
                                "(install with `pip install -e .` or run from a checkout)")
    return path


def data_stage(out: Path, size: DemoSize, template, log, seed: int = DATA_SEED) -> dict[str, str]:
    """Write the demo's problem sets (a stage: skipped when already made with the same sizes)."""
    from sppd_megatron.pipeline.manifest import run_stage
    from sppd_megatron.pipeline.problems import make_split
    from sppd_megatron.records import SFTExample, write_jsonl
    from sppd_megatron.sampling.prompts import render_prompt
    from sppd_megatron.tokenization import build_char_tokenizer

    stage_dir = out / "data"
    sizes = {k: v for k, v in asdict(size).items() if k in ("pretrain_problems", "prompts", "heldout", "ood",
                                                           "misconception_rate")}

    def body() -> dict:
        tokenizer = build_char_tokenizer()
        pretrain = make_split(seed, "pretrain", size.pretrain_problems, 2, 3,
                              misconception_rate=size.misconception_rate)
        taken = {p.question for p in pretrain}
        prompts = make_split(seed, "prompt", size.prompts, 2, 3, exclude=taken)
        taken |= {p.question for p in prompts}
        heldout = make_split(seed, "heldout", size.heldout, 2, 3, exclude=taken)
        ood = make_split(seed, "ood", size.ood, 4, 5)
        examples = [SFTExample(prompt=render_prompt(template, tokenizer, p.question)[0], response=p.solution,
                               question_id=p.id) for p in pretrain]
        files = {"pretrain": stage_dir / "pretrain_sft.jsonl", "prompts": stage_dir / "prompts.jsonl",
                 "heldout": stage_dir / "heldout.jsonl", "ood": stage_dir / "ood.jsonl"}
        write_jsonl(files["pretrain"], examples)
        for name, problems in (("prompts", prompts), ("heldout", heldout), ("ood", ood)):
            write_jsonl(files[name], [p.to_prompt(f"demo-{name}") for p in problems])
        log(f"[data] {len(pretrain)} pretraining problems, {len(prompts)} prompts, "
            f"{len(heldout)} held-out, {len(ood)} OOD")
        return files

    config = {"seed": seed, "sizes": sizes, "template": asdict(template)}
    return run_stage(stage_dir, "data", config, {}, body, log)


def pretrain_stage(out: Path, size: DemoSize, train_file: str, progress: bool, threads: int, log) -> dict[str, str]:
    """Train the base model from scratch with the ``train`` SFT stage; returns its checkpoint and HF export."""
    from sppd_megatron.config import config_from_dict, config_to_dict
    from sppd_megatron.pipeline.stages import train_and_export
    from sppd_megatron.training.config import TrainConfig

    recipe = _config_file("pretrain.yaml")
    data = yaml.safe_load(recipe.read_text())
    data["output_dir"] = str(out / "pretrain" / "train")
    data["data"]["train_file"] = str(train_file)
    data["schedule"]["train_steps"] = size.pretrain_steps
    data["checkpoint"]["save_interval"] = min(data["checkpoint"].get("save_interval", 0), size.pretrain_steps)
    data.setdefault("logging", {})["progress"] = progress
    train_cfg = config_to_dict(config_from_dict(TrainConfig, data, str(recipe)))
    return train_and_export(out / "pretrain", "pretrain", train_cfg, {}, log, threads=threads, progress=progress)


def run_overrides(out: Path, size: DemoSize, files: dict[str, str], policy_hf: str, threads: int) -> list[str]:
    """configs/demo/run.yaml pointed at this demo's directory, data and base model."""
    return [
        f"run_dir={out}", f"policy={policy_hf}", f"prompts.path={files['prompts']}",
        f"eval.benchmarks.heldout.path={files['heldout']}", f"eval.benchmarks.ood.path={files['ood']}",
        f"sample.K={size.K}", f"eval.modes=[greedy, 'maj@{size.maj_n}']", f"train.threads={threads}",
        *(f"train.{stage}.config={_config_file(stage + '.yaml')}" for stage in ("sft_prm", "dpo_prm", "step_dpo")),
        *(f"train.{stage}.overrides.schedule.{key}={size.train_batch}" for stage in ("sft_prm", "dpo_prm", "step_dpo")
          for key in ("global_batch_size", "micro_batch_size") if size.train_batch),
    ]


SVPO_STAGES = ["sample", "score", "pairs", "sft_prm", "dpo_prm", "step_dpo", "prm", "prm_score", "prm_pairs",
               "step_dpo_prm", "eval"]
LEARNED_PRM_MODELS = ["step_dpo_prm", "step_dpo_prm_none", "step_dpo_prm_fixed"]


def svpo_overrides(size: DemoSize) -> list[str]:
    """``--with-svpo``, the main run: the learned process reward and step-DPO on its pairs (the recipes'
    batches, ``size.train_batch`` included, as the default demo's)."""
    return [
        f"stages=[{', '.join(SVPO_STAGES)}]", f"train.prm.config={_config_file('prm.yaml')}",
        # A value head scores siblings close together (its gaps are rarely above 0.2 where the tree
        # value jumps 0 -> 1), so its pairs take a smaller gap; on a CPU, dense attention costs the
        # square of a bin's length: short bins.
        "prm_pairs={step: {threshold: 0.1}}", "prm_score={value_head: {pack_length: 512}, trees_per_batch: 64}",
        "eval.models=[base, sft_prm, dpo_prm, step_dpo, step_dpo_none, step_dpo_fixed, "
        + ", ".join(LEARNED_PRM_MODELS) + "]",
    ]


def mcts_overrides(out: Path, size: DemoSize) -> list[str]:
    """``--with-svpo``, the MCTS run (in ``out/mcts``): SVPO on the pairs of MCTS trees, evaluated with
    greedy, MAJ@N and step-level beam search guided by its own value head."""
    return [
        f"run_dir={out / 'mcts'}", "sample.algorithm=mcts", "sample.mcts={max_trees: 1}",
        "pairs={value_name: mcts_q, step: {threshold: 0.5}, svpo: {enabled: true, max_pairs_per_question: 4}}",
        "stages=[sample, score, pairs, svpo, eval]", "train.margin_ablation=[]",
        f"train.svpo.config={_config_file('svpo.yaml')}",
        *(f"train.svpo.overrides.schedule.{key}={size.train_batch}" for key in ("global_batch_size", "micro_batch_size")
          if size.train_batch),
        "eval.models=[svpo]", "eval.value_heads={svpo: svpo}", "eval.sbs_modes=['sbs@3']", "eval.sbs_expansions=2",
        "prm_score={value_head: {pack_length: 512}}",
    ]


SPLIT_HEADER = ["model", 'problems with a "triples" step', "the other problems"]


def misconception_breakdown(run_dir: Path, models: list[str], benchmark: str = "heldout",
                            eval_dirs: dict[str, Path] | None = None) -> list[list[str]]:
    """Greedy accuracy per model on the ``benchmark`` problems with and without a "triples" step,
    as table rows under :data:`SPLIT_HEADER` (``["Base", "4/64", "61/136"]``).

    The pretraining corpus's misconception is about "triples" steps only, so this split shows where
    each stage's change comes from. Read from the last iteration's eval predictions (``eval_dirs``:
    models evaluated elsewhere, e.g. by the MCTS run).
    """
    from sppd_megatron.pipeline.report import row_label
    from sppd_megatron.records import Prediction, read_jsonl

    iters = sorted(run_dir.glob("iter*/eval"), key=lambda p: int(p.parent.name[4:]))
    if not iters:
        return []
    rows = []
    for model in models:
        path = (eval_dirs or {}).get(model, iters[-1] / model) / "predictions.jsonl"
        if not path.is_file():
            continue
        counts = {True: [0, 0], False: [0, 0]}
        for pred in read_jsonl(path, Prediction):
            if pred.benchmark == benchmark and pred.greedy_correct is not None:
                c = counts["triples" in pred.question]
                c[0] += int(pred.greedy_correct)
                c[1] += 1
        rows.append([row_label(model), "{}/{}".format(*counts[True]), "{}/{}".format(*counts[False])])
    return rows


def calibration_overrides(stage_dir: Path, size: DemoSize, heldout: str, base_hf: str, progress: bool) -> list[str]:
    """configs/demo/run.yaml as the sampler of the calibration trees: K=8 on the first held-out problems."""
    return [f"run_dir={stage_dir}", f"policy={base_hf}", f"prompts.path={heldout}",
            f"prompts.limit={size.calibration_questions}", "sample.K=8", "stages=[sample]", "train.margin_ablation=[]",
            f"progress={progress}"]


def calibration_stage(out: Path, size: DemoSize, heldout: str, base_hf: str, prm_checkpoint: str, threads: int,
                      progress: bool, log) -> Path:
    """Trees of held-out problems (K=8) scored by the tree value, Monte-Carlo rollouts and the learned
    PRM (``score`` in a child: the value head is a Megatron model); returns the scored directory, whose
    ``score_summary.json`` holds each value's Brier score and AUC against the Monte-Carlo labels."""
    from sppd_megatron.config import config_from_dict, config_to_dict
    from sppd_megatron.pipeline.config import load_run_config
    from sppd_megatron.pipeline.manifest import run_stage
    from sppd_megatron.pipeline.stages import run_child, sample_stage
    from sppd_megatron.scoring.cli import ScoreConfig

    stage_dir = out / "prm_heldout"
    cfg = load_run_config(_config_file("run.yaml"), calibration_overrides(stage_dir, size, heldout, base_hf, progress))
    trees = sample_stage(cfg, stage_dir / "sample", base_hf, log)
    engine = config_to_dict(cfg.sample_config(base_hf, "<out>").engine)
    score_cfg = config_from_dict(ScoreConfig, {
        "input_dir": str(trees), "output_dir": str(stage_dir / "score" / "scored"), "scorers": ["tree", "mc", "value_head"],
        "mc": {"model": base_hf, "engine": engine, "rollouts": {"num_rollouts": size.mc_rollouts, "max_new_tokens": 160}},
        "value_head": {"path": str(prm_checkpoint), "pack_length": 512}, "calibration_label": "mc",
        "trees_per_batch": 16, "progress": progress}, "demo, held-out calibration")

    def body() -> dict:
        (stage_dir / "score").mkdir(parents=True, exist_ok=True)
        recipe = stage_dir / "score" / "score.yaml"
        recipe.write_text(yaml.safe_dump(config_to_dict(score_cfg), sort_keys=False))
        run_child(["score", str(recipe)], stage_dir / "score" / "score.log", threads)
        log(f"[prm_heldout] {size.calibration_questions} held-out trees scored by tree value, Monte-Carlo "
            f"({size.mc_rollouts} rollouts) and the learned PRM")
        return {"scored": stage_dir / "score" / "scored"}

    return Path(run_stage(stage_dir / "score", "prm_heldout", config_to_dict(score_cfg),
                          {"trees": trees, "checkpoint": prm_checkpoint}, body, log)["scored"])


PRECISION_HEADER = ["process reward (step pairs of)", "pairs", "right over wrong", "wrong over right", "both wrong",
                    "both right", "not checked", "precision %"]
CALIBRATION_HEADER = ["process reward", "Brier vs MC", "AUC vs MC", "step pairs", "right over wrong",
                      "wrong over right", "precision %"]


def _precision_row(label: str, pairs) -> list[str]:
    from sppd_megatron.pipeline.step_checker import PAIR_CLASSES, pair_precision

    p = pair_precision(pairs)
    share = "-" if p["precision"] is None else f"{100 * p['precision']:.1f}"
    return [label, str(p["pairs"]), *(str(p[c]) for c in PAIR_CLASSES), share]


def precision_rows(out: Path) -> list[list[str]]:
    """The step-checker precision of the pairs each process reward gave the training stages."""
    from sppd_megatron.records import PreferencePair, read_jsonl

    sources = [("tree value: D_step of step-DPO", out / "iter1" / "pairs" / "step_pairs.jsonl"),
               ("learned value head: D_step of step-DPO, learned PRM", out / "iter1" / "prm_pairs" / "step_pairs.jsonl"),
               ("MCTS Q: D_step", out / "mcts" / "iter1" / "pairs" / "step_pairs.jsonl"),
               ("MCTS Q: SVPO's pairs (all types)", out / "mcts" / "iter1" / "pairs" / "svpo_pairs.jsonl")]
    return [_precision_row(label, read_jsonl(path, PreferencePair)) for label, path in sources if path.is_file()]


def calibration_rows(scored: Path, learned_threshold: float) -> list[list[str]]:
    """Per value of the held-out trees: Brier and AUC against the Monte-Carlo labels, and the precision
    of the D_step pairs it builds on those same trees."""
    from sppd_megatron.pairs.builders import step_pairs
    from sppd_megatron.pipeline.step_checker import pair_precision
    from sppd_megatron.records import Tree, read_jsonl
    from sppd_megatron.scoring.cli import input_shards

    calibration = json.loads((scored / "score_summary.json").read_text())["calibration"]["values"]
    trees = [t for shard in input_shards(scored) for t in read_jsonl(shard, Tree)]
    rows = []
    for name, label in (("tree", "tree value"), ("mc", "Monte-Carlo (the labels)"), ("value_head", "learned value head")):
        threshold = learned_threshold if name == "value_head" else 0.5
        p = pair_precision(pair for t in trees for pair in step_pairs(t, name, threshold))
        c = calibration.get(name, {})
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        rows.append([label, fmt(c.get("brier")), fmt(c.get("auc")), f"{p['pairs']} (gap > {threshold})",
                     str(p["right over wrong"]), str(p["wrong over right"]),
                     "-" if p["precision"] is None else f"{100 * p['precision']:.1f}"])
    return rows


def run_demo(out: Path, size: DemoSize, progress: bool = True, threads: int = 1, log=print,
             data_seed: int = DATA_SEED, with_svpo: bool = False) -> dict:
    """The whole demo in ``out``; returns the run report (also written to ``out/report.json``)."""
    import torch

    from sppd_megatron.pipeline.config import load_run_config
    from sppd_megatron.pipeline.report import markdown, print_rows, print_table, write_report
    from sppd_megatron.pipeline.runner import run_pipeline

    torch.set_num_threads(threads)
    start = time.time()
    run_yaml = _config_file("run.yaml")
    template = load_run_config(run_yaml).template
    files = data_stage(out, size, template, log, data_seed)
    base = pretrain_stage(out, size, files["pretrain"], progress, threads, log)
    common = run_overrides(out, size, files, base["hf"], threads) + [f"progress={progress}"]
    cfg = load_run_config(run_yaml, common + (svpo_overrides(size) if with_svpo else []))
    title = "sppd-megatron demo" + (" --quick" if size == PRESETS["quick"] else "") + (" --with-svpo" if with_svpo else "")
    report = run_pipeline(cfg, log=log, title=title)
    models = list(cfg.eval.models)
    eval_dirs: dict[str, Path] = {}
    notes: list[str] = []
    if with_svpo:
        mcts_cfg = load_run_config(run_yaml, common + mcts_overrides(out, size))
        mcts = run_pipeline(mcts_cfg, log=log, title=f"{title}: the MCTS run (SVPO)")["iterations"]["1"]
        it = report["iterations"]["1"]
        it["eval"].update(mcts["eval"])
        it["train"].update(mcts["train"])
        it["mcts_pairs"] = mcts["pairs"]
        models.append("svpo")
        eval_dirs["svpo"] = out / "mcts" / "iter1" / "eval" / "svpo"
        scored = calibration_stage(out, size, files["heldout"], base["hf"], _final(out / "iter1" / "prm" / "train"),
                                   threads, progress, log)
        sbs_check = sbs_greedy_check(mcts_cfg, out, log)
        precision = precision_rows(out)
        calibration = calibration_rows(scored, learned_threshold=0.1)
        report["demo_svpo"] = {"precision": precision, "calibration": calibration, "sbs1_vs_greedy": sbs_check}
        log(f"[sbs@1 check] +SVPO, step-level beam search of width 1 with one (greedy) expansion vs greedy on the "
            f"{sbs_check['questions']} held-out problems: {sbs_check['same_answer']} same answers, "
            f"{sbs_check['same_text']} same solutions")
        print_table(it["eval"], f"{title}: accuracy % (correct/n), every model")
        print_rows(PRECISION_HEADER, precision, "Step pairs each process reward gave training, by the arithmetic checker")
        print_rows(CALIBRATION_HEADER, calibration,
                   f"{size.calibration_questions} held-out problems' trees (K=8): each value against Monte-Carlo labels")
        notes += [f"sbs@1 with one expansion (the greedy step) against greedy decoding, +SVPO on the "
                  f"{sbs_check['questions']} held-out problems: {sbs_check['same_answer']} same answers, "
                  f"{sbs_check['same_text']} same solutions.", "",
                  "## Step pairs by the arithmetic step checker (a measuring instrument, never a training signal)", "",
                  markdown(PRECISION_HEADER, precision), "",
                  f"## The learned PRM on {size.calibration_questions} held-out problems' trees (K=8), against "
                  f"Monte-Carlo labels ({size.mc_rollouts} rollouts per state)", "",
                  markdown(CALIBRATION_HEADER, calibration), ""]
    seconds = time.time() - start
    report["demo"] = {"size": asdict(size), "data_seed": data_seed, "wall_seconds": round(seconds, 1), "threads": threads,
                      "instruction_set": {k: os.environ.get(k) for k in PINNED_ISA},
                      "pretrain_metrics": base.get("metrics"), "with_svpo": with_svpo}
    breakdown = misconception_breakdown(Path(cfg.run_dir), models, eval_dirs=eval_dirs)
    if breakdown:
        print_rows(SPLIT_HEADER, breakdown, _SPLIT_TITLE)
    report["demo"]["misconception_breakdown"] = breakdown
    notes = ([f"## {_SPLIT_TITLE}", "", markdown(SPLIT_HEADER, breakdown), ""] if breakdown else []) + notes + [
             f"Settings: {asdict(size)}, data seed {data_seed}; base model trained by `train` (configs/demo/pretrain.yaml).",
             f"Wall time of this invocation: {seconds / 60:.1f} min ({threads} thread(s) per process; "
             "finished stages are skipped on re-runs, so a re-run's time is not the full demo's)."]
    write_report(out, report, title, notes)
    log(f"demo finished in {seconds / 60:.1f} min; report: {out / 'report.md'}")
    return report


def sbs_greedy_check(mcts_cfg, out: Path, log) -> dict:
    """SVPO's held-out set in greedy and sbs@1 with C = 1 (one evaluation, value head loaded): how many
    answers and solutions are the same (all of them, when beam search with one greedy candidate is greedy)."""
    from sppd_megatron.config import config_from_dict, config_to_dict
    from sppd_megatron.pipeline.config import RunConfig
    from sppd_megatron.pipeline.stages import eval_stage
    from sppd_megatron.records import Prediction, read_jsonl

    data = config_to_dict(mcts_cfg)
    data["eval"].update(benchmarks={"heldout": data["eval"]["benchmarks"]["heldout"]}, modes=["greedy"],
                        sbs_modes=["sbs@1"], sbs_expansions=1)
    cfg = config_from_dict(RunConfig, data, "demo, sbs@1 check")
    it = out / "mcts" / "iter1"
    stage_dir = it / "eval_sbs1" / "svpo"
    eval_stage(cfg, stage_dir, "svpo", str(it / "svpo" / "hf"), log, value_model=_final(it / "svpo" / "train"))
    preds = list(read_jsonl(stage_dir / "predictions.jsonl", Prediction))
    return {"questions": len(preds),
            "same_answer": sum(p.greedy_answer == p.sbs["1"].answers[0] for p in preds),
            "same_text": sum(p.greedy_generation == p.sbs["1"].generations[0] for p in preds)}


def _final(train_dir: Path) -> str:
    from sppd_megatron.pipeline.stages import final_checkpoint

    return str(final_checkpoint(train_dir))


# The README's demo tables (checked by CI) must come out the same on any x86-64 machine. torch's CPU
# kernels and MKL otherwise use the widest instructions the CPU has, and AVX-512 and AVX2 round
# differently; a flipped greedy token changes an accuracy. So the demo pins AVX2 (in the environment,
# before torch loads, for this process and every stage it starts); a variable already set is kept.
PINNED_ISA = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}


def main(argv: list[str] | None = None) -> int:
    for name, value in PINNED_ISA.items():
        os.environ.setdefault(name, value)
    parser = argparse.ArgumentParser(prog="sppd-megatron demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the tests' size: every stage on real records, ~6 min on 2 cores, no improvement promised")
    parser.add_argument("--out", default=None, help="run directory (default runs/demo, or runs/demo-quick with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OMP threads per process")
    parser.add_argument("--data-seed", type=int, default=DATA_SEED,
                        help="seed of the generated problems (a different corpus, prompts and test sets)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs)")
    parser.add_argument("--with-svpo", action="store_true",
                        help="also the learned PRM, step-DPO on its pairs, SVPO on MCTS trees with step-level beam "
                             "search, and the step pairs' precision per process reward (default out runs/demo-svpo)")
    args = parser.parse_args(argv)
    from sppd_megatron.config import USER_ERRORS, report_error
    from sppd_megatron.locking import locked

    out = Path(args.out or ("runs/demo" + ("-quick" if args.quick else "") + ("-svpo" if args.with_svpo else "")))
    size = PRESETS["quick" if args.quick else "default"]
    try:
        with locked(out):  # the data and base model too, not only the run the demo starts in it
            run_demo(out, size, progress=not args.no_progress, threads=args.threads, data_seed=args.data_seed,
                     with_svpo=args.with_svpo)
    except USER_ERRORS as exc:
        return report_error("sppd-megatron demo", exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
