"""``python tools/plan_memory.py RECIPE.yaml [dotted.key=value ...] [options]``

Validates a training recipe's layout and prints its per-GPU memory per pipeline stage. The cluster
shape comes from the recipe's name (``sft-1n8g-tp2pp1.yaml``) unless ``--nodes`` / ``--gpus-per-node``
say otherwise. ``--check`` exits 1 when the peak stage does not fit the GPU. ``--measure`` instead
runs the recipe here (CPU; one process or under torchrun) and prints the plan next to the bytes the
Megatron objects really hold (sppd_megatron/planning/measure.py).
"""

from __future__ import annotations

import argparse
import json
import warnings

from sppd_megatron.config import USER_ERRORS, load_config, report_error
from sppd_megatron.planning.memory import GIB, format_plan, inputs_for_recipe, plan_memory
from sppd_megatron.planning.validate import validate_recipe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plan_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="TrainConfig YAML (configs/recipes/... or configs/tiny-cpu/...)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, as for sppd-megatron train")
    p.add_argument("--nodes", type=int, help="nodes (default: from the recipe name, else 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: from the recipe name, else TP x PP)")
    p.add_argument("--arch", help="known architecture when the checkpoint is not here (Qwen2.5-7B, Llama-3.1-8B, ...)")
    p.add_argument("--layers", choices=["auto", "te", "local"], default="auto",
                   help="layer implementation planned for: auto is local for transformer_impl=local (and "
                        "with --measure), TransformerEngine (flash attention) otherwise")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    p.add_argument("--overhead-gib", type=float, default=4.0,
                   help="CUDA context, NCCL buffers, allocator fragmentation (default 4)")
    p.add_argument("--check", action="store_true", help="exit 1 when the peak stage does not fit")
    p.add_argument("--json", metavar="PATH", help="also write the plan (and measurement) as JSON")
    p.add_argument("--measure", action="store_true",
                   help="run the recipe here and compare the plan with the measured tensors (tiny recipes)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from sppd_megatron.training.config import TrainConfig

    try:
        cfg = load_config(TrainConfig, args.recipe, args.overrides)
        if args.measure:
            from sppd_megatron.parallel.state import world_size_from_env

            args.nodes, args.gpus_per_node = 1, world_size_from_env()
        model, layout = validate_recipe(cfg, args.recipe, args.nodes, args.gpus_per_node, args.arch)
    except USER_ERRORS as exc:
        return report_error("sppd-megatron plan", exc)
    te = None if args.layers == "auto" else args.layers == "te"
    if args.measure:
        te = False  # this machine runs the local spec
    plan = plan_memory(inputs_for_recipe(cfg, model, layout.dp, layout.num_microbatches, te))
    if args.measure:
        return _measure(cfg, plan, args.json)
    print(f"{args.recipe}: {layout.nodes} node(s) x {layout.gpus_per_node} GPUs")
    for w in layout.warnings:
        print(f"warning: {w}")
    print(format_plan(plan, args.gpu_memory_gib, args.overhead_gib))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(plan.as_dict() | {"layout": layout.__dict__}, fh, indent=1, default=str)
    fits = plan.peak.total / GIB + args.overhead_gib <= args.gpu_memory_gib
    return 1 if args.check and not fits else 0


def _measure(cfg, plan, json_path: str | None) -> int:
    """Train the recipe here and print planned vs measured bytes per rank (rank 0 prints)."""
    warnings.filterwarnings("ignore")
    import torch

    from sppd_megatron.parallel.state import destroy, is_rank0
    from sppd_megatron.planning.measure import measured_training

    try:
        mine = measured_training(cfg)
        ranks = [mine]
        if torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        rank0 = is_rank0()
    finally:
        destroy()
    if not rank0:
        return 0
    rows = []
    for r in ranks:
        stage = plan.stages[r["pp_rank"]]
        rows.append({
            "rank": r, "planned": {"parameters": stage.parameters, "weights": stage.weights, "grads": stage.grads,
                                   "optimizer": stage.optimizer, "activations+logits": stage.activations + stage.logits},
        })
        print(f"tp{r['tp_rank']} pp{r['pp_rank']} dp{r['dp_rank']}: "
              f"weights {stage.weights}/{r['weights']}  grads {stage.grads}/{r['grads']}  "
              f"optimizer {stage.optimizer}/{r['optimizer']}  (planned/measured bytes)  "
              f"activations+logits {(stage.activations + stage.logits) / 2**20:.2f} MiB planned, "
              f"{r['activations_saved_peak'] / 2**20:.2f} MiB saved-for-backward peak, "
              f"{r['rss_growth_during_training'] / 2**20:.1f} MiB peak-RSS growth")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0
