"""Shared by the conversion tests and their torchrun workers (imported from the script's directory)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = {
    # name: (tiny model family, edits to config.json after saving)
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    # Llama-3.1/3.2 style: rope scaling from the config, tied embeddings (as in the 1B/3B sizes).
    "llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64},
                         "tie_word_embeddings": True}),
}


def make_tiny_hf(out: Path, name: str) -> Path:
    from sppd_megatron.models.tiny import save_tiny_hf_checkpoint

    family, edits = FAMILIES[name]
    save_tiny_hf_checkpoint(out, family=family, seed=3, tie_word_embeddings=edits.get("tie_word_embeddings"))
    if edits:
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(edits)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def one_line_error(capsys, argv: list[str]) -> str:
    """``convert ARGV`` fails with exit status 2 and one line, ``sppd-megatron convert: error: ...``; returns it."""
    from sppd_megatron.conversion.cli import main as convert

    assert convert(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sppd-megatron convert: error: "), err
    return lines[0]


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: names differ: {sorted(set(a) ^ set(b))}"
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: not bit-exact: {bad[:5]}"


def sample_input_ids(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(4, vocab_size, (2, 23), generator=g)


def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits
