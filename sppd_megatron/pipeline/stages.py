"""The run's stages: each is (config, inputs) -> outputs in its own directory, through :func:`run_stage`.

Sampling, scoring and pair building run in this process through the verbs' own functions
(``run_sampling``, ``run_scoring``, ``run_pairs``), which resume inside their directories.
Training and checkpoint export run as child processes (``python -m sppd_megatron train|convert``)
so torch.distributed and Megatron state never live in the pipeline process; so do scoring with a
learned value head (``python -m sppd_megatron score``) and the evaluation of a model whose beam search
a value head guides (``python -m sppd_megatron.pipeline.stages eval``, the same evaluation as in
process). A child dies with the pipeline (PR_SET_PDEATHSIG), so a killed run leaves no orphan
trainer writing checkpoints.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from sppd_megatron.config import RunStopped, config_from_dict, config_to_dict
from sppd_megatron.pipeline.config import TRAIN_STAGES, RunConfig
from sppd_megatron.pipeline.manifest import run_stage
from sppd_megatron.sampling.prompts import source_path

Log = Callable[[str], None]


class StageFailed(RunStopped):
    """A child process of a stage exited with an error; the message gives its last line and its log."""


# --- child processes ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGKILL to this child when the pipeline process dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not Linux: a killed run may leave the child to finish on its own
        pass


def child_env(threads: int) -> dict[str, str]:
    from sppd_megatron.testing.distributed import free_port

    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def run_child(args: list[str], log_path: Path, threads: int, launcher: list[str] | None = None,
              poll: Callable[[], None] | None = None) -> None:
    """``python -m sppd_megatron ARGS`` (or ``launcher + ARGS``), output appended to ``log_path``."""
    cmd = list(launcher) if launcher else [sys.executable, "-m", "sppd_megatron"]
    cmd += args
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(threads),
                                preexec_fn=_die_with_parent)
        while proc.poll() is None:
            if poll is not None:
                poll()
            time.sleep(0.5)
    if poll is not None:
        poll()
    if proc.returncode != 0:
        if proc.returncode < 0:
            why = f"was killed by {signal.Signals(-proc.returncode).name}"
        else:
            lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
            why = f"exited with status {proc.returncode}" + (f" ({lines[-1].strip()[:500]})" if lines else "")
        raise StageFailed(f"{' '.join(args[:2])} {why}; log: {log_path}; run the same command again to resume")


def export_hf(checkpoint: Path, out: Path, log_path: Path, threads: int) -> Path:
    """The conversion bridge: a trainer checkpoint -> the HF directory the rollout engine loads."""
    run_child(["convert", "mcore-to-hf", "--ckpt", str(checkpoint), "--out", str(out), "--overwrite"],
              log_path, threads)
    return out


# --- policy ---------------------------------------------------------------------------------------


def prepare_policy(cfg: RunConfig, log: Log) -> str:
    """The starting policy as a HF directory (``tiny`` specs are written once into ``run_dir/policy``)."""
    if not cfg.policy.startswith("tiny"):
        if not (Path(cfg.policy) / "config.json").is_file():
            raise FileNotFoundError(f"policy {cfg.policy!r}: not 'tiny[:family[:seed]]' and no config.json there")
        return cfg.policy
    parts = cfg.policy.split(":")
    family = parts[1] if len(parts) > 1 and parts[1] else "llama"
    seed = int(parts[2]) if len(parts) > 2 else cfg.seed
    stage_dir = Path(cfg.run_dir) / "policy"

    def body() -> dict:
        from sppd_megatron.models.tiny import save_tiny_hf_checkpoint

        return {"hf": save_tiny_hf_checkpoint(stage_dir / "hf", family=family, seed=seed)}

    return run_stage(stage_dir, "policy", {"policy": cfg.policy, "family": family, "seed": seed}, {}, body, log)["hf"]


# --- sample, score, pairs -------------------------------------------------------------------------


def sample_stage(cfg: RunConfig, stage_dir: Path, policy_hf: str, log: Log) -> str:
    sample_cfg = cfg.sample_config(policy_hf, stage_dir / "trees")

    def body() -> dict:
        from sppd_megatron.sampling.cli import run_sampling

        summary = run_sampling(sample_cfg)
        log(f"[sample] {summary['written']} trees written ({summary['already_done']} already there), "
            f"{summary['generated_tokens']} tokens in {summary['seconds']:.1f}s, prefix cache hit rate "
            f"{summary['cache_hit_rate']:.1%}")
        return {"trees": stage_dir / "trees"}

    return run_stage(stage_dir, "sample", config_to_dict(sample_cfg),
                     {"policy": policy_hf, "prompts": source_path(cfg.prompts.path) or cfg.prompts.path}, body, log)["trees"]


def score_stage(cfg: RunConfig, stage_dir: Path, trees: str, policy_hf: str, log: Log) -> str:
    score_cfg = cfg.score_config(trees, stage_dir / "scored", policy_hf)
    inputs = {"trees": trees}
    if "mc" in score_cfg.scorers:
        inputs["policy"] = policy_hf

    def body() -> dict:
        from sppd_megatron.scoring.cli import run_scoring

        s = run_scoring(score_cfg)
        log(f"[score] {s['scored']} trees scored ({s['already_done']} already there); terminal steps "
            f"correct {s['correct']}/{s['terminal']}")
        return {"scored": stage_dir / "scored"}

    return run_stage(stage_dir, "score", config_to_dict(score_cfg), inputs, body, log)["scored"]


def pairs_stage(cfg: RunConfig, stage_dir: Path, scored: str, policy_hf: str, log: Log, value_name: str | None = None,
                label: str = "pairs") -> dict[str, str]:
    """Build the datasets; records a training stage would refuse (too long...) go to rejects.jsonl."""
    from sppd_megatron.pairs.cli import OUTPUTS

    pairs_cfg = cfg.pairs_config(scored, stage_dir, policy_hf, value_name)

    def body() -> dict:
        from sppd_megatron.pairs.cli import run_pairs
        from sppd_megatron.pipeline.report import pairs_counts, pairs_line

        log(f"[{label}] {pairs_line(pairs_counts(run_pairs(pairs_cfg)))}")
        names = {k: v for k, v in OUTPUTS.items() if k != "svpo" or pairs_cfg.svpo.enabled}
        return {**{kind: stage_dir / name for kind, name in names.items()}, "stats": stage_dir / "pairs_stats.json"}

    return run_stage(stage_dir, label, config_to_dict(pairs_cfg), {"scored": scored}, body, log)


# --- training -------------------------------------------------------------------------------------


def count_records(path: str | Path) -> int:
    with Path(path).open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def _count_examples(train_file: str | Path, stage: str) -> int:
    """Records a training stage reads: lines of its file, or (stage prm) trees of its shard directory."""
    if stage != "prm":
        return count_records(train_file)
    from sppd_megatron.scoring.cli import input_shards

    return sum(count_records(shard) for shard in input_shards(train_file))


def final_checkpoint(output_dir: Path) -> Path:
    from sppd_megatron.training.checkpoint import iter_dir, latest_step

    root = output_dir / "checkpoints"
    step = latest_step(root)
    if step is None:
        raise StageFailed(f"{root}: training finished without a complete checkpoint (checkpoint.save_final?)")
    return iter_dir(root, step)


def _trained(output_dir: Path, total: int) -> bool:
    from sppd_megatron.training.checkpoint import latest_step

    root = output_dir / "checkpoints"
    return root.is_dir() and latest_step(root) == total


def _train_progress(metrics: Path, total: int, desc: str, enabled: bool):
    """A progress bar that follows the child trainer's metrics.jsonl (one line per optimizer step)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr, dynamic_ncols=True)

    def poll() -> None:
        if not metrics.is_file():
            return
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
        if min(len(lines), total) == bar.n:
            return
        bar.n = min(len(lines), total)
        try:  # a resumed trainer cuts the file back to its checkpoint's step, possibly to nothing
            bar.set_postfix(loss=f"{json.loads(lines[-1])['loss']:.4f}", refresh=False)
        except (ValueError, KeyError, IndexError):
            pass  # a line being written, or none yet
        bar.refresh()

    return bar, poll


