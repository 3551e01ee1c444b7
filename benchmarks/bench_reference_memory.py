"""Peak memory of preference training with precomputed reference log-probs vs a co-resident reference model.

    .venv/bin/python benchmarks/bench_reference_memory.py [--hidden 512 --layers 8 --steps 4]

Runs the tiny step_dpo recipe (configs/tiny-cpu/step_dpo.yaml) with a wider model in two fresh processes and
prints each one's peak RSS, the part above a process that only imports and builds the same model, and their
ratio. A larger model makes the reference's share visible over the Python/torch runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(mode: str, out: str, hidden: int, layers: int, steps: int) -> None:
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from sppd_megatron.config import load_config
    from sppd_megatron.training.config import TrainConfig
    from sppd_megatron.training.trainer import train

    cfg = load_config(TrainConfig, REPO / "configs/tiny-cpu/step_dpo.yaml", [
        f"output_dir={out}", f"model.hidden_size={hidden}", f"model.num_layers={layers}",
        f"model.ffn_hidden_size={hidden * 2}", f"schedule.train_steps={steps}", "checkpoint.save_final=false",
        "logging.progress=false", "logging.tensorboard=false",
        f"loss.reference={'precomputed' if mode == 'baseline' else mode}",
        f"data.train_file={REPO / 'configs/tiny-cpu/data/step_pairs.jsonl'}", "optim.optimizer=adamw",
    ])
    if mode == "baseline":  # import + build one policy, no training: the runtime's own footprint
        from sppd_megatron.parallel import state as pstate
        from sppd_megatron.training.model import build_policy, resolve_model_and_tokenizer

        pstate.initialize(cfg.parallel, seed=0)
        build_policy(cfg, resolve_model_and_tokenizer(cfg)[0])
    else:
        train(cfg)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out, args.hidden, args.layers, args.steps)
        return
    peaks = {}
    for mode in ("baseline", "precomputed", "co_resident"):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--out", tmp, "--hidden", str(args.hidden),
                 "--layers", str(args.layers), "--steps", str(args.steps)],
                capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            peaks[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    base = peaks["baseline"]
    pre, co = peaks["precomputed"], peaks["co_resident"]
    print(f"model: hidden {args.hidden}, layers {args.layers}; {args.steps} step_dpo steps (AdamW, fp32)")
    print(f"peak RSS  baseline (import + one model): {base:8.1f} MiB")
    print(f"peak RSS  precomputed reference:        {pre:8.1f} MiB   (+{pre - base:.1f} over baseline)")
    print(f"peak RSS  co-resident reference:        {co:8.1f} MiB   (+{co - base:.1f} over baseline)")
    print(f"ratio co-resident / precomputed: total {co / pre:.3f}, above baseline {(co - base) / max(pre - base, 1e-9):.3f}")


if __name__ == "__main__":
    main()
