"""The Megatron checkpoint format of sppd-megatron: one definition, used by the converter and the trainer.

A checkpoint directory holds

- ``sppd_model.json``: ``{"format_version": 1, "model": ModelConfig as a dict, "tokenizer": a path
  (relative paths are relative to the checkpoint) or "builtin:char", "source": where the weights came
  from, "dtype": "fp32" | "bf16", "hf_config": the source config.json or null, "suggested_parallel":
  {"tensor_model_parallel_size", "pipeline_model_parallel_size"}}``;
- ``model/``: a megatron-core dist checkpoint (torch_dist backend) of ``GPTModel.sharded_state_dict()``.
  It stores global tensors, so it loads at any TP/PP layout (dist_checkpointing reshards on load).

The trainer's ``iter_XXXXXXX/`` directories use the same layout plus their optimizer state.

Saving: megatron's default torch_dist writer (``FileSystemWriterAsync``) starts a ``spawn`` multiprocessing
Manager (which re-imports ``__main__``) and forks one writer per bucket, even for a synchronous save: 7-18 s
per save on a tiny model. :mod:`sync_writer` writes the same format with ``torch.distributed.checkpoint``'s
in-process ``FileSystemWriter`` instead (no subprocess), and can produce tensor data lazily, item by
item, which is what lets the converter stream a model it never holds in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sppd_megatron.config import config_to_dict
from sppd_megatron.conversion.errors import ConversionError
from sppd_megatron.models.config import ModelConfig
from sppd_megatron.parallel.state import barrier

META_FILE = "sppd_model.json"
MODEL_SUBDIR = "model"
FORMAT_VERSION = 1

def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


# --------------------------------------------------------------------------------------------- meta


def model_config_from_dict(data: dict) -> ModelConfig:
    """A ModelConfig from its dict, with the config loader's type checks (a wrong type fails here)."""
    from sppd_megatron.config import config_from_dict

    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping, got {type(data).__name__}")
    return config_from_dict(ModelConfig, data, "model")


def write_checkpoint_meta(
    ckpt_dir: str | Path,
    model_cfg: ModelConfig,
    tokenizer_spec: str | None,
    *,
    source: str = "",
    dtype: str = "fp32",
    hf_config: dict | None = None,
    suggested_parallel: tuple[int, int] = (1, 1),
) -> None:
    meta = {
        "format_version": FORMAT_VERSION,
        "model": config_to_dict(model_cfg),
        "tokenizer": tokenizer_spec,
        "source": source,
        "dtype": dtype,
        "hf_config": hf_config,
        "suggested_parallel": {
            "tensor_model_parallel_size": suggested_parallel[0],
            "pipeline_model_parallel_size": suggested_parallel[1],
        },
    }
    path = Path(ckpt_dir) / META_FILE
    path.write_text(json.dumps(meta, indent=2) + "\n")


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """sppd_model.json of a checkpoint; ConversionError naming the directory when it is not one."""
    ckpt = Path(ckpt_dir)
    path = ckpt / META_FILE
    if not path.is_file():
        hint = (
            " (it looks like a Hugging Face directory: convert it with `sppd-megatron convert hf-to-mcore`)"
            if (ckpt / "config.json").is_file()
            else ""
        )
        raise ConversionError(f"{ckpt}: no {META_FILE}; not an sppd-megatron checkpoint{hint}")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not isinstance(meta, dict):
        raise ConversionError(f"{path}: not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConversionError(
            f"{path}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}; "
            "re-convert the checkpoint with this version of sppd-megatron"
        )
    kinds = {"model": dict, "tokenizer": (str, type(None)), "source": str, "dtype": str,
             "hf_config": (dict, type(None)), "suggested_parallel": dict}
    wrong = [k for k, kind in kinds.items() if k in meta and not isinstance(meta[k], kind)]
    if wrong or meta.get("dtype", "fp32") not in ("fp32", "bf16"):
        raise ConversionError(f"{path}: wrong type or value of {wrong or ['dtype']}; the checkpoint's description is "
                              "damaged")
    if not (ckpt / MODEL_SUBDIR / "metadata.json").is_file():
        raise ConversionError(f"{ckpt}: {MODEL_SUBDIR}/ holds no complete dist checkpoint (interrupted save?)")
    return meta


def read_checkpoint_model_config(ckpt_dir: str | Path) -> ModelConfig:
    """The ModelConfig a checkpoint was written for (build the model from this before loading)."""
    path = Path(ckpt_dir) / META_FILE
    try:
        return model_config_from_dict(read_checkpoint_meta(ckpt_dir)["model"])
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        if isinstance(exc, ConversionError):
            raise
        raise ConversionError(f"{path}: invalid \"model\" entry ({exc})") from None


def checkpoint_tokenizer_spec(ckpt_dir: str | Path) -> str | None:
    """The checkpoint's tokenizer: ``builtin:char``, an absolute directory, or None if none was recorded."""
    spec = read_checkpoint_meta(ckpt_dir).get("tokenizer")
    if spec is not None and not isinstance(spec, str):
        raise ConversionError(f"{Path(ckpt_dir) / META_FILE}: \"tokenizer\" must be a path or builtin:char")
    if spec is None or spec.startswith("builtin:"):
        return spec
    path = Path(spec)
    return str(path if path.is_absolute() else (Path(ckpt_dir) / path).resolve())


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    da, db = config_to_dict(a), config_to_dict(b)
    return [f"{k}: {da[k]!r} vs {db.get(k)!r}" for k in da if da[k] != db.get(k)]


def check_checkpoint_matches(ckpt_dir: str | Path, model_cfg: ModelConfig) -> None:
    """ConversionError when the checkpoint was written for a different architecture than ``model_cfg``."""
    saved = read_checkpoint_model_config(ckpt_dir)
    diffs = config_differences(saved, model_cfg)
    if diffs:
        raise ConversionError(
            f"{ckpt_dir}: checkpoint is from a different model ({'; '.join(diffs[:3])} [checkpoint vs "
            "requested]); build the model from the checkpoint's sppd_model.json or pass the matching checkpoint"
        )


# --------------------------------------------------------------------------------------------- save


def sync_save_strategy(thread_count: int = 1):
    """The strategy to pass to ``dist_checkpointing.save`` for in-process saves (optimizer state too)."""
    from sppd_megatron.conversion.sync_writer import SyncTorchDistSaveStrategy

    return SyncTorchDistSaveStrategy(thread_count=thread_count)


def save_sharded_state_dict(sharded_state_dict, model_dir: str | Path, lazy=None) -> None:
    from megatron.core import dist_checkpointing

    from sppd_megatron.conversion.sync_writer import SyncTorchDistSaveStrategy

    model_dir = Path(model_dir)
    if _rank() == 0:
        model_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    dist_checkpointing.save(
        sharded_state_dict, str(model_dir), sharded_strategy=SyncTorchDistSaveStrategy(lazy=lazy)
    )


def save_model_checkpoint(
    model: torch.nn.Module,
    ckpt_dir: str | Path,
    model_cfg: ModelConfig,
    tokenizer_spec: str | None,
    *,
    source: str = "",
    hf_config: dict | None = None,
    dtype: str | None = None,
) -> Path:
    """Save this rank's GPTModel stage into ``ckpt_dir`` (collective: every rank calls it)."""
    ckpt = Path(ckpt_dir)
    if _rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    barrier()
    save_sharded_state_dict(model.sharded_state_dict(), ckpt / MODEL_SUBDIR)
    if _rank() == 0:
        from megatron.core import parallel_state

        if dtype is None:
            dtype = "bf16" if model.config.params_dtype == torch.bfloat16 else "fp32"
        write_checkpoint_meta(
            ckpt,
            model_cfg,
            tokenizer_spec,
            source=source,
            dtype=dtype,
            hf_config=hf_config,
            suggested_parallel=(
                parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(),
            ),
        )
    barrier()
    return ckpt


# --------------------------------------------------------------------------------------------- load


