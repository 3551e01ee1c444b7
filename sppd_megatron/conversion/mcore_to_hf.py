"""sppd-megatron checkpoint -> Hugging Face directory, one layer in memory at a time.

The checkpoint is read through a TP=1/PP=1 model built on the ``meta`` device: its sharded state
dict names every global tensor, and dist_checkpointing loads a subset of it (one layer's tensors)
per call, resharding from whatever layout wrote it. Each layer is mapped back to HF names
(:mod:`mapping`) and handed to the sharded safetensors writer, which flushes every ``max_shard_size``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from sppd_megatron.conversion.errors import ConversionError
from sppd_megatron.conversion.hf_io import (
    DTYPES,
    HF_DTYPE_NAMES,
    ShardedSafetensorsWriter,
    copy_tokenizer_files,
    parse_size,
    read_hf_config,
)
from sppd_megatron.conversion.hf_to_mcore import prepare_output_dir
from sppd_megatron.conversion.mapping import mcore_to_hf_stage, te_key_renamer
from sppd_megatron.conversion.mcore_checkpoint import (
    checkpoint_tokenizer_spec,
    config_differences,
    load_checkpoint_tensors,
    read_checkpoint_meta,
    read_checkpoint_model_config,
)
from sppd_megatron.models.config import ModelConfig

# Not part of the architecture: how Megatron pads the vocabulary for its own layout.
LAYOUT_ONLY_FIELDS = ("make_vocab_size_divisible_by",)


@dataclass
class McoreToHfOptions:
    """What ``convert mcore-to-hf`` writes."""

    hf_template: str | None = None
    """A HF directory of the same architecture: its config.json (weights replaced) and tokenizer files."""
    dtype: str | None = None
    """fp32 or bf16 for the safetensors; default: the dtype recorded in the checkpoint."""
    max_shard_size: str = "5GB"
    """Largest safetensors file (as in save_pretrained)."""
    overwrite: bool = False
    """Replace an existing non-empty output directory."""


def _check_template(ckpt: Path, model_cfg: ModelConfig, template: Path) -> dict:
    hf_config, template_cfg = read_hf_config(template)
    diffs = [d for d in config_differences(model_cfg, template_cfg) if d.split(":")[0] not in LAYOUT_ONLY_FIELDS]
    if diffs:
        raise ConversionError(
            f"{ckpt}: checkpoint is from a different model than --hf-template {template} "
            f"({'; '.join(diffs[:3])} [checkpoint vs template]); pass the template of the model that was converted"
        )
    return hf_config


def iter_checkpoint_hf_tensors(ckpt_dir: str | Path, model_cfg: ModelConfig, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for the whole checkpoint, loading one layer's tensors per step."""
    from sppd_megatron.conversion.process import build_meta_model, single_process_megatron

    with single_process_megatron():
        model = build_meta_model(model_cfg, dtype)
        sharded = model.sharded_state_dict()
        te_name = te_key_renamer(model)
        groups: dict[str, list[str]] = {}
        for key in sharded:
            if key.endswith("_extra_state"):
                continue
            m = re.match(r"decoder\.layers\.(\d+)\.", key)
            groups.setdefault(f"layer{m.group(1)}" if m else ("post" if "final" in key or "output" in key else "pre"), []).append(key)
        order = ["pre"] + [f"layer{i}" for i in range(model_cfg.num_layers)] + ["post"]
        for name in order:
            loaded = load_checkpoint_tensors(ckpt_dir, {k: sharded[k] for k in groups.get(name, [])})
            loaded = {te_name(k): v for k, v in loaded.items()}
            if name.startswith("layer"):
                i = int(name[5:])
                loaded = {k.replace(f"decoder.layers.{i}.", "decoder.layers.0.", 1): v for k, v in loaded.items()}
                yield from mcore_to_hf_stage([loaded], model_cfg, i, 1, False, False)
            else:
                yield from mcore_to_hf_stage([loaded], model_cfg, 0, 0, name == "pre", name == "post")


def convert_mcore_to_hf(ckpt_dir: str | Path, out_dir: str | Path, options: McoreToHfOptions | None = None) -> Path:
    """Write config.json, sharded safetensors (+ index) and tokenizer files for a checkpoint."""
    options = options or McoreToHfOptions()
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    meta = read_checkpoint_meta(ckpt)
    model_cfg = read_checkpoint_model_config(ckpt)
    template = Path(options.hf_template) if options.hf_template else None
    if template is not None:
        hf_config = _check_template(ckpt, model_cfg, template)
    else:
        hf_config = dict(meta.get("hf_config") or model_cfg.to_hf_config_dict())
    dtype_name = options.dtype or meta.get("dtype", "fp32")
    if dtype_name not in ("fp32", "bf16"):
        raise ConversionError(f"--dtype {dtype_name!r}: choose fp32 or bf16")
    dtype = DTYPES[dtype_name]
    max_bytes = parse_size(options.max_shard_size)
    prepare_output_dir(out, options.overwrite)

    writer = ShardedSafetensorsWriter(out, max_bytes)
    stored_dtype = DTYPES.get(meta.get("dtype", "fp32"), torch.float32)
    for name, tensor in iter_checkpoint_hf_tensors(ckpt, model_cfg, stored_dtype):
        writer.add(name, tensor.to(dtype))
    writer.finish()

    hf_config.pop("torch_dtype", None)
    hf_config["dtype"] = HF_DTYPE_NAMES[dtype]
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    write_tokenizer(out, template, checkpoint_tokenizer_spec(ckpt))
    return out


def write_tokenizer(out: Path, template: Path | None, tokenizer_spec: str | None) -> None:
    """Tokenizer files from the template, else from the checkpoint's recorded tokenizer."""
    if template is not None and copy_tokenizer_files(template, out):
        return
    if tokenizer_spec is None:
        return
    if tokenizer_spec.startswith("builtin:"):
        from sppd_megatron.tokenization import load_tokenizer

        load_tokenizer(tokenizer_spec).save_pretrained(out)
        return
    if not copy_tokenizer_files(tokenizer_spec, out):
        raise ConversionError(
            f"{tokenizer_spec}: recorded tokenizer directory has no tokenizer files; pass --hf-template DIR"
        )
