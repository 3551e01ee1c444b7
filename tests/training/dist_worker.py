"""torchrun worker: train tiny runs under several layouts in one launch, print their losses as JSON.

    torchrun --nproc-per-node N tests/training/dist_worker.py OUT_DIR SPECS_JSON

SPECS_JSON is a list of {"name", "config", "layout", "overrides"}; a layout is a key of LAYOUTS.
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

LAYOUTS = {  # name: (TP, PP, distributed optimizer, other parallel.* settings)
    "single": (1, 1, False, []),
    "tp2": (2, 1, False, []),
    "pp2": (1, 2, False, []),
    "dp2": (1, 1, False, []),
    "dp2dist": (1, 1, True, []),
    "dp2overlap": (1, 1, True, ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]),
    "pp2overlap": (1, 2, True, ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]),
    "recompute_full": (1, 1, False, ["parallel.recompute=full"]),
    "recompute_selective": (1, 1, False, ["parallel.recompute=selective"]),
    "tp2_recompute_full": (2, 1, False, ["parallel.recompute=full"]),
}


def main() -> None:
    import torch
    from megatron.core import parallel_state

    from sppd_megatron.config import load_config
    from sppd_megatron.training.config import TrainConfig
    from sppd_megatron.training.trainer import train

    out_dir, specs = sys.argv[1], json.loads(sys.argv[2])
    results = {}
    for spec in specs:
        tp, pp, dist_opt, settings = LAYOUTS[spec["layout"]]
        run_dir = f"{out_dir}/{spec['name']}"
        cfg = load_config(TrainConfig, spec["config"], [
            *spec.get("overrides", []),
            f"output_dir={run_dir}",
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
            f"parallel.use_distributed_optimizer={str(dist_opt).lower()}",
            *settings,
            "logging.progress=false",
            "logging.tensorboard=false",
        ])
        train(cfg)
        with open(f"{run_dir}/metrics.jsonl") as fh:
            results[spec["name"]] = [json.loads(line) for line in fh]
        parallel_state.destroy_model_parallel()
    if torch.distributed.get_rank() == 0:
        print("RESULTS " + json.dumps(results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
