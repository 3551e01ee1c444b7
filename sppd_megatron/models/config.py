"""The architecture of a policy, independent of how it is split or stored.

One dataclass describes the Llama and Qwen2 families (Mistral-style configs are Llama here): RMSNorm,
SwiGLU, RoPE with theta (and Llama-3 frequency scaling), grouped-query attention, optional qkv bias,
tied or untied embeddings. :func:`model_config_from_hf` reads a Hugging Face ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (``rope_type: llama3`` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    """Decoder-only transformer architecture (Llama / Qwen2 families)."""

    family: str = "llama"
    """llama (also Mistral-style) or qwen2."""
    vocab_size: int = 101
    """Tokenizer vocabulary size (Megatron pads it to a multiple of tensor parallel size x 128 unless exact)."""
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """Key/value heads (GQA); equal to num_attention_heads for multi-head attention."""
    ffn_hidden_size: int = 128
    """SwiGLU intermediate size."""
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_epsilon: float = 1e-6
    qkv_bias: bool = False
    """Bias on the q, k, v projections (Qwen2)."""
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    """Per-head size; hidden_size / num_attention_heads when unset."""
    make_vocab_size_divisible_by: int = 128
    """Megatron pads the vocabulary to a multiple of this (and of TP size); padded logits are masked."""

    def __post_init__(self) -> None:
        if self.family not in ("llama", "qwen2"):
            raise ValueError(f"model.family {self.family!r} is not supported (llama, qwen2)")
        sizes = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                 "num_attention_heads": self.num_attention_heads, "num_query_groups": self.num_query_groups,
                 "ffn_hidden_size": self.ffn_hidden_size, "max_position_embeddings": self.max_position_embeddings,
                 "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
                 **({"head_dim": self.head_dim} if self.head_dim is not None else {})}
        bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if bad:
            raise ValueError(f"model sizes must be positive integers: {', '.join(bad)}")
        if not (self.rope_theta > 0 and self.norm_epsilon > 0):
            raise ValueError("model.rope_theta and model.norm_epsilon must be > 0")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads (or set head_dim)")

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise ValueError with a fix when a TP/PP layout cannot work for this architecture."""
        if self.num_attention_heads % tp:
            raise ValueError(
                f"tensor_model_parallel_size={tp} does not divide num_attention_heads="
                f"{self.num_attention_heads}; choose a divisor of it"
            )
        if self.num_query_groups % tp:
            raise ValueError(
                f"tensor_model_parallel_size={tp} does not divide num_query_groups (KV heads)="
                f"{self.num_query_groups}; choose a divisor of it"
            )
        if self.ffn_hidden_size % tp:
            raise ValueError(f"tensor_model_parallel_size={tp} does not divide ffn_hidden_size={self.ffn_hidden_size}")
        if self.padded_vocab_size % tp:
            raise ValueError(
                f"tensor_model_parallel_size={tp} does not divide the padded vocabulary "
                f"{self.padded_vocab_size}; set model.make_vocab_size_divisible_by to a multiple of {tp}"
            )
        if self.num_layers % pp:
            raise ValueError(
                f"pipeline_model_parallel_size={pp} does not divide num_layers={self.num_layers}; "
                "choose a divisor of it"
            )

    def to_hf_config_dict(self) -> dict[str, Any]:
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.family]
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {
                "rope_type": "llama3",
                "rope_theta": self.rope_theta,
                "factor": self.rope_scaling.factor,
                "low_freq_factor": self.rope_scaling.low_freq_factor,
                "high_freq_factor": self.rope_scaling.high_freq_factor,
                "original_max_position_embeddings": self.rope_scaling.original_max_position_embeddings,
            }
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_epsilon,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": rope,
            "hidden_act": "silu",
        }
        if self.head_dim is not None:
            d["head_dim"] = self.head_dim
        if self.family == "llama":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = False
        return d


def model_config_from_hf(hf: dict[str, Any] | str | Path) -> ModelConfig:
    """Build a ModelConfig from a HF config dict, a config.json path, or a checkpoint directory."""
    source = "config"
    if not isinstance(hf, dict):
        path = Path(hf)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no config.json; pass a Hugging Face checkpoint directory (config.json + *.safetensors)"
            )
        source = str(path)
        hf = json.loads(path.read_text())
    archs = hf.get("architectures") or []
    family = next((SUPPORTED_HF_ARCHITECTURES[a] for a in archs if a in SUPPORTED_HF_ARCHITECTURES), None)
    if family is None:
        family = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}.get(hf.get("model_type", ""))
    if family is None:
        raise ValueError(
            f"{source}: unsupported architecture {archs or hf.get('model_type')}; supported: "
            f"{sorted(SUPPORTED_HF_ARCHITECTURES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not SwiGLU (silu)")
    # transformers 5.x keeps rope settings in rope_parameters; 4.x in rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        )
    elif rope_type not in ("default", None):
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported (default, llama3)")
    if family == "llama" and hf.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim == hf["hidden_size"] // hf["num_attention_heads"]:
        head_dim = None
    return ModelConfig(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=int(hf["num_attention_heads"]),
        num_query_groups=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=bool(family == "qwen2" or hf.get("attention_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", family == "qwen2")),
        head_dim=head_dim,
    )