def load_dist_checkpoint(load, sharded, directory: str | Path, **kwargs):
    """``load(sharded, directory)`` (megatron's ``dist_checkpointing.load``) of a directory checked first
    (:mod:`.checkpoint_safety`: nothing in it can run code), any failure reported as ConversionError."""
    from sppd_megatron.conversion.checkpoint_safety import verify_dist_checkpoint

    verify_dist_checkpoint(directory)
    try:
        return load(sharded, str(directory), **kwargs)
    except (ConversionError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a damaged checkpoint fails deep in torch/megatron with any exception type
        # (torch.distributed.checkpoint's CheckpointException derives from BaseException, and its message
        # holds each rank's traceback: its last line is what went wrong)
        text = str(exc).strip()
        if "Traceback" in text:
            text = text.splitlines()[-1]
        first = " ".join(text.split())[:300] or type(exc).__name__
        raise ConversionError(f"{directory}: cannot load this dist checkpoint ({type(exc).__name__}: {first})") from None


def load_model_checkpoint(
    model: torch.nn.Module,
    ckpt_dir: str | Path,
    model_cfg: ModelConfig | None = None,
    missing_ok_prefixes: tuple[str, ...] = ("value_head.",),
) -> dict[str, Any]:
    """Load a checkpoint into this rank's stage at whatever TP/PP it was built with; return the meta.

    ``model_cfg`` (the config the model was built from) is checked against the checkpoint's first, so a
    checkpoint of a different model fails with one line instead of a shape error deep in torch.
    Parameters under ``missing_ok_prefixes`` (the SVPO value head) may be absent from the checkpoint,
    and so may TransformerEngine's ``_extra_state`` (FP8 scaling history, rebuilt by TE as it trains):
    a checkpoint written with megatron's local layers has none, and one written with TE at another
    TP size has it under other shard names. Weights carry the same names under both specs.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    meta = read_checkpoint_meta(ckpt_dir)
    if model_cfg is not None:
        check_checkpoint_matches(ckpt_dir, model_cfg)
    model_dir = Path(ckpt_dir) / MODEL_SUBDIR
    sharded = model.sharded_state_dict()
    saved = set(load_dist_checkpoint(lambda _, d: load_sharded_metadata(d), None, model_dir))

    def stored_as(entry, key: str) -> str:
        return entry.unique_key if isinstance(entry, ShardedObject) else getattr(entry, "key", key)

    absent = [
        k for k, v in sharded.items()
        if (k.startswith(missing_ok_prefixes) or k.endswith("_extra_state")) and stored_as(v, k) not in saved
    ]
    for k in absent:
        del sharded[k]
    state = load_dist_checkpoint(dist_checkpointing.load, sharded, model_dir)
    try:
        incompatible = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        raise ConversionError(f"{ckpt_dir}: checkpoint does not fit the model ({' '.join(str(exc).split())[:300]})") from None
    missing = [
        k for k in incompatible.missing_keys
        if not k.endswith("_extra_state") and not k.startswith(missing_ok_prefixes)
    ]
    if missing or incompatible.unexpected_keys:
        raise ConversionError(
            f"{ckpt_dir}: checkpoint does not fit the model (missing {missing[:3]}, unexpected "
            f"{incompatible.unexpected_keys[:3]}); build the model from the checkpoint's sppd_model.json"
        )
    return meta


def load_checkpoint_tensors(ckpt_dir: str | Path, sharded_subset: dict) -> dict[str, torch.Tensor]:
    """Load some entries (e.g. one layer's) of a model's sharded state dict, in one process, into CPU memory.

    Per-layer tensors are stored stacked over layers (a prepended layer axis). torch's ShardedTensor,
    which megatron uses for such tensors, insists that the other layers live on other ranks, so with
    one process each piece is re-described as a plain chunk of the stacked tensor (same global shape
    and offset, no prepended axis): the loader reads exactly those bytes.
    """
    from dataclasses import replace

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import (
        dict_list_map_inplace,
        dict_list_map_outplace,
        extract_matching_values,
    )
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
        apply_factories,
        apply_factory_merges,
    )

    subset = {}
    for key, sh in sharded_subset.items():
        if sh.data is not None and sh.data.is_meta:
            sh = replace(sh, data=torch.empty(sh.data.shape, dtype=sh.data.dtype, device="cpu"))
        subset[key] = sh
    factories, _ = extract_matching_values(
        subset, lambda x: isinstance(x, ShardedTensorFactory), return_lists_as_dicts=True
    )
    apply_factories(subset)

    def as_plain_chunk(sh):
        if not isinstance(sh, ShardedTensor) or not sh.prepend_axis_num:
            return sh
        local = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        return replace(sh, data=sh.data.view(local), local_shape=local, prepend_axis_num=0)

    request = dict_list_map_outplace(as_plain_chunk, subset)
    # A subset covers only part of each stacked tensor: skip the whole-coverage check.
    load_dist_checkpoint(dist_checkpointing.load, request, Path(ckpt_dir) / MODEL_SUBDIR,
                         validate_access_integrity=False)
    # The loader filled the tensors in place; the views above share their storage.
    loaded = dict_list_map_inplace(lambda sh: sh.data if isinstance(sh, ShardedTensor) else sh, subset)
    return apply_factory_merges(loaded, factories)