def train_and_export(stage_dir: Path, label: str, train_cfg: dict, init: dict[str, str], log: Log,
                     threads: int = 1, launcher: list[str] | None = None, progress: bool = True,
                     export: bool = True) -> dict[str, str]:
    """Run ``sppd-megatron train`` on ``train_cfg`` (a TrainConfig dict) in a child, then export to HF.

    Returns ``{"checkpoint", "hf", "metrics"}`` (no ``hf`` without ``export``: a value model is read
    from its checkpoint). With no training records (e.g. no question had both a correct and an
    incorrect solution) the stage passes ``init``'s model through (no ``metrics``: it took no step)
    and says so.
    """
    train_file = train_cfg["data"]["train_file"]

    def body() -> dict:
        n = _count_examples(train_file, train_cfg["stage"])
        if n == 0:
            log(f"[{label}] WARNING: {train_file} has no records; the stage passes its starting policy through")
            return {k: v for k, v in init.items() if k in ("checkpoint", "hf")}
        stage_dir.mkdir(parents=True, exist_ok=True)
        recipe = stage_dir / "train.yaml"
        recipe.write_text(yaml.safe_dump(train_cfg, sort_keys=False))
        sched = train_cfg["schedule"]
        total = sched["train_steps"] or max(1, -(-sched["epochs"] * n // sched["global_batch_size"]))
        out_dir = Path(train_cfg["output_dir"])
        if _trained(out_dir, total):  # a resumed stage whose export was cut short: no trainer to start
            log(f"[{label}] trained already (the checkpoint of step {total} is there)")
        else:
            bar, poll = _train_progress(out_dir / "metrics.jsonl", total, f"train[{label}]", progress)
            try:
                run_child(["train", str(recipe)], stage_dir / "train.log", threads, launcher, poll)
            finally:
                bar.close()
        checkpoint = final_checkpoint(out_dir)
        last = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])
        if not export:
            log(f"[{label}] {last['step']} steps, final loss {last['loss']:.4f}; checkpoint {checkpoint}")
            return {"checkpoint": checkpoint, "metrics": out_dir / "metrics.jsonl"}
        hf = export_hf(checkpoint, stage_dir / "hf", stage_dir / "train.log", threads)
        log(f"[{label}] {last['step']} steps, final loss {last['loss']:.4f}; exported to {hf}")
        return {"checkpoint": checkpoint, "hf": hf, "metrics": out_dir / "metrics.jsonl"}

    inputs = {"data": train_file, **{f"init_{k}": v for k, v in init.items() if k in ("checkpoint", "hf")}}
    return run_stage(stage_dir, label, train_cfg, inputs, body, log)


