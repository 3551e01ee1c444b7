"""``sppd-megatron pairs CONFIG.yaml [dotted.key=value ...]``: training data from scored trees.

Writes into ``output_dir``: ``sft.jsonl`` (SFT-PRM), ``dpo.jsonl`` (DPO-PRM), ``step_pairs.jsonl``
(SPPD D_step), ``svpo_pairs.jsonl``, ``rejects.jsonl`` (every bad input line, unusable tree and
bad pair, with file, line and reason) and ``pairs_stats.json``, and prints a stats table. Output
order is deterministic: trees in shard order, pairs within a tree largest gap first.

With ``trainable`` set (``sppd-megatron run`` sets it from its training recipes), every record is
also turned into token rows exactly as ``train`` will (``training.data.build_example``): one that
training would refuse, e.g. longer than its ``data.max_length``, goes to the rejects, not to the
dataset.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sppd_megatron import faults
from sppd_megatron.config import USER_ERRORS, config_to_dict, parse_config_command, report_error
from sppd_megatron.locking import locked
from sppd_megatron.pairs.builders import (
    SVPOCounts,
    TreeNotUsable,
    check_tree,
    dedup_and_cap,
    dpo_prm,
    gap,
    invalid_reason,
    sft_prm,
    step_pairs,
    svpo_pairs,
)
from sppd_megatron.records import PreferencePair, RecordError, SFTExample, Tree, iter_jsonl_lenient, write_jsonl
from sppd_megatron.scoring.cli import input_shards
from sppd_megatron.scoring.rejects import RejectsFile
from sppd_megatron.tokenization import CHAR_TOKENIZER_SPEC, BoundaryMergeError, load_tokenizer
from sppd_megatron.training.config import Overlong

OUTPUTS = {"sft": "sft.jsonl", "dpo": "dpo.jsonl", "step": "step_pairs.jsonl", "svpo": "svpo_pairs.jsonl"}
DATASET_NAMES = {"sft": "SFT-PRM", "dpo": "DPO-PRM", "step": "step pairs", "svpo": "SVPO pairs"}


@dataclass
class StepPairsConfig:
    """SPPD D_step: sibling steps whose values differ by more than a threshold."""

    threshold: float = 0.5
    """Pairs need V(chosen) - V(rejected) strictly greater than this (paper: "exceeding 0.5")."""
    max_pairs_per_question: int | None = None
    """Keep at most this many pairs per question, largest gaps first (None: all)."""


@dataclass
class SVPOConfig:
    """SVPO step-level preferences: how many of each type per chosen step, and caps."""

    enabled: bool = True
    """Write ``svpo_pairs.jsonl``."""
    counts: SVPOCounts = field(default_factory=SVPOCounts)
    """Rejected steps per chosen step for each type (SVPO: sibling 2, cousin 1, terminal 1)."""
    threshold: float = 0.5
    """Pairs need V(chosen) - V(rejected) strictly greater than this."""
    max_pairs_per_question: int | None = None
    """Keep at most this many pairs per question, in top-down order (None: all)."""


@dataclass
class TrainingData:
    """The ``data`` settings of the training stage that reads a dataset (keys of ``train``'s DataConfig)."""

    max_length: int
    """That stage's ``data.max_length``."""
    append_eos: bool = True
    """That stage's ``data.append_eos``."""
    overlong: Overlong = "error"
    """That stage's ``data.overlong``: with ``truncate`` a record whose context can be cut to fit is kept."""

    def __post_init__(self) -> None:
        if self.max_length < 4:
            raise ValueError("max_length must be at least 4")


@dataclass
class TrainableConfig:
    """Check every built record the way ``train`` will read it, so training never meets one it refuses."""

    tokenizer: str | None = None
    """The tokenizer training uses (a directory or ``builtin:char``); unset: the trees' policy's own
    (none is checked when the policy directory holds no tokenizer: the stats count those trees)."""
    datasets: dict[str, TrainingData] = field(default_factory=dict)
    """Dataset (``sft``, ``dpo``, ``step``, ``svpo``) -> the data settings of the stage that trains on it;
    a dataset not listed is not checked."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.datasets) - set(OUTPUTS))
        if unknown:
            raise ValueError(f"trainable.datasets: unknown {unknown}; valid: {sorted(OUTPUTS)}")


@dataclass
class PairsConfig:
    """Which datasets to build from which scored trees."""

    input_dir: str
    """Scored ``trees-*.jsonl`` shards (``sppd-megatron score`` output) or one .jsonl file."""
    output_dir: str
    """Where the datasets, ``rejects.jsonl`` and ``pairs_stats.json`` go (files are replaced)."""
    value_name: str = "tree"
    """The scorer whose ``node.values`` entry is V (``tree``, ``mc``, ``hf``... as written by score)."""
    step: StepPairsConfig = field(default_factory=StepPairsConfig)
    """SPPD step pairs."""
    svpo: SVPOConfig = field(default_factory=SVPOConfig)
    """SVPO pairs."""
    dedup: bool = True
    """Drop a pair identical (prompt, contexts, chosen, rejected) to one already kept in the same file."""
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    """Reject records the training stage would refuse (``sppd-megatron run`` fills this in)."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        for name, value in (("step.threshold", self.step.threshold), ("svpo.threshold", self.svpo.threshold)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value}: values live in [0, 1], so a threshold must be in [0, 1)")
        for name, cap in (("step", self.step.max_pairs_per_question), ("svpo", self.svpo.max_pairs_per_question)):
            if cap is not None and cap < 1:
                raise ValueError(f"{name}.max_pairs_per_question must be >= 1 or null")


