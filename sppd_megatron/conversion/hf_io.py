"""Hugging Face checkpoint directories: read tensors one at a time, write sharded safetensors.

Reading goes through ``safetensors.safe_open`` (memory-mapped), so a tensor is materialised only
when asked for and dropped by the caller afterwards; nothing ever holds the whole model.
Writing buffers tensors up to ``max_shard_bytes`` and flushes a ``model-0000k-of-0000n`` file,
then writes ``model.safetensors.index.json`` the way ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch

from sppd_megatron.conversion.errors import ConversionError
from sppd_megatron.models.config import ModelConfig, model_config_from_hf

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
# Files that describe the tokenizer (and generation defaults): copied verbatim between checkpoints.
TOKENIZER_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.jinja",
    "generation_config.json",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def read_hf_config(hf_dir: str | Path) -> tuple[dict, ModelConfig]:
    """config.json as a dict and as a ModelConfig; ConversionError with a fix when it cannot be used."""
    path = Path(hf_dir)
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory; pass a Hugging Face checkpoint directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConversionError(
            f"{path}: no config.json; pass a Hugging Face checkpoint directory (config.json + *.safetensors)"
        )
    try:
        hf_config = json.loads(config_path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{config_path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{config_path}: not UTF-8 text (byte {exc.start})") from None
    if not isinstance(hf_config, dict):
        raise ConversionError(f"{config_path}: not a JSON object")
    try:
        model_cfg = model_config_from_hf(hf_config)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ConversionError(
            f"{config_path}: {what}; supported: Llama/Mistral-style and Qwen2 causal LMs"
        ) from None
    return hf_config, model_cfg


def hf_source_dtype(hf_config: dict) -> torch.dtype:
    name = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama/Qwen2 checkpoint of ``cfg`` holds, with its shape (HF names)."""
    hidden, heads, groups, ffn = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size
    head = cfg.kv_channels
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, hidden)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head, hidden), p + "self_attn.k_proj.weight": (groups * head, hidden),
            p + "self_attn.v_proj.weight": (groups * head, hidden), p + "self_attn.o_proj.weight": (hidden, heads * head),
            p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        })
        if cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (heads * head,), p + "self_attn.k_proj.bias": (groups * head,),
                           p + "self_attn.v_proj.bias": (groups * head,)})
    return shapes


def check_hf_weights(hf_dir: str | Path, model_cfg: ModelConfig) -> None:
    """ConversionError naming the file unless the safetensors hold every tensor ``config.json`` implies,
    with its shape (headers only: nothing is loaded, so a config claiming a huge model costs nothing)."""
    with HFTensorReader(hf_dir) as reader:
        for name, shape in expected_hf_shapes(model_cfg).items():
            got = reader.shape(name)
            if got != shape:
                raise ConversionError(
                    f"{reader.dir / reader.weight_map[name]}: {name} has shape {got}, config.json implies {shape}; "
                    "the weights come from a different model than config.json")


class HFTensorReader:
    """Random access to the tensors of a safetensors checkpoint, one tensor at a time (mmap)."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / SAFE_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ConversionError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) and "/" not in v and v.endswith(".safetensors") for v in weight_map.values()):
                raise ConversionError(f"{index}: weight_map must map tensor names to .safetensors files here")
        elif (self.dir / SAFE_SINGLE).is_file():
            with self._open_file(SAFE_SINGLE, safe_open, None) as f:
                weight_map = {name: SAFE_SINGLE for name in f.keys()}
        else:
            found = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.gguf"))
            hint = f" (found {found[0]}: load it with transformers and save_pretrained it first)" if found else ""
            raise ConversionError(
                f"{self.dir}: no {SAFE_SINGLE} or {SAFE_INDEX}{hint}; the converter reads safetensors checkpoints"
            )
        self.weight_map: dict[str, str] = weight_map
        self._stack = ExitStack()
        self._files: dict[str, object] = {}
        self._safe_open = safe_open

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _open_file(self, file: str, safe_open, stack):
        try:
            handle = safe_open(str(self.dir / file), framework="pt")
        except Exception as exc:  # safetensors raises its own error type for a damaged header
            raise ConversionError(f"{self.dir / file}: not a readable safetensors file ({exc})") from None
        return stack.enter_context(handle) if stack is not None else handle

    def _handle(self, name: str):
        file = self.weight_map.get(name)
        if file is None:
            raise ConversionError(
                f"{self.dir}: tensor {name!r} is missing; the weights do not match config.json "
                "(is this directory a complete Llama/Qwen2 checkpoint?)"
            )
        handle = self._files.get(file)
        if handle is None:
            handle = self._files[file] = self._open_file(file, self._safe_open, self._stack)
        if name not in handle.keys():
            raise ConversionError(f"{self.dir / file}: tensor {name!r} is not in this file (the index says it is)")
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        handle = self._handle(name)
        try:
            return handle.get_tensor(name)
        except Exception as exc:  # a file cut short: the header promises bytes that are not there
            raise ConversionError(f"{self.dir / self.weight_map[name]}: cannot read tensor {name!r} ({exc})") from None

    def close(self) -> None:
        self._stack.close()
        self._files.clear()

    def __enter__(self) -> "HFTensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardedSafetensorsWriter:
    """Write (name, tensor) pairs as ``model-0000k-of-0000n.safetensors`` files plus the index.

    Shards are written as they fill, under temporary names, and renamed once the count is known,
    so memory holds at most one shard (``max_shard_bytes``) of tensors.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file, names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        tensor = tensor.detach().contiguous()
        # safetensors refuses tensors that share storage (q/k/v split from one qkv): own the memory.
        if tensor.untyped_storage().nbytes() != nbytes:
            tensor = tensor.clone()
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        from sppd_megatron import faults

        tmp = f".shard-{len(self._written):05d}.safetensors.tmp"
        faults.hit("export.shard", self.out / tmp)
        save_file(self._pending, str(self.out / tmp), metadata={"format": "pt"})
        self._written.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush, rename the shards, write the index (or a single model.safetensors); return file names."""
        if self._pending or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            os.replace(self.out / self._written[0][0], self.out / SAFE_SINGLE)
            (self.out / SAFE_INDEX).unlink(missing_ok=True)
            return [SAFE_SINGLE]
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self._written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / tmp, self.out / final)
            files.append(final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (self.out / SAFE_SINGLE).unlink(missing_ok=True)
        return files


def tokenizer_files(src_dir: str | Path) -> list[Path]:
    src = Path(src_dir)
    found: dict[str, Path] = {}
    for pattern in TOKENIZER_FILE_PATTERNS:
        for p in src.glob(pattern):
            if p.is_file():
                found[p.name] = p
    return [found[k] for k in sorted(found)]


def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy the tokenizer (and generation_config) files; return the names copied."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    names = []
    for p in tokenizer_files(src_dir):
        shutil.copy2(p, dst / p.name)
        names.append(p.name)
    return names


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    if unit not in units or not num:
        raise ConversionError(f"size {text!r}: expected a number with an optional unit (e.g. 5GB, 500MB)")
    return int(float(num) * units[unit])
