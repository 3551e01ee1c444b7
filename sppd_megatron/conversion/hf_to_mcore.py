"""Hugging Face directory -> sppd-megatron checkpoint, streaming tensor by tensor.

How the memory stays at about one tensor: a TP=1/PP=1 GPTModel is built on the ``meta`` device (no
storage), its ``sharded_state_dict()`` gives the exact keys, global shapes and offsets the trainer's
model will ask for, and each ShardedTensor's data is produced only when the dist-checkpoint writer
reaches it (:mod:`sync_writer`): read the HF tensors it needs from the memory-mapped safetensors,
regroup/pad them (:mod:`mapping`), write, drop. Dist checkpoints store global tensors, so this one
checkpoint loads at every TP/PP layout; ``--tp/--pp`` are validated against the architecture and
recorded as the suggested layout.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from sppd_megatron.conversion.errors import ConversionError
from sppd_megatron.conversion.hf_io import (
    DTYPES,
    HFTensorReader,
    check_hf_weights,
    copy_tokenizer_files,
    hf_source_dtype,
    read_hf_config,
)
from sppd_megatron.conversion.mapping import hf_to_mcore_tensor, te_key_renamer
from sppd_megatron.conversion.mcore_checkpoint import MODEL_SUBDIR, save_sharded_state_dict, write_checkpoint_meta
from sppd_megatron.models.config import ModelConfig

TOKENIZER_SUBDIR = "tokenizer"


@dataclass
class HfToMcoreOptions:
    """What ``convert hf-to-mcore`` writes."""

    tensor_model_parallel_size: int = 1
    """Layout the checkpoint is checked against and recorded for (it loads at any layout)."""
    pipeline_model_parallel_size: int = 1
    """As above, for pipeline stages."""
    dtype: str = "auto"
    """fp32, bf16, or auto: the source's ``torch_dtype`` (config.json), with fp16 stored as fp32 (exactly)."""
    overwrite: bool = False
    """Replace an existing non-empty output directory."""


def check_parallel_layout(model_cfg: ModelConfig, tp: int, pp: int, where: str) -> None:
    if tp < 1 or pp < 1:
        raise ConversionError(f"--tp and --pp must be >= 1 (got {tp}, {pp})")
    try:
        model_cfg.check_parallel(tp, pp)
    except ValueError as exc:
        raise ConversionError(f"{where}: {exc}") from None