def train_stage(cfg: RunConfig, stage: str, stage_dir: Path, init: dict[str, str], train_file: str, log: Log,
                margin_mode: str | None = None, label: str | None = None) -> dict[str, str]:
    """A run's training stage (``sft_prm``, ``dpo_prm``, ``step_dpo``) from ``init`` (``{"checkpoint": dir}``
    of the previous stage, or ``{"hf": dir}`` of the starting policy)."""
    source, path = ("mcore", init["checkpoint"]) if "checkpoint" in init else ("hf", init["hf"])
    # Absolute: the trainer records the tokenizer location in its checkpoints, and the converter
    # reads it relative to the checkpoint directory.
    path = str(Path(path).resolve())
    train_cfg = cfg.train_config(stage, stage_dir / "train", source, path, train_file, margin_mode)
    return train_and_export(stage_dir, label or stage, train_cfg, init, log, cfg.train.threads,
                            cfg.train.launcher or None, cfg.progress, export=stage != "prm")


# --- the learned process reward -------------------------------------------------------------------


def prm_score_stage(cfg: RunConfig, stage_dir: Path, scored: str, checkpoint: str, log: Log) -> str:
    """The scored trees again with the learned value head (``values["value_head"]``), in a child ``score``."""
    score_cfg = cfg.value_score_config(scored, stage_dir / "scored", checkpoint)

    def body() -> dict:
        stage_dir.mkdir(parents=True, exist_ok=True)
        recipe = stage_dir / "score.yaml"
        recipe.write_text(yaml.safe_dump(config_to_dict(score_cfg), sort_keys=False))
        run_child(["score", str(recipe)], stage_dir / "score.log", cfg.train.threads)
        summary = json.loads((stage_dir / "scored" / "score_summary.json").read_text())
        log(f"[prm_score] {summary['scored']} trees scored with the learned value head ({summary['already_done']} "
            "already there)")
        return {"scored": stage_dir / "scored", "summary": stage_dir / "scored" / "score_summary.json"}

    return run_stage(stage_dir, "prm_score", config_to_dict(score_cfg), {"scored": scored, "checkpoint": checkpoint},
                     body, log)["scored"]


# --- evaluation -----------------------------------------------------------------------------------


