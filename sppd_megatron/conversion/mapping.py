"""Weight mapping between Hugging Face Llama/Qwen2 checkpoints and Megatron GPTModel shards.

Tensor by tensor, so a 70B model converts while holding one layer's tensors at a time:
- q/k/v -> ``linear_qkv``: rows regrouped per query group as [q heads of the group; k; v], and
  tensor parallelism splits whole groups;
- gate/up -> ``linear_fc1``: each TP shard holds [its slice of gate; its slice of up];
- o_proj -> ``linear_proj`` and down_proj -> ``linear_fc2``: row-parallel, split on dim 1;
- embeddings / lm_head: vocabulary-parallel, split on dim 0 after padding the vocabulary to
  ``ModelConfig.padded_vocab_size`` (padded rows are zero; their logits are masked in the loss);
- norms are replicated.

Megatron keys are spoken in TransformerEngine's names, whichever layer spec the model was built
with. TE fuses each pre-norm into the linear layer after it (``self_attention.linear_qkv.layer_norm_weight``,
``mlp.linear_fc1.layer_norm_weight``); megatron's local spec keeps them as modules of their own
(``input_layernorm``, ``pre_mlp_layernorm``) and declares the renaming to TE's names in its
``sharded_state_dict_keys_map``, which is why dist checkpoints carry TE names under both specs.
:func:`te_key_renamer` applies a model's own declaration to its state-dict keys, so one mapping
serves both specs and a checkpoint written under one loads under the other.

megatron-bridge does this on GPU machines where it installs; it cannot install on CPU (needs TE),
so this built-in mapping is the path tested here against transformers' logits.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

from sppd_megatron.models.config import ModelConfig

TensorGetter = Callable[[str], torch.Tensor]


def _qkv_full(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HF q [nh*hd, ...], k/v [ng*hd, ...] -> Megatron's grouped [ng, (q_per_g + 2) * hd, ...]."""
    ng, hd = cfg.num_query_groups, cfg.kv_channels
    qpg = cfg.num_attention_heads // ng
    rest = q.shape[1:]
    q = q.reshape(ng, qpg * hd, *rest)
    k = k.reshape(ng, hd, *rest)
    v = v.reshape(ng, hd, *rest)
    return torch.cat([q, k, v], dim=1)  # [ng, (qpg+2)*hd, ...]


def _qkv_split(cfg: ModelConfig, grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ng, hd = cfg.num_query_groups, cfg.kv_channels
    qpg = cfg.num_attention_heads // ng
    rest = grouped.shape[2:]
    q, k, v = torch.split(grouped, [qpg * hd, hd, hd], dim=1)
    return q.reshape(ng * qpg * hd, *rest), k.reshape(ng * hd, *rest), v.reshape(ng * hd, *rest)


def pad_vocab(t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    extra = cfg.padded_vocab_size - t.shape[0]
    if extra == 0:
        return t
    return torch.cat([t, t.new_zeros((extra, *t.shape[1:]))], dim=0)


def hf_layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "input_layernorm": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj",
        "k": p + "self_attn.k_proj",
        "v": p + "self_attn.v_proj",
        "o": p + "self_attn.o_proj.weight",
        "post_attention_layernorm": p + "post_attention_layernorm.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }


LAYER_KEYS = (
    "self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias",
    "self_attention.linear_proj.weight",
    "mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)
_LAYER_KEY = re.compile(r"(decoder\.layers\.\d+\.)(.*)")


def te_key_renamer(model: torch.nn.Module) -> Callable[[str], str]:
    """A function from ``model``'s state-dict keys to TE names (the identity under the TE spec).

    Uses the renaming the model's layer spec declares for dist checkpoints
    (``TransformerLayerSubmodules.sharded_state_dict_keys_map``), applied as megatron applies it.
    """
    layers = model.decoder.layers if getattr(model, "decoder", None) is not None else []
    keys_map = dict(layers[0].submodules_config.sharded_state_dict_keys_map) if len(layers) else {}

    def rename(key: str) -> str:
        match = _LAYER_KEY.match(key)
        if match:
            prefix, rest = match.groups()
            for old, new in keys_map.items():
                if rest.startswith(old):
                    return prefix + new + rest[len(old):]
        return key

    return rename


def te_named_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (keys as in ``model.state_dict()``) with its keys in TE names."""
    rename = te_key_renamer(model)
    return {rename(k): v for k, v in state.items()}


def mcore_local_keys(
    cfg: ModelConfig, num_local_layers: int, pre_process: bool, post_process: bool
) -> list[str]:
    """The Megatron keys (TE names) of one pipeline stage's weights (the output layer only when untied)."""
    keys = ["embedding.word_embeddings.weight"] if pre_process else []
    for local in range(num_local_layers):
        keys += [
            f"decoder.layers.{local}.{k}" for k in LAYER_KEYS if cfg.qkv_bias or not k.endswith(".bias")
        ]
    if post_process:
        keys.append("decoder.final_layernorm.weight")
        if not cfg.tie_word_embeddings:
            keys.append("output_layer.weight")
    return keys


def hf_to_mcore_tensor(
    get: TensorGetter, cfg: ModelConfig, key: str, tp_rank: int, tp_size: int, layer_offset: int = 0
) -> torch.Tensor:
    """One Megatron tensor (``key`` in TE names, layers numbered within the stage) for one TP rank.

    Reads only the HF tensors that this key needs, so callers can produce tensors in any order and
    keep one at a time in memory.
    """

    def chunk(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return torch.chunk(t, tp_size, dim=dim)[tp_rank].contiguous()

    if key == "embedding.word_embeddings.weight":
        return chunk(pad_vocab(get("model.embed_tokens.weight"), cfg))
    if key == "output_layer.weight":
        name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        return chunk(pad_vocab(get(name), cfg))
    if key == "decoder.final_layernorm.weight":
        return get("model.norm.weight")
    parts = key.split(".", 3)
    if parts[:2] != ["decoder", "layers"] or len(parts) != 4:
        raise KeyError(f"no Hugging Face tensor maps to Megatron key {key!r}")
    n = hf_layer_names(layer_offset + int(parts[2]))
    suffix = parts[3]
    if suffix == "self_attention.linear_qkv.layer_norm_weight":
        return get(n["input_layernorm"])
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        grouped = _qkv_full(cfg, get(f"{n['q']}.{kind}"), get(f"{n['k']}.{kind}"), get(f"{n['v']}.{kind}"))
        return chunk(grouped).reshape(-1, cfg.hidden_size) if kind == "weight" else chunk(grouped).reshape(-1)
    if suffix == "self_attention.linear_proj.weight":
        return chunk(get(n["o"]), dim=1)
    if suffix == "mlp.linear_fc1.layer_norm_weight":
        return get(n["post_attention_layernorm"])
    if suffix == "mlp.linear_fc1.weight":
        return torch.cat([chunk(get(n["gate"])), chunk(get(n["up"]))], dim=0)
    if suffix == "mlp.linear_fc2.weight":
        return chunk(get(n["down"]), dim=1)
    raise KeyError(f"no Hugging Face tensor maps to Megatron key {key!r}")


def hf_to_mcore_shard(
    get: TensorGetter,
    cfg: ModelConfig,
    tp_rank: int,
    tp_size: int,
    layer_offset: int,
    num_local_layers: int,
    pre_process: bool,
    post_process: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megatron local key, tensor) for one TP rank of one pipeline stage."""
    for key in mcore_local_keys(cfg, num_local_layers, pre_process, post_process):
        yield key, hf_to_mcore_tensor(get, cfg, key, tp_rank, tp_size, layer_offset)


def mcore_to_hf_layer(
    shards: list[dict[str, torch.Tensor]], cfg: ModelConfig, local: int, global_index: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Merge one layer's TP shards (``shards[r]`` = rank r's state, TE names) into HF tensors."""
    m = f"decoder.layers.{local}."
    n = hf_layer_names(global_index)
    tp = len(shards)
    yield n["input_layernorm"], shards[0][m + "self_attention.linear_qkv.layer_norm_weight"]
    ng_local = cfg.num_query_groups // tp
    grouped = torch.cat(
        [s[m + "self_attention.linear_qkv.weight"].reshape(ng_local, -1, cfg.hidden_size) for s in shards], dim=0
    )
    q, k, v = _qkv_split(cfg, grouped)
    yield n["q"] + ".weight", q
    yield n["k"] + ".weight", k
    yield n["v"] + ".weight", v
    if cfg.qkv_bias:
        gb = torch.cat([s[m + "self_attention.linear_qkv.bias"].reshape(ng_local, -1) for s in shards], dim=0)
        qb, kb, vb = _qkv_split(cfg, gb)
        yield n["q"] + ".bias", qb
        yield n["k"] + ".bias", kb
        yield n["v"] + ".bias", vb
    yield n["o"], torch.cat([s[m + "self_attention.linear_proj.weight"] for s in shards], dim=1)
    yield n["post_attention_layernorm"], shards[0][m + "mlp.linear_fc1.layer_norm_weight"]
    halves = [torch.chunk(s[m + "mlp.linear_fc1.weight"], 2, dim=0) for s in shards]
    yield n["gate"], torch.cat([h[0] for h in halves], dim=0)
    yield n["up"], torch.cat([h[1] for h in halves], dim=0)
    yield n["down"], torch.cat([s[m + "mlp.linear_fc2.weight"] for s in shards], dim=1)


def mcore_to_hf_embeddings(
    shards: list[dict[str, torch.Tensor]], cfg: ModelConfig, key: str
) -> torch.Tensor:
    """Merge a vocabulary-parallel tensor and drop the padded rows."""
    return torch.cat([s[key] for s in shards], dim=0)[: cfg.vocab_size]


def load_hf_into_model(model: torch.nn.Module, get: TensorGetter, cfg: ModelConfig) -> None:
    """Copy HF weights into this rank's Megatron stage (parallel_state must be initialised)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    num_local = len(model.decoder.layers)
    offset = model.decoder.layers[0].layer_number - 1 if num_local else 0
    state = te_named_state(model, model.state_dict())
    seen = set()
    with torch.no_grad():
        for key, tensor in hf_to_mcore_shard(
            get, cfg, tp_rank, tp_size, offset, num_local, model.pre_process, model.post_process
        ):
            if key not in state:
                raise KeyError(f"mapping produced {key!r}, which this Megatron model does not have")
            if state[key].shape != tensor.shape:
                raise ValueError(
                    f"{key}: checkpoint tensor {tuple(tensor.shape)} does not fit the model's "
                    f"{tuple(state[key].shape)}; is the checkpoint from a different model config?"
                )
            state[key].copy_(tensor.to(state[key].dtype))
            seen.add(key)
        # Tied embeddings on a last stage without the first: Megatron keeps a copy of the word
        # embeddings as output weight; it is synchronised from stage 0 at DDP setup, but fill it
        # here too so forward-only use (no DDP) is correct.
        if model.post_process and cfg.tie_word_embeddings and not model.pre_process:
            key = "output_layer.weight"
            if key in state:
                state[key].copy_(
                    torch.chunk(pad_vocab(get("model.embed_tokens.weight"), cfg), tp_size)[tp_rank].to(state[key].dtype)
                )
                seen.add(key)
    missing = [k for k in state if k not in seen and not k.endswith("_extra_state") and not k.startswith("value_head")]
    if missing:
        raise KeyError(f"the HF checkpoint did not provide {missing}")


def mcore_to_hf_stage(
    shards: list[dict[str, torch.Tensor]],
    cfg: ModelConfig,
    layer_offset: int,
    num_local_layers: int,
    pre_process: bool,
    post_process: bool,
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs of one pipeline stage, merging its TP shards (``shards[r]`` = rank r's)."""
    if pre_process:
        yield "model.embed_tokens.weight", mcore_to_hf_embeddings(shards, cfg, "embedding.word_embeddings.weight")
    for local in range(num_local_layers):
        yield from mcore_to_hf_layer(shards, cfg, local, layer_offset + local)
    if post_process:
        yield "model.norm.weight", shards[0]["decoder.final_layernorm.weight"]
        if not cfg.tie_word_embeddings:
            yield "lm_head.weight", mcore_to_hf_embeddings(shards, cfg, "output_layer.weight")