def _contents(out: Path) -> list[Path]:
    """What ``out`` holds, but the lock of the command writing it."""
    from sppd_megatron.locking import LOCK_FILE

    return [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite`` (checked before anything is read or written)."""
    if _contents(out) and not overwrite:
        raise ConversionError(f"{out}: output directory is not empty; pass --overwrite or choose another --out")


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    check_output_dir(out, overwrite)
    for p in _contents(out):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def resolve_dtype(choice: str, hf_config: dict) -> str:
    """The stored dtype: ``fp32``/``bf16`` as asked; ``auto``: bf16 for a bf16 source, else fp32."""
    if choice not in ("auto", "fp32", "bf16"):
        raise ConversionError(f"--dtype {choice!r}: choose fp32, bf16 or auto")
    if choice != "auto":
        return choice
    return "bf16" if hf_source_dtype(hf_config) == torch.bfloat16 else "fp32"


def plan_conversion(hf_dir: Path, out: Path, options: HfToMcoreOptions) -> tuple[dict, ModelConfig, str]:
    """What every mapper checks before writing: (config.json, its ModelConfig, the stored dtype name)."""
    hf_config, model_cfg = read_hf_config(hf_dir)
    tp, pp = options.tensor_model_parallel_size, options.pipeline_model_parallel_size
    check_parallel_layout(model_cfg, tp, pp, str(hf_dir / "config.json"))
    dtype_name = resolve_dtype(options.dtype, hf_config)
    check_output_dir(out, options.overwrite)
    return hf_config, model_cfg, dtype_name


def convert_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, options: HfToMcoreOptions | None = None) -> Path:
    """Write ``out_dir`` (sppd_model.json + model/ + tokenizer/) from a HF checkpoint directory."""
    options = options or HfToMcoreOptions()
    hf_dir, out = Path(hf_dir), Path(out_dir)
    hf_config, model_cfg, dtype_name = plan_conversion(hf_dir, out, options)
    check_hf_weights(hf_dir, model_cfg)
    with HFTensorReader(hf_dir) as reader:
        prepare_output_dir(out, options.overwrite)
        write_streaming(reader, model_cfg, DTYPES[dtype_name], out / MODEL_SUBDIR)
    tokenizer_spec = None
    if copy_tokenizer_files(hf_dir, out / TOKENIZER_SUBDIR):
        tokenizer_spec = TOKENIZER_SUBDIR
    write_checkpoint_meta(
        out,
        model_cfg,
        tokenizer_spec,
        source=str(hf_dir.resolve()),
        dtype=dtype_name,
        hf_config=hf_config,
        suggested_parallel=(options.tensor_model_parallel_size, options.pipeline_model_parallel_size),
    )
    return out


def write_streaming(reader: HFTensorReader, model_cfg: ModelConfig, dtype: torch.dtype, model_dir: Path) -> None:
    """The dist checkpoint of ``model/``, each tensor produced from HF only when it is written."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from sppd_megatron.conversion.process import build_meta_model, single_process_megatron

    with single_process_megatron():
        model = build_meta_model(model_cfg, dtype)
        sharded = model.sharded_state_dict()
        te_name = te_key_renamer(model)
        lazy = {}
        for local_key, sh in sharded.items():
            produce = _producer(reader, model_cfg, te_name(local_key), tuple(sh.data.shape) if sh.data is not None else None)
            if isinstance(sh, ShardedTensor):
                lazy[(sh.key, tuple(sh.global_offset))] = produce
            elif isinstance(sh, ShardedTensorFactory):
                # A factory (SwiGLU's fc1: gate and up saved as separate pieces) turns one parameter
                # into several ShardedTensors: build them from the meta tensor for their keys, and
                # from the real tensor, once, when the writer reaches the first piece.
                pieces = [t for t in nested_values(sh.build()) if isinstance(t, ShardedTensor)]
                shared = _FactoryPieces(sh, produce, len(pieces))
                for i, piece in enumerate(pieces):
                    lazy[(piece.key, tuple(piece.global_offset))] = partial(shared.get, i)
        save_sharded_state_dict(sharded, model_dir, lazy=lazy)


class _FactoryPieces:
    """The pieces of one factory-built parameter, computed once and released after the last is written."""

    def __init__(self, factory, produce, count: int):
        self.factory, self.produce, self.count = factory, produce, count
        self.pieces: list[torch.Tensor] | None = None
        self.served = 0

    def get(self, i: int) -> torch.Tensor:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        if self.pieces is None:
            built = replace(self.factory, data=self.produce()).build()
            self.pieces = [t.data for t in nested_values(built) if isinstance(t, ShardedTensor)]
        piece = self.pieces[i]
        self.served += 1
        if self.served == self.count:
            self.pieces = None
        return piece


def _producer(reader: HFTensorReader, model_cfg: ModelConfig, key: str, shape: tuple[int, ...] | None):
    def produce() -> torch.Tensor:
        try:
            tensor = hf_to_mcore_tensor(reader.get, model_cfg, key, tp_rank=0, tp_size=1)
        except RuntimeError as exc:  # reshape of a tensor with the wrong size
            raise ConversionError(f"{reader.dir}: {key}: {exc}; the weights do not match config.json") from None
        if shape is not None and tuple(tensor.shape) != shape:
            raise ConversionError(
                f"{reader.dir}: {key} maps to shape {tuple(tensor.shape)}, the model needs {shape}; "
                "the weights do not match config.json"
            )
        return tensor

    return produce
