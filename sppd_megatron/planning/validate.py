"""Reject parallel layouts that cannot work, with a message that says what to change.

``validate_layout`` checks a TP/PP/DP split against an architecture, a cluster shape and the batch
sizes; ``validate_recipe`` does the same for a training recipe, finding its architecture even when
the checkpoint is not on this machine (sppd_megatron/planning/architectures.py) and its cluster shape
from the recipe's file name (``sft-1n8g-tp2pp1.yaml``: 1 node x 8 GPUs, TP=2, PP=1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from sppd_megatron.models.config import ModelConfig
from sppd_megatron.planning.architectures import ALIASES, architecture_for_checkpoint, known_architecture

RECIPE_NAME = re.compile(r"-(?P<nodes>\d+)n(?P<gpus>\d+)g-tp(?P<tp>\d+)pp(?P<pp>\d+)$")
"""Layout suffix of a recipe file name: ``<stage>-<nodes>n<gpus per node>g-tp<T>pp<P>``."""


@dataclass
class Layout:
    """A validated split of ``nodes x gpus_per_node`` GPUs."""

    tp: int
    pp: int
    nodes: int
    gpus_per_node: int
    dp: int
    num_microbatches: int
    """Micro-batches per optimizer step on each data-parallel rank."""
    warnings: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def validate_layout(model: ModelConfig, tp: int, pp: int, nodes: int, gpus_per_node: int,
                    global_batch_size: int, micro_batch_size: int) -> Layout:
    """The layout's data-parallel size and warnings; ValueError naming the fix when it cannot work."""
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("nodes", nodes), ("gpus_per_node", gpus_per_node),
                        ("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    world = nodes * gpus_per_node
    if world % (tp * pp):
        raise ValueError(
            f"TP x PP = {tp} x {pp} = {tp * pp} does not divide the {world} GPUs ({nodes} node(s) x "
            f"{gpus_per_node}); choose TP x PP among the divisors of {world}"
        )
    try:
        model.check_parallel(tp, pp)
    except ValueError as exc:
        raise ValueError(
            f"{exc} (model: {model.num_layers} layers, {model.num_attention_heads} heads, "
            f"{model.num_query_groups} KV heads, padded vocabulary {model.padded_vocab_size})"
        ) from None
    dp = world // (tp * pp)
    if global_batch_size % (micro_batch_size * dp):
        raise ValueError(
            f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size x data-parallel size "
            f"= {micro_batch_size} x {dp} = {micro_batch_size * dp} (DP = {world} GPUs / (TP {tp} x PP {pp})); "
            f"use a global batch of k x {micro_batch_size * dp}"
        )
    layout = Layout(tp, pp, nodes, gpus_per_node, dp, global_batch_size // (micro_batch_size * dp))
    if tp > gpus_per_node or gpus_per_node % tp:
        layout.warnings.append(
            f"TP={tp} spans nodes ({gpus_per_node} GPUs per node): tensor-parallel all-reduces would cross "
            "the inter-node network every layer; keep TP within a node and raise PP instead"
        )
    if pp > 1 and layout.num_microbatches < pp:
        layout.warnings.append(
            f"{layout.num_microbatches} micro-batch(es) per step with PP={pp}: the 1F1B pipeline is mostly "
            f"bubble; use at least {pp} micro-batches per data-parallel rank"
        )
    return layout


def layout_from_recipe_name(path: str | Path) -> dict[str, int] | None:
    """``{nodes, gpus_per_node, tp, pp}`` from a recipe file name, or None without the suffix."""
    match = RECIPE_NAME.search(Path(path).stem)
    if not match:
        return None
    return {"nodes": int(match["nodes"]), "gpus_per_node": int(match["gpus"]),
            "tp": int(match["tp"]), "pp": int(match["pp"])}


def resolve_architecture(cfg, recipe_path: str | Path | None = None, arch: str | None = None) -> ModelConfig:
    """The architecture a TrainConfig trains, without needing its weights on this machine.

    In order: ``arch`` (a known name), the config's ``model`` section, the init checkpoint's own
    config when present, then a known model or recipe-directory name among the components of
    ``init.path`` and of the recipe's path.
    """
    if arch:
        return known_architecture(arch)
    if cfg.model is not None:
        return cfg.model
    init_path = Path(cfg.init.path)
    if cfg.init.source == "hf" and (init_path / "config.json").is_file():
        return architecture_for_checkpoint(init_path)
    if cfg.init.source == "mcore" and init_path.exists():
        from sppd_megatron.conversion.mcore_checkpoint import read_checkpoint_model_config

        return read_checkpoint_model_config(init_path)
    candidates = list(init_path.parts)[::-1] + (list(Path(recipe_path).parts)[::-1] if recipe_path else [])
    for part in candidates:
        if part.lower() in ALIASES:
            return known_architecture(part)
    raise ValueError(
        f"cannot tell the architecture of init.path={cfg.init.path}: it is not on this machine and no "
        f"known name ({sorted(ALIASES)}) is in it or in the recipe's path; pass --arch"
    )


def validate_recipe(cfg, recipe_path: str | Path | None = None, nodes: int | None = None,
                    gpus_per_node: int | None = None, arch: str | None = None) -> tuple[ModelConfig, Layout]:
    """Check a TrainConfig's layout; nodes/GPUs default to the recipe name's (else 1 x TP*PP)."""
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    named = layout_from_recipe_name(recipe_path) if recipe_path else None
    if named and (named["tp"], named["pp"]) != (tp, pp):
        raise ValueError(
            f"{recipe_path}: the file name says tp{named['tp']}pp{named['pp']} but parallel sets "
            f"tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp}; rename the file or fix it"
        )
    nodes = nodes or (named["nodes"] if named else 1)
    gpus_per_node = gpus_per_node or (named["gpus_per_node"] if named else tp * pp)
    model = resolve_architecture(cfg, recipe_path, arch)
    packed = cfg.data.packing != "none"
    # Packed micro-batches are bins, not examples: the step's examples need only split evenly over DP.
    layout = validate_layout(model, tp, pp, nodes, gpus_per_node, cfg.schedule.global_batch_size,
                             1 if packed else cfg.schedule.micro_batch_size)
    if packed:
        from sppd_megatron.planning.memory import packed_microbatches

        layout.num_microbatches = packed_microbatches(cfg, layout.dp)
    return model, layout
