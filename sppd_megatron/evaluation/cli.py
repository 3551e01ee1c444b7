"""``sppd-megatron eval``: Greedy-CoT, MAJ@N, ORM_VOTE@N, ORM_MAX@N of a model on benchmarks.

    sppd-megatron eval --model DIR --bench gsm8k,math500 --modes greedy,maj@8 [--limit 20] [--out DIR]
    sppd-megatron eval --config configs/tiny-cpu/eval.yaml [flags] [dotted.key=value ...]

Flags set the EvalConfig keys of the same meaning and win over the YAML file; dotted overrides
win over both. ``--model`` may be a Hugging Face directory, an sppd-megatron (Megatron) checkpoint
(exported to HF into ``OUT/hf_export`` first, once) or ``tiny:llama``. Re-running resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sppd_megatron.config import USER_ERRORS, ConfigError, load_config, report_error
from sppd_megatron.evaluation.config import EvalConfig
from sppd_megatron.evaluation.orm import build_orm

EXPORT_DIR = "hf_export"
EXPORT_STAMP = "exported_from.json"


def _checkpoint_identity(ckpt: Path) -> dict:
    from sppd_megatron.conversion.mcore_checkpoint import META_FILE, MODEL_SUBDIR

    return {"checkpoint": str(ckpt.resolve()), "meta": (ckpt / META_FILE).read_text(),
            "saved_ns": (ckpt / MODEL_SUBDIR / "metadata.json").stat().st_mtime_ns}


def export_checkpoint(ckpt: Path, dest: Path) -> Path:
    """The checkpoint as a HF directory in ``dest``, converted once and reused while the checkpoint is unchanged."""
    from sppd_megatron.conversion.mcore_to_hf import McoreToHfOptions, convert_mcore_to_hf

    identity = _checkpoint_identity(ckpt)
    stamp = dest / EXPORT_STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == identity:
        return dest
    convert_mcore_to_hf(ckpt, dest, McoreToHfOptions(overwrite=True))
    stamp.write_text(json.dumps(identity, indent=2) + "\n")  # written last: its presence means complete
    return dest


def prepare_model(cfg: EvalConfig) -> tuple[str, str]:
    """``(model path or tiny spec for the engine, tokenizer spec)``; Megatron checkpoints are exported."""
    from sppd_megatron.conversion.mcore_checkpoint import META_FILE

    if cfg.model.startswith("tiny:"):
        return cfg.model, cfg.tokenizer or "builtin:char"
    path = Path(cfg.model)
    if (path / META_FILE).is_file():
        hf_dir = export_checkpoint(path, Path(cfg.output_dir) / EXPORT_DIR)
        return str(hf_dir), cfg.tokenizer or str(hf_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model {cfg.model!r}: not a directory (HF or sppd-megatron checkpoint) nor tiny:<family>")
    return cfg.model, cfg.tokenizer or cfg.model


def run_eval(cfg: EvalConfig, orm=None) -> dict:
    """Evaluate ``cfg`` into ``cfg.output_dir``; ``orm`` may inject a ready reward model (tests)."""
    from sppd_megatron.evaluation.benchmarks import load_benchmarks
    from sppd_megatron.evaluation.harness import evaluate
    from sppd_megatron.sampling.engines import build_engine
    from sppd_megatron.tokenization import load_tokenizer

    benchmarks = load_benchmarks(cfg.benchmarks, cfg.fields, cfg.limit)
    model_path, tokenizer_spec = prepare_model(cfg)
    tokenizer = load_tokenizer(tokenizer_spec)
    built = orm is None
    orm = orm if orm is not None else build_orm(cfg.orm)

    def make_engine():
        return build_engine(cfg.engine, model_path, tokenizer, tokenizer_path=tokenizer_spec, seed=cfg.seed)

    model_id = cfg.model if cfg.model.startswith("tiny:") else str(Path(cfg.model).resolve())
    try:
        return evaluate(make_engine, tokenizer, benchmarks, cfg.modes, cfg.output_dir, template=cfg.template,
                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        seed=cfg.seed, orm=orm, progress=cfg.progress, questions_per_batch=cfg.questions_per_batch,
                        grade_timeout_seconds=cfg.grade_timeout_seconds, model_id=model_id,
                        sbs_expansions=cfg.sbs_expansions, step_delimiter=cfg.step_delimiter)
    finally:
        close = getattr(getattr(orm, "prm", None), "close", None)
        if close is not None and built:  # a value-head PRM under torchrun releases the ranks serving it
            close()


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# One row per flag: (flag, EvalConfig dotted key, converter, help, choices).
FLAGS = [
    ("--model", "model", str, "HF directory, sppd-megatron checkpoint directory, or tiny:llama", None),
    ("--tokenizer", "tokenizer", str, "tokenizer directory or builtin:char (default: the model's)", None),
    ("--bench", "benchmarks", _csv, "comma-separated: gsm8k, math500, gaokao2023en, hf:DATASET[:SPLIT], "
                                     "path.jsonl, NAME=any of these", None),
    ("--modes", "modes", _csv, "comma-separated: greedy, maj@N, orm_vote@N, orm_max@N, sbs@B, sbs_vote@B", None),
    ("--limit", "limit", int, "first N questions of each benchmark", None),
    ("--out", "output_dir", str, "output directory (resumable)", None),
    ("--orm", "orm.hf.path", str, "PRM checkpoint directory used as the ORM (transformers)", None),
    ("--orm-type", "orm.hf.style", str, "how the PRM reads step values", ["value_head", "step_tag", "qwen_prm"]),
    ("--value-model", "orm.value_head.path", str, "sppd-megatron checkpoint with a value head (stage prm or svpo) as "
     "the reward model of the orm and sbs modes", None),
    ("--sbs-expansions", "sbs_expansions", int, "sbs modes: candidate steps per beam (default 5)", None),
    ("--orm-reduction", "orm.reduction", str, "step values -> one score (default last)", ["last", "min", "mean"]),
    ("--engine", "engine.name", str, "rollout engine", ["transformers", "sglang", "vllm"]),
    ("--max-new-tokens", "max_new_tokens", int, "generation limit per solution (default 2048)", None),
    ("--temperature", "temperature", float, "sampling temperature of maj/orm samples (default 0.7)", None),
    ("--seed", "seed", int, "sampling seed (default 0)", None),
    ("--question-field", "fields.question", str, "question field of benchmarks other than the named ones", None),
    ("--answer-field", "fields.answer", str, "gold answer field of benchmarks other than the named ones", None),
    ("--id-field", "fields.id", str, "id field of benchmarks other than the named ones", None),
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sppd-megatron eval", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file of EvalConfig keys (see docs/evaluation.md)")
    for flag, _, _, help_, choices in FLAGS:
        p.add_argument(flag, help=help_, choices=choices)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. engine.num_threads=1")
    return p


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """Flags as dotted overrides (values JSON-encoded, which YAML reads back unchanged)."""
    out = []
    for flag, key, convert, _, _ in FLAGS:
        raw = getattr(args, flag[2:].replace("-", "_"))
        if raw is None:
            continue
        try:
            value = convert(raw)
        except ValueError:
            raise ConfigError(f"{flag}: {raw!r} is not a valid {convert.__name__}") from None
        out.append(f"{key}={json.dumps(value)}")
    if args.orm is not None:
        out.append("orm.kind=hf")
    if args.value_model is not None:
        out.append("orm.kind=value_head")
    if args.no_progress:
        out.append("progress=false")
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # overrides may come before or after flags
    try:
        cfg = load_config(EvalConfig, args.config, _flag_overrides(args) + args.overrides)
        if cfg.orm.kind == "value_head":
            from sppd_megatron.training.value_prm import follow

            if follow(lambda: build_orm(cfg.orm).prm):  # under torchrun: ranks > 0 serve rank 0's value head
                return 0
        summary = run_eval(cfg)
    except USER_ERRORS as exc:
        return report_error("sppd-megatron eval", exc)
    from sppd_megatron.evaluation.summary import render_markdown

    print(render_markdown(summary), end="")
    print(f"wrote {Path(cfg.output_dir) / 'predictions.jsonl'}, summary.json and summary.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
