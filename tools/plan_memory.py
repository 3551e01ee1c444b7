"""Validate a recipe's layout and print its per-GPU memory (see sppd_megatron/planning/cli.py).

    python tools/plan_memory.py configs/recipes/llama3-70b/sft-4n8g-tp8pp4.yaml [--check]
    torchrun --nproc-per-node 2 tools/plan_memory.py configs/tiny-cpu/sft.yaml \
        parallel.tensor_model_parallel_size=2 --measure
"""

import sys

from sppd_megatron.planning.cli import main

if __name__ == "__main__":  # dist_checkpointing's writer process re-imports the main module
    raise SystemExit(main(sys.argv[1:]))
