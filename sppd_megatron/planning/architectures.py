"""Architectures of the recipes' models, from their Hugging Face ``config.json`` values.

The validator and the memory planner need layers, heads, KV heads, hidden, FFN and vocabulary sizes
before any weights exist on the machine. A recipe names its checkpoint directory (``init.path``);
when that directory is present its own config.json wins, otherwise the directory's name is looked up
here. The values are copied from the published config.json files (only architecture fields).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sppd_megatron.models.config import ModelConfig, model_config_from_hf

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

HF_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen2.5-7B": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    "Llama-3.1-8B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rope_scaling": _LLAMA3_ROPE, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    },
    "Llama-3-70B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}
"""Published config.json architecture fields; Instruct variants share their base model's."""

ALIASES: dict[str, str] = {
    "qwen2.5-7b": "Qwen2.5-7B",
    "qwen2.5-7b-instruct": "Qwen2.5-7B",
    "llama-3.1-8b": "Llama-3.1-8B",
    "llama-3.1-8b-instruct": "Llama-3.1-8B",
    "meta-llama-3.1-8b": "Llama-3.1-8B",
    "meta-llama-3.1-8b-instruct": "Llama-3.1-8B",
    "llama-3-70b": "Llama-3-70B",
    "llama-3-70b-instruct": "Llama-3-70B",
    "meta-llama-3-70b": "Llama-3-70B",
    "meta-llama-3-70b-instruct": "Llama-3-70B",
    # recipe directories (configs/recipes/<name>/) and their run directories (runs/<name>/)
    "qwen2.5-7b-base": "Qwen2.5-7B",
    "llama3.1-8b-instruct": "Llama-3.1-8B",
    "llama3-70b": "Llama-3-70B",
}
"""Checkpoint and recipe directory names (lower case) -> architecture."""


def known_architecture(name: str) -> ModelConfig:
    """ModelConfig of a known model, by architecture name or checkpoint directory name."""
    key = ALIASES.get(name.lower(), name)
    if key not in HF_CONFIGS:
        raise KeyError(
            f"unknown architecture {name!r}; known: {sorted(HF_CONFIGS)} (or checkpoint names {sorted(ALIASES)})"
        )
    return model_config_from_hf(HF_CONFIGS[key])


def architecture_for_checkpoint(path: str | Path) -> ModelConfig:
    """The architecture of a Hugging Face checkpoint: its config.json if present, else its name."""
    path = Path(path)
    if (path / "config.json").is_file():
        return model_config_from_hf(path)
    try:
        return known_architecture(path.name)
    except KeyError as exc:
        raise ValueError(
            f"{path}: no config.json here and {path.name!r} is not a known architecture; "
            f"pass --arch with one of {sorted(HF_CONFIGS)}"
        ) from exc
