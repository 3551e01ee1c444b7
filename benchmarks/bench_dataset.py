"""Start-up time and memory of a training set of a million step pairs: Python lists vs the mapped arrays.

    .venv/bin/python benchmarks/bench_dataset.py [--pairs 1000000]

Writes ``--pairs`` random step pairs (character tokenizer: 40-char questions, 20-char prefixes,
20-char steps, 64 pairs per question) and measures, each in a fresh process:

- ``lists``: reading them as one list of Example objects (what every rank held before);
- ``build``: rank 0 streaming them into ``OUTPUT_DIR/dataset`` (TokenizedDataset.build);
- ``map``: any rank opening the built arrays, ordering epoch 0 by tree, and taking one step's
  examples (what every rank does at start-up).

Printed: wall seconds and peak RSS per process, and the arrays' size on disk (shared by every rank
through the page cache). Character ids are below 256, which CPython caches as shared int objects:
with a real vocabulary every token of the ``lists`` layout costs a 28-byte int as well as its 8-byte
list slot. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LETTERS = "abcdefghijklmnopqrstuvwxyz "


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    text = lambda k: "".join(rng.choice(LETTERS) for _ in range(k - 2)) + "\n\n"  # noqa: E731
    with path.open("w") as fh:
        for i in range(n):
            if i % 64 == 0:
                question = text(40)
            fh.write(json.dumps({"level": "step", "prompt": question, "prefix": text(20), "chosen": text(20),
                                 "rejected": text(20), "chosen_value": 0.9, "rejected_value": 0.1,
                                 "question_id": f"q{i // 64}", "schema_version": 1}) + "\n")


def child(mode: str, data: Path, out: Path) -> dict:
    from sppd_megatron.config import load_config
    from sppd_megatron.tokenization import build_char_tokenizer
    from sppd_megatron.training.config import TrainConfig

    tok = build_char_tokenizer()
    cfg = load_config(TrainConfig, REPO / "configs" / "tiny-cpu" / "step_dpo.yaml",
                      [f"data.train_file={data}", f"output_dir={out}"])
    start = time.perf_counter()
    if mode == "lists":
        from sppd_megatron.training.data import load_examples

        n = len(load_examples(data, "step_dpo", tok, 256, len(tok), need_values=True))
    elif mode == "build":
        from sppd_megatron.training.dataset import training_dataset

        n = len(training_dataset(cfg, tok, len(tok), need_values=True))
    else:
        from sppd_megatron.training.batching import ExampleOrder
        from sppd_megatron.training.dataset import TokenizedDataset

        dataset = TokenizedDataset.open(out / "dataset")
        order = ExampleOrder(dataset.group_keys("tree"), len(dataset), seed=0, shuffle=True)
        step = [dataset[i] for i in order.step(0, 64)]
        n = len(dataset) if step else 0
    return {"examples": n, "seconds": time.perf_counter() - start,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data = tmp / "pairs.jsonl"
        t0 = time.perf_counter()
        write_pairs(data, args.pairs)
        print(f"{args.pairs:,} step pairs, {data.stat().st_size / 2**20:.0f} MiB of JSONL "
              f"(written in {time.perf_counter() - t0:.0f} s)")
        print(f"{'process':>8} {'seconds':>9} {'peak RSS GiB':>13}")
        for mode in ("lists", "build", "map"):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, str(data), str(tmp / "run")],
                                  capture_output=True, text=True, cwd=REPO)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[len("RESULT "):])
            print(f"{mode:>8} {r['seconds']:>9.1f} {r['peak_rss_gib']:>13.2f}")
        size = sum(p.stat().st_size for p in (tmp / "run" / "dataset").glob("*.npy"))
        print(f"arrays on disk (mapped, shared by every rank): {size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
