"""Tiny Hugging Face models built in code (no download): for tests, benchmarks and the CPU demo.

They use the character tokenizer (:mod:`sppd_megatron.tokenization`), so vocab ids line up with it.
"""

from __future__ import annotations

from pathlib import Path


def tiny_hf_config(family: str = "llama", vocab_size: int = 101, hidden_size: int = 64,
                   num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                   intermediate_size: int = 128, max_position_embeddings: int = 1024,
                   tie_word_embeddings: bool | None = None, rope_theta: float = 10000.0):
    """A transformers config for a small Llama or Qwen2 (GQA; Qwen2 adds qkv bias and ties embeddings)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=bool(tie_word_embeddings), rope_parameters=rope)
    if family == "qwen2":
        tie = True if tie_word_embeddings is None else tie_word_embeddings
        return Qwen2Config(**common, tie_word_embeddings=tie, rope_parameters=rope)
    raise ValueError(f"unknown tiny model family {family!r} (llama or qwen2)")


def build_tiny_hf_model(family: str = "llama", seed: int = 0, **config_kwargs):
    """A randomly initialised fp32 causal LM, deterministic under ``seed``."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


def save_tiny_hf_checkpoint(out_dir: str | Path, family: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Write a tiny model + the character tokenizer as a normal HF directory (safetensors)."""
    from sppd_megatron.tokenization import build_char_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer()
    model = build_tiny_hf_model(family, seed=seed, vocab_size=len(tok), **config_kwargs)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
