"""A dist checkpoint is checked before anything in it is unpickled: loading one runs no code it holds.

torch.distributed.checkpoint (the ``torch_dist`` format megatron-core writes) keeps its metadata
(``.metadata``) as a plain pickle and reads it with ``pickle.load``, and reads non-tensor items
(``BytesStorageMetadata``: TransformerEngine extra state, optimizer objects) with
``torch.load`` with ``weights_only=False``. A crafted checkpoint could run anything at load. So before
megatron or torch read a directory, :func:`verify_dist_checkpoint` unpickles ``.metadata`` with an
unpickler that only builds the classes that format defines (the ``torch.distributed.checkpoint``
metadata dataclasses, ``torch.Size``, torch dtypes, ``pathlib`` paths), and loads every bytes item
and ``common.pt`` with ``torch.load`` and ``weights_only=True``. What passes holds nothing but data, so the
libraries' own loads of the same bytes build the same data. Tensors themselves are always read
with ``weights_only=True`` by torch.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch

from sppd_megatron.conversion.errors import ConversionError

_ALLOWED_MODULES = {
    "torch.distributed.checkpoint.metadata": None,  # every class of the format's metadata module
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = module in _ALLOWED_MODULES and (_ALLOWED_MODULES[module] is None or name in _ALLOWED_MODULES[module])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed or name.startswith("__"):
            raise pickle.UnpicklingError(f"it would build {module}.{name}, which a dist checkpoint's metadata "
                                         "never holds")
        return super().find_class(module, name)


def read_metadata(ckpt_dir: Path):
    """``.metadata`` of a dist checkpoint directory, unpickled with the format's classes only."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = ckpt_dir / ".metadata"
    try:
        with path.open("rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise ConversionError(f"{ckpt_dir}: no .metadata; not a complete dist checkpoint (interrupted save?)") from None
    except Exception as exc:  # any damage or forgery of the pickle: refused, nothing was run
        raise ConversionError(f"{path}: refused ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise ConversionError(f"{path}: refused (holds a {type(metadata).__name__}, not a checkpoint Metadata)")
    return metadata


def _weights_only(data: bytes | Path, where: str) -> None:
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"{where}: refused: not loadable as plain data ({first[:200]})") from None


def verify_dist_checkpoint(ckpt_dir: str | Path) -> None:
    """Raise ConversionError naming the file if loading ``ckpt_dir`` could run code or cannot work."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ckpt_dir = Path(ckpt_dir)
    meta_json = ckpt_dir / "metadata.json"
    try:
        config = json.loads(meta_json.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{ckpt_dir}: no metadata.json; not a complete dist checkpoint (interrupted save?)") from None
    except (ValueError, OSError) as exc:
        raise ConversionError(f"{meta_json}: unreadable ({exc})") from None
    expected = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    if not isinstance(config, dict) or any(config.get(k) != v for k, v in expected.items()) or any(
            not isinstance(config.get(k, "torch"), str) for k in ("common_backend",)) or any(
            not isinstance(config.get(k, 1), int) for k in ("common_backend_version",)):
        raise ConversionError(f"{meta_json}: not the metadata of a torch_dist (version 1) dist checkpoint")
    metadata = read_metadata(ckpt_dir)
    storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
    for index, info in storage.items():
        item = metadata.state_dict_metadata.get(getattr(index, "fqn", None))
        if not isinstance(item, BytesStorageMetadata):
            continue
        file = ckpt_dir / str(getattr(info, "relative_path", ""))
        if file.parent != ckpt_dir or not file.is_file():
            raise ConversionError(f"{ckpt_dir / '.metadata'}: item {index.fqn} lives in {file.name!r}, not in a file "
                                  "of this checkpoint")
        with file.open("rb") as fh:
            fh.seek(int(info.offset))
            _weights_only(fh.read(int(info.length)), f"{file} (item {index.fqn})")
    common = ckpt_dir / "common.pt"
    if common.is_file():
        _weights_only(common, str(common))