def evaluate_model(cfg: RunConfig, stage_dir: Path, hf_dir: str, value_model: str | None = None) -> None:
    """The evaluation of one model (the harness, every benchmark and mode); with ``value_model`` (a
    checkpoint with a value head) also ``eval.sbs_modes``, its value head guiding the beams."""
    from sppd_megatron.evaluation.harness import evaluate
    from sppd_megatron.sampling.engines import build_engine
    from sppd_megatron.sampling.prompts import load_prompts, resolve_template
    from sppd_megatron.tokenization import load_tokenizer

    e = cfg.eval
    benchmarks = {name: load_prompts(b.path, b.fields, b.limit) for name, b in e.benchmarks.items()}
    tokenizer = load_tokenizer(hf_dir)
    modes, orm = list(e.modes), None
    if value_model is not None:
        from sppd_megatron.training.value_prm import MegatronValuePRM, ValueHeadPRMConfig

        modes += list(e.sbs_modes)
        orm = MegatronValuePRM(config_from_dict(ValueHeadPRMConfig, {**cfg.prm_score.get("value_head", {}),
                                                                     "path": value_model}, "prm_score.value_head"))
    try:
        evaluate(lambda: build_engine(e.engine, hf_dir, tokenizer, tokenizer_path=hf_dir, seed=e.seed),
                 tokenizer, benchmarks, modes, stage_dir, template=resolve_template(cfg.template, tokenizer),
                 max_new_tokens=e.max_new_tokens, temperature=e.temperature, seed=e.seed, progress=cfg.progress,
                 questions_per_batch=e.questions_per_batch, model_id=str(hf_dir), orm=orm,
                 sbs_expansions=e.sbs_expansions)
    finally:
        if orm is not None:
            orm.close()


def eval_stage(cfg: RunConfig, stage_dir: Path, model_name: str, hf_dir: str, log: Log,
               value_model: str | None = None) -> dict:
    """Evaluate one HF model on every benchmark with every mode (issue 6's harness); returns its summary.

    With ``value_model`` the evaluation runs in a child process (the value head is a Megatron model)."""
    settings = {k: v for k, v in config_to_dict(cfg.eval).items() if k not in ("models", "value_heads")}
    if value_model is None:  # only this model's settings: the beam-search keys do not concern it
        settings = {k: v for k, v in settings.items() if k not in ("sbs_modes", "sbs_expansions")}
    config = {"model": model_name, "eval": settings, "template": config_to_dict(cfg.template)}
    inputs = {"model": hf_dir, **{f"bench_{name}": source_path(b.path) or b.path for name, b in cfg.eval.benchmarks.items()}}
    if value_model is not None:
        inputs["value_model"] = value_model

    def body() -> dict:
        if value_model is None:
            evaluate_model(cfg, stage_dir, hf_dir)
        else:
            stage_dir.mkdir(parents=True, exist_ok=True)
            args = stage_dir / "eval_args.json"
            args.write_text(json.dumps({"run": config_to_dict(cfg), "stage_dir": str(stage_dir), "hf": str(hf_dir),
                                        "value_model": str(value_model)}, indent=1))
            run_child(["eval", str(args)], stage_dir / "eval.log", cfg.train.threads,
                      launcher=[sys.executable, "-m", "sppd_megatron.pipeline.stages"])
        return {"summary": stage_dir / "summary.json", "predictions": stage_dir / "predictions.jsonl"}

    out = run_stage(stage_dir, f"eval[{model_name}]", config, inputs, body, log)
    return json.loads(Path(out["summary"]).read_text())


def main(argv: list[str] | None = None) -> int:
    """``python -m sppd_megatron.pipeline.stages eval ARGS.json``: :func:`evaluate_model` in a child process."""
    from sppd_megatron.pipeline.config import RunConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "eval":
        print(main.__doc__, file=sys.stderr)
        return 2
    args = json.loads(Path(argv[1]).read_text())
    cfg = config_from_dict(RunConfig, args["run"], argv[1])
    evaluate_model(cfg, Path(args["stage_dir"]), args["hf"], args["value_model"])
    return 0


__all__ = ["TRAIN_STAGES", "StageFailed", "eval_stage", "pairs_stage", "prepare_policy", "prm_score_stage",
           "sample_stage", "score_stage", "train_stage"]


if __name__ == "__main__":
    raise SystemExit(main())
