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
"""

from __future__ import annotations

import argparse
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


PRESETS = {
    "default": DemoSize(pretrain_problems=4000, pretrain_steps=600, prompts=1024, heldout=200, ood=200, K=16, maj_n=5,
                        misconception_rate=0.65),
    # Pretrained long enough to solve some prompts (a sixth of held-out problems), so that every pairs
    # dataset gets records and, at batch 4, every training stage takes several optimizer steps.
    "quick": DemoSize(pretrain_problems=1000, pretrain_steps=300, prompts=64, heldout=24, ood=24, K=8, maj_n=3,
                      misconception_rate=0.65, train_batch=4),
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


SPLIT_HEADER = ["model", 'problems with a "triples" step', "the other problems"]


def misconception_breakdown(run_dir: Path, models: list[str], benchmark: str = "heldout") -> list[list[str]]:
    """Greedy accuracy per model on the ``benchmark`` problems with and without a "triples" step,
    as table rows under :data:`SPLIT_HEADER` (``["Base", "4/64", "61/136"]``).

    The pretraining corpus's misconception is about "triples" steps only, so this split shows where
    each stage's change comes from. Read from the last iteration's eval predictions.
    """
    from sppd_megatron.pipeline.report import row_label
    from sppd_megatron.records import Prediction, read_jsonl

    iters = sorted(run_dir.glob("iter*/eval"), key=lambda p: int(p.parent.name[4:]))
    if not iters:
        return []
    rows = []
    for model in models:
        path = iters[-1] / model / "predictions.jsonl"
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


def run_demo(out: Path, size: DemoSize, progress: bool = True, threads: int = 1, log=print,
             data_seed: int = DATA_SEED) -> dict:
    """The whole demo in ``out``; returns the run report (also written to ``out/report.json``)."""
    import torch

    from sppd_megatron.pipeline.config import load_run_config
    from sppd_megatron.pipeline.report import markdown, print_rows, write_report
    from sppd_megatron.pipeline.runner import run_pipeline

    torch.set_num_threads(threads)
    start = time.time()
    run_yaml = _config_file("run.yaml")
    template = load_run_config(run_yaml).template
    files = data_stage(out, size, template, log, data_seed)
    base = pretrain_stage(out, size, files["pretrain"], progress, threads, log)
    cfg = load_run_config(run_yaml, run_overrides(out, size, files, base["hf"], threads) + [f"progress={progress}"])
    title = "sppd-megatron demo" + (" --quick" if size == PRESETS["quick"] else "")
    report = run_pipeline(cfg, log=log, title=title)
    seconds = time.time() - start
    report["demo"] = {"size": asdict(size), "data_seed": data_seed, "wall_seconds": round(seconds, 1), "threads": threads,
                      "instruction_set": {k: os.environ.get(k) for k in PINNED_ISA},
                      "pretrain_metrics": base.get("metrics")}
    breakdown = misconception_breakdown(Path(cfg.run_dir), list(cfg.eval.models))
    if breakdown:
        print_rows(SPLIT_HEADER, breakdown, _SPLIT_TITLE)
    report["demo"]["misconception_breakdown"] = breakdown
    notes = ([f"## {_SPLIT_TITLE}", "", markdown(SPLIT_HEADER, breakdown), ""] if breakdown else []) + [
             f"Settings: {asdict(size)}, data seed {data_seed}; base model trained by `train` (configs/demo/pretrain.yaml).",
             f"Wall time of this invocation: {seconds / 60:.1f} min ({threads} thread(s) per process; "
             "finished stages are skipped on re-runs, so a re-run's time is not the full demo's)."]
    write_report(out, report, title, notes)
    log(f"demo finished in {seconds / 60:.1f} min; report: {out / 'report.md'}")
    return report


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
    args = parser.parse_args(argv)
    from sppd_megatron.config import USER_ERRORS, report_error
    from sppd_megatron.locking import locked

    out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
    size = PRESETS["quick" if args.quick else "default"]
    try:
        with locked(out):  # the data and base model too, not only the run the demo starts in it
            run_demo(out, size, progress=not args.no_progress, threads=args.threads, data_seed=args.data_seed)
    except USER_ERRORS as exc:
        return report_error("sppd-megatron demo", exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
