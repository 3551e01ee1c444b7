#!/usr/bin/env bash
# Launch an sppd-megatron stage from the project root:
#   launch/torchrun.sh VERB RECIPE [dotted.key=value ...]
#
# Training verbs (train, precompute-ref) run under torchrun, one worker per GPU (gloo processes on a
# CPU machine); the others (sample, score, pairs, eval, convert, run) run one process on this node,
# which owns all its GPUs (sample starts its SGLang engines in that process).
#
# Single node:  launch/torchrun.sh train configs/recipes/qwen2.5-7b-base/sft-1n8g-tp2pp1.yaml
#               NPROC_PER_NODE=2 launch/torchrun.sh train configs/tiny-cpu/sft.yaml   (CPU)
# Multi-node:   on every node, with the same MASTER_ADDR (node 0) and its own NODE_RANK:
#               NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh train \
#                   configs/recipes/llama3-70b/sft-4n8g-tp8pp4.yaml
#               (under `srun --ntasks-per-node=1`, SLURM_NNODES / SLURM_NODEID fill NNODES / NODE_RANK.)
#
# Environment: NPROC_PER_NODE (default: the recipe name's -<N>n<G>g- G, else the GPUs nvidia-smi
# lists, else 1), NNODES (default SLURM_NNODES, else the name's N, else 1), NODE_RANK (SLURM_NODEID
# or 0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON (.venv/bin/python when present),
# DRYRUN=1 prints the command instead of running it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

if [ $# -lt 2 ]; then
  awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"
  exit 2
fi
VERB="$1"; RECIPE="$2"; shift 2
if [ ! -f "$RECIPE" ]; then
  echo "error: $RECIPE: no such recipe (paths are relative to $ROOT)" >&2
  exit 2
fi

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# -<nodes>n<gpus>g- in the recipe's file name (sft-4n8g-tp8pp4.yaml -> 4, 8)
NAME_NODES=""; NAME_GPUS=""
if [[ "$(basename "$RECIPE")" =~ -([0-9]+)n([0-9]+)g-tp[0-9]+pp[0-9]+\.ya?ml$ ]]; then
  NAME_NODES="${BASH_REMATCH[1]}"; NAME_GPUS="${BASH_REMATCH[2]}"
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if [ -n "$NAME_GPUS" ]; then
    NPROC_PER_NODE="$NAME_GPUS"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC_PER_NODE="$(nvidia-smi -L | wc -l)"
  else
    NPROC_PER_NODE=1
  fi
fi
NNODES="${NNODES:-${SLURM_NNODES:-${NAME_NODES:-1}}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

case "$VERB" in
  train|precompute-ref)
    CMD=("$PYTHON" -m torch.distributed.run
         --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC_PER_NODE"
         --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"
         -m sppd_megatron "$VERB" "$RECIPE" "$@")
    ;;
  sample|score|pairs|eval|convert|run|demo)
    CMD=("$PYTHON" -m sppd_megatron "$VERB" "$RECIPE" "$@")
    ;;
  *)
    echo "error: unknown verb '$VERB' (train, precompute-ref, sample, score, pairs, eval, convert, run)" >&2
    exit 2
    ;;
esac

if [ "${DRYRUN:-0}" = "1" ]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