def _histogram(values: list[float], edges: list[float]) -> dict[str, int]:
    """Counts per bin [edges[i], edges[i+1]); the last bin includes its right edge."""
    bins = {f"{lo:g}-{hi:g}": 0 for lo, hi in zip(edges, edges[1:])}
    keys = list(bins)
    for v in values:
        for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
            if lo <= v < hi or (i == len(keys) - 1 and v == hi):
                bins[keys[i]] += 1
                break
    return bins


def _pair_stats(pairs: list, per_question: Counter, questions: int) -> dict:
    gaps = [gap(p) for p in pairs]
    counts = list(per_question.values())
    return {
        "pairs": len(pairs),
        "questions_with_pairs": len(per_question),
        "pairs_per_question": {
            "mean_over_all_questions": round(len(pairs) / questions, 4) if questions else 0.0,
            "max": max(counts, default=0),
            "min_nonzero": min(counts, default=0),
        },
        "gap": {
            "mean": round(sum(gaps) / len(gaps), 4) if gaps else None,
            "min": round(min(gaps), 4) if gaps else None,
            "max": round(max(gaps), 4) if gaps else None,
            "histogram": _histogram(gaps, [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
        },
        "depth_histogram": dict(sorted(Counter(str(p.depth) for p in pairs).items(), key=lambda kv: int(kv[0]))),
        "pair_types": dict(sorted(Counter(p.pair_type for p in pairs).items())),
    }


MERGES = "merges with its context when re-tokenised"


def _tokenizer_spec(cfg: PairsConfig, tree: Tree) -> str | None:
    """The tokenizer training will use: ``trainable.tokenizer``, else the trees' policy's own."""
    if cfg.trainable.tokenizer:
        return cfg.trainable.tokenizer
    if tree.policy.startswith("tiny"):
        return CHAR_TOKENIZER_SPEC
    policy = Path(tree.policy)
    return tree.policy if (policy / "tokenizer.json").is_file() or (policy / "tokenizer_config.json").is_file() else None


def refusal(cfg: TrainableConfig, kind: str, record: PreferencePair | SFTExample, tokenizer) -> tuple[str, str] | None:
    """(category, reason) when training would refuse ``record``; None when it takes it.

    The record goes through ``training.data.build_example``, the trainer's own tokenisation, with the
    settings of the stage that trains on ``kind`` (``trainable.datasets``); a dataset without settings
    is still checked for what every stage refuses, a continuation that merges with its context (a BPE
    token across the step boundary). The vocabulary check is the model's and is left to training.
    """
    from sppd_megatron.training.data import TooLong, build_example

    data = cfg.datasets.get(kind)
    try:
        build_example(record, tokenizer, data.max_length if data else sys.maxsize, None,
                      data.append_eos if data else True, overlong=data.overlong if data else "error")
    except BoundaryMergeError as exc:
        return MERGES, f"training would refuse it: {exc.reason}"
    except TooLong as exc:
        return "too long for training", f"training would refuse it: {exc.reason}"
    except RecordError as exc:
        return "not trainable", f"training would refuse it: {exc.reason}"
    return None


def run_pairs(cfg: PairsConfig) -> dict:
    """Build every dataset of ``cfg`` (its output directory locked meanwhile); returns the stats written
    to ``pairs_stats.json``."""
    with locked(cfg.output_dir):
        return _pairs(cfg)


def _pairs(cfg: PairsConfig) -> dict:
    from tqdm import tqdm

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = input_shards(cfg.input_dir)
    data: dict[str, list] = {k: [] for k in OUTPUTS}
    seen: dict[str, set] = {k: set() for k in OUTPUTS}
    per_question: dict[str, Counter] = {k: Counter() for k in OUTPUTS}
    duplicates = Counter()
    untrainable = Counter()
    trees_read = trees_used = 0
    tree_ids: set[str] = set()
    tokenizers: dict[str, object] = {}
    unchecked_trees = 0
    bar = tqdm(desc="pairs", unit="tree", disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
    with RejectsFile(out_dir / "rejects.jsonl") as rejects:

        def keep(kind: str, records: list, cap: int | None, file: Path, line: int, tokenizer) -> None:
            valid = []
            for record in records:
                reason = invalid_reason(record)
                if reason:
                    category = "pair without signal" if "identical" in reason else f"invalid {record.kind} record"
                elif tokenizer is not None and (refused := refusal(cfg.trainable, kind, record, tokenizer)):
                    category, reason = refused
                    untrainable[kind] += 1
                if reason:
                    rejects.add(file, line, reason, category, output=OUTPUTS[kind], question_id=record.question_id)
                else:
                    valid.append(record)
            if cfg.dedup:
                valid, dropped = dedup_and_cap(valid, cap, seen[kind])
                duplicates[kind] += dropped
            elif cap is not None:
                valid = valid[:cap]
            data[kind].extend(valid)
            if valid:
                per_question[kind][valid[0].question_id] += len(valid)

        for shard in shards:
            for line, tree, reason in iter_jsonl_lenient(shard, Tree):
                trees_read += 1
                bar.update(1)
                if tree is None:
                    rejects.add(shard, line, reason, "invalid tree record")
                    continue
                if tree.id in tree_ids:
                    rejects.add(shard, line, f"duplicate tree id {tree.id!r} (already read)", "duplicate tree")
                    continue
                tree_ids.add(tree.id)
                try:
                    check_tree(tree, cfg.value_name)
                except TreeNotUsable as exc:
                    rejects.add(shard, line, str(exc), "tree not usable")
                    continue
                trees_used += 1
                spec = _tokenizer_spec(cfg, tree)
                if spec is None:
                    unchecked_trees += 1
                elif spec not in tokenizers:
                    tokenizers[spec] = load_tokenizer(spec)
                tok = tokenizers.get(spec)
                sft = sft_prm(tree, cfg.value_name)
                keep("sft", [sft] if sft else [], None, shard, line, tok)
                dpo = dpo_prm(tree, cfg.value_name)
                keep("dpo", [dpo] if dpo else [], None, shard, line, tok)
                keep("step", step_pairs(tree, cfg.value_name, cfg.step.threshold),
                     cfg.step.max_pairs_per_question, shard, line, tok)
                if cfg.svpo.enabled:
                    keep("svpo", svpo_pairs(tree, cfg.value_name, cfg.svpo.counts, cfg.svpo.threshold),
                         cfg.svpo.max_pairs_per_question, shard, line, tok)
        bar.close()
        if trees_read == 0:
            raise ValueError(f"{cfg.input_dir}: no trees in {', '.join(str(s) for s in shards)} (empty input)")
        written = {}
        for kind, name in OUTPUTS.items():
            if kind == "svpo" and not cfg.svpo.enabled:
                continue
            faults.hit("pairs.write", out_dir / name)
            written[kind] = write_jsonl(out_dir / name, data[kind])
        stats = {
            "config": config_to_dict(cfg),
            "trees_read": trees_read,
            "trees_used": trees_used,
            "rejected": rejects.count,
            "rejected_by_reason": dict(sorted(rejects.reasons.items())),
            "duplicates_removed": dict(sorted(duplicates.items())),
            "untrainable": {kind: untrainable[kind] for kind in OUTPUTS if kind in written},
            "tokenizers_checked": sorted(tokenizers),
            "trees_without_tokenizer_check": unchecked_trees,
            "sft": {"examples": written["sft"], "questions_without_correct": trees_used - written["sft"]},
            "dpo": {"pairs": written["dpo"],
                    "gap_mean": round(sum(gap(p) for p in data["dpo"]) / len(data["dpo"]), 4) if data["dpo"] else None},
            "step": _pair_stats(data["step"], per_question["step"], trees_used),
        }
        if cfg.svpo.enabled:
            stats["svpo"] = _pair_stats(data["svpo"], per_question["svpo"], trees_used)
    (out_dir / "pairs_stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats


def print_stats(stats: dict, output_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pairs from {stats['trees_used']} of {stats['trees_read']} trees")
    for column in ("dataset", "records", "questions", "per question (mean/max)", "gap mean [min, max]", "depths"):
        table.add_column(column)
    n_sft, n_dpo, dpo_gap = stats["sft"]["examples"], stats["dpo"]["pairs"], stats["dpo"]["gap_mean"]
    table.add_row("sft.jsonl", str(n_sft), str(n_sft), "1 / 1" if n_sft else "-", "-", "-")
    table.add_row("dpo.jsonl", str(n_dpo), str(n_dpo), "1 / 1" if n_dpo else "-",
                  "-" if dpo_gap is None else f"{dpo_gap:.3f}", "-")
    for kind, name in (("step", "step_pairs.jsonl"), ("svpo", "svpo_pairs.jsonl")):
        if kind not in stats:
            continue
        s = stats[kind]
        g = s["gap"]
        gaps = "-" if g["mean"] is None else f"{g['mean']:.3f} [{g['min']:.3f}, {g['max']:.3f}]"
        depths = " ".join(f"{d}:{n}" for d, n in s["depth_histogram"].items()) or "-"
        per_q = f"{s['pairs_per_question']['mean_over_all_questions']:.2f} / {s['pairs_per_question']['max']}"
        types = ", ".join(f"{t} {n}" for t, n in s["pair_types"].items())
        label = f"{name} ({types})" if kind == "svpo" and types else name
        table.add_row(label, str(s["pairs"]), str(s["questions_with_pairs"]), per_q, gaps, depths)
    console = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes get the full table
    console.print(table)
    console.print(f"written to {output_dir}")
    dups = sum(stats["duplicates_removed"].values())
    reasons = ", ".join(f"{k} {n}" for k, n in stats["rejected_by_reason"].items())
    console.print(f"rejected: {stats['rejected']}" + (f" ({reasons}; see rejects.jsonl)" if reasons else "")
                  + f"; duplicates removed: {dups}")
    if stats["tokenizers_checked"]:
        console.print(f"refused by training (in rejects.jsonl): {untrainable_summary(stats['untrainable'])}")
    if stats["trees_without_tokenizer_check"]:
        console.print(f"{stats['trees_without_tokenizer_check']} trees' policy holds no tokenizer, so their records were "
                      "not checked the way training reads them: set trainable.tokenizer=DIR")


def untrainable_summary(untrainable: dict[str, int]) -> str:
    """``SFT-PRM 0, DPO-PRM 2, step pairs 0``: records per dataset that training would refuse."""
    return ", ".join(f"{name} {untrainable[kind]}" for kind, name in DATASET_NAMES.items() if kind in untrainable)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config_command("sppd-megatron pairs", PairsConfig, argv, __doc__, "step.threshold=0.3")
        stats = run_pairs(cfg)
    except USER_ERRORS as exc:
        return report_error("sppd-megatron pairs", exc)
    print_stats(stats, cfg.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
