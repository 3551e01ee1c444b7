"""Tokens computed and wall time per optimizer step: padded vs packed vs prefix-shared vs tree-packed.

    .venv/bin/python benchmarks/bench_packing.py [--steps 2] [--pack-length 8192] [--demo-pairs PATH]

Data: (1) synthetic step-pair trees of the recipes' shape: a 200-token question, K=64 expansions of
C=2 children, up to 8 steps of ~60 tokens, one sibling pair per expansion (D_step of one tree);
(2) the demo's step pairs, when a demo has run (``runs/demo/iter1/pairs/step_pairs.jsonl``, or
``--demo-pairs``). Characters are tokens (the character tokenizer), so lengths are exact.

For each ``data.packing`` the same step_dpo recipe (a tiny Llama, one global batch = one tree's
pairs, grouped by tree) trains ``--steps`` steps after one warm-up step, each in its own process.
Printed per mode: the unique tokens of each step's batch (every distinct prefix once: the least
any layout computes), the token positions the model ran (padding included) and their ratio to
the unique tokens, and the median wall time per step and per pair. On a CPU the tree mask is dense
(megatron's attention with an explicit mask); on a GPU FlexAttention (``precision.attention``
auto). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "sequences", "pairs", "trees")
LETTERS = "abcdefghijklmnopqrstuvwxyz "


def synthetic_trees(path: Path, trees: int, seed: int = 0, question_tokens: int = 200, K: int = 64, C: int = 2,
                    max_depth: int = 8, step_tokens: int = 60) -> int:
    """Step pairs of ``trees`` random trees written as PreferencePair JSONL; returns max_length needed."""
    from sppd_megatron.records import PreferencePair, write_jsonl

    rng = random.Random(seed)
    text = lambda n: "".join(rng.choice(LETTERS) for _ in range(n - 2)) + "\n\n"  # noqa: E731
    records, longest = [], 0
    for t in range(trees):
        question = text(question_tokens)
        nodes = [("", 0)]  # (state text after the question, depth)
        for _ in range(K):
            open_nodes = [i for i, (_, d) in enumerate(nodes) if d < max_depth]
            state, depth = nodes[rng.choice(open_nodes)]
            children = [text(rng.randint(step_tokens - 15, step_tokens + 15)) for _ in range(C)]
            nodes += [(state + c, depth + 1) for c in children]
            records.append(PreferencePair(level="step", prompt=question, prefix=state, chosen=children[0],
                                          rejected=children[1], chosen_value=0.9, rejected_value=0.1,
                                          question_id=f"tree{t}", depth=depth + 1))
            longest = max(longest, len(question) + len(state) + max(map(len, children)) + 1)
    write_jsonl(path, records)
    return longest


def step_tokens(train_file: Path, max_length: int, packing: str, pack_length: int, gbs: int, steps: int) -> list[tuple[int, int]]:
    """(unique tokens, computed token positions) of each of the first ``steps`` steps (no model involved)."""
    from sppd_megatron.config import load_config
    from sppd_megatron.tokenization import build_char_tokenizer
    from sppd_megatron.training import data as tdata
    from sppd_megatron.training.batching import ExampleOrder, group_keys, microbatches_of
    from sppd_megatron.training.config import TrainConfig
    from sppd_megatron.training.packing import lay_out

    cfg = load_config(TrainConfig, REPO / "configs" / "tiny-cpu" / "step_dpo.yaml", _overrides(
        train_file, max_length, packing, pack_length, gbs, steps))
    tok = build_char_tokenizer()
    examples = tdata.load_examples(train_file, "step_dpo", tok, max_length, len(tok), need_values=True)
    order = ExampleOrder(group_keys(examples, cfg.data.group_by), len(examples), cfg.schedule.seed, cfg.data.shuffle)
    out = []
    for step in range(steps + 1):
        chosen = [examples[i] for i in order.step(step, gbs)]
        unique = len(lay_out([r for ex in chosen for r in ex.rows]))
        computed = sum(b["tokens"].numel() for b in microbatches_of(chosen, cfg, pad_id=0))
        out.append((unique, computed))
    return out[1:]


def _overrides(train_file, max_length, packing, pack_length, gbs, steps) -> list[str]:
    return [f"data.train_file={train_file}", f"data.max_length={max_length}", f"data.packing={packing}",
            f"data.pack_length={pack_length}", "data.group_by=tree", f"schedule.global_batch_size={gbs}",
            "schedule.micro_batch_size=1", f"schedule.train_steps={steps + 1}", "checkpoint.save_final=false",
            "logging.progress=false", "logging.tensorboard=false"]


def step_times(out: Path, train_file: Path, max_length: int, packing: str, pack_length: int, gbs: int,
               steps: int) -> list[float]:
    cmd = [sys.executable, "-m", "sppd_megatron", "train", "configs/tiny-cpu/step_dpo.yaml", f"output_dir={out}",
           *_overrides(train_file, max_length, packing, pack_length, gbs, steps)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows[1:]]  # the first step warms up


def bench(name: str, train_file: Path, max_length: int, gbs: int, pack_length: int, args, tmp: Path) -> None:
    print(f"\n{name}: global batch {gbs} pairs, max_length {max_length}, pack_length {pack_length}")
    print(f"{'packing':>10} {'unique tok/step':>16} {'computed/step':>14} {'computed/unique':>16} "
          f"{'s/step':>8} {'ms/pair':>8}")
    results = {}
    for mode in MODES:
        tokens = step_tokens(train_file, max_length, mode, pack_length, gbs, args.steps)
        unique = sum(u for u, _ in tokens) / len(tokens)
        computed = sum(c for _, c in tokens) / len(tokens)
        times = step_times(tmp / f"{name.split()[0]}-{mode}", train_file, max_length, mode, pack_length, gbs, args.steps)
        seconds = statistics.median(times)
        results[mode] = seconds
        print(f"{mode:>10} {unique:>16,.0f} {computed:>14,.0f} {computed / unique:>16.2f} {seconds:>8.2f} "
              f"{1000 * seconds / gbs:>8.1f}")
    print(f"tree-packed vs packed without sharing: {results['sequences'] / results['trees']:.2f}x faster per pair; "
          f"vs padded: {results['none'] / results['trees']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--pack-length", type=int, default=8192, help="bins of the synthetic trees (a tree fits one)")
    parser.add_argument("--demo-pairs", default=str(REPO / "runs" / "demo" / "iter1" / "pairs" / "step_pairs.jsonl"))
    args = parser.parse_args()
    import torch

    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        synthetic = tmp / "synthetic_step_pairs.jsonl"
        max_length = synthetic_trees(synthetic, trees=args.steps + 1)  # one tree per step
        bench("synthetic trees (K=64, C=2, 8 steps of ~60 tokens, 200-token question)", synthetic, max_length, 64,
              args.pack_length, args, tmp)
        demo = Path(args.demo_pairs)
        if demo.is_file():
            from sppd_megatron.records import PreferencePair, read_jsonl

            records = list(read_jsonl(demo, PreferencePair))
            longest = max(len(r.prompt) + len(r.prefix) + max(len(r.chosen), len(r.rejected)) for r in records) + 1
            # The demo's own recipe: bins of twice its max_length.
            bench(f"demo step pairs ({demo})", demo, longest, 16, 2 * longest, args, tmp)
        else:
            print(f"\n(no demo step pairs at {demo}: run ./run demo first, or pass --demo-pairs)")


if __name__ == "__main__":
    main()
