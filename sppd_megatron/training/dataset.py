"""The tokenised training set, built once and memory-mapped by every rank.

A million step pairs as Python lists of token ids would cost every rank tens of GB (an int object
and a list slot per token above 255) and minutes to tokenise each. Instead global rank 0 reads and
tokenises the file once (:func:`~sppd_megatron.training.data.read_examples`: the same validation and
``file:line`` errors), streaming the rows into flat arrays under ``OUTPUT_DIR/dataset/``; every rank
then maps them read-only, so the pages are shared. A rebuilt or different file, tokenizer or data
setting gives another fingerprint and a rebuild; a resumed run reuses the arrays.

``dataset[i]`` is the :class:`~sppd_megatron.training.data.Example` of record ``i``, made on demand.
Reference log-probs live in an in-memory copy, so the reference pass can fill them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from pathlib import Path

import numpy as np

from sppd_megatron.training.data import DataError, Example, Row

FORMAT = 1
_ARRAYS = ("tokens", "row_start", "context_len", "ends_with_eos", "example_row", "values", "ref_logps", "line",
           "truncated", "tree_key", "state_key")


def _key(text: str) -> int:
    """A stable 63-bit id of a group key (question id, or shared context)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class TokenizedDataset:
    """Examples as flat arrays: rows' tokens, row and example boundaries, values, reference log-probs."""

    def __init__(self, directory: Path, arrays: dict[str, np.ndarray], source: str):
        self.directory, self.source = directory, source
        self.a = arrays
        self.ref_logps = np.array(arrays["ref_logps"], dtype=np.float64)  # writable, filled by the reference pass

    # --- building -----------------------------------------------------------------------------

    @classmethod
    def build(cls, examples, directory: str | Path, source: str, fingerprint: str) -> None:
        """Stream ``examples`` into ``directory`` (written next to it, then renamed: all or nothing)."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tokens = array("i")
        cols = {name: array(code) for name, code in (
            ("row_start", "q"), ("context_len", "i"), ("ends_with_eos", "b"), ("example_row", "q"), ("values", "d"),
            ("ref_logps", "d"), ("line", "q"), ("truncated", "b"), ("tree_key", "q"), ("state_key", "q"))}
        cols["row_start"].append(0)
        cols["example_row"].append(0)
        for ex in examples:
            for row, value, ref in zip(ex.rows, ex.values, ex.ref_logps):
                tokens.extend(row.ids)
                cols["row_start"].append(len(tokens))
                cols["context_len"].append(row.context_len)
                cols["ends_with_eos"].append(row.ends_with_eos)
                cols["values"].append(np.nan if value is None else value)
                cols["ref_logps"].append(np.nan if ref is None else ref)
            cols["example_row"].append(len(cols["context_len"]))
            cols["line"].append(ex.line)
            cols["truncated"].append(ex.truncated)
            cols["tree_key"].append(_key(ex.tree))
            cols["state_key"].append(_key(ex.state))
        np.save(tmp / "tokens.npy", np.frombuffer(tokens, dtype=np.int32))
        dtypes = {"i": np.int32, "q": np.int64, "b": np.bool_, "d": np.float64}
        for name, col in cols.items():
            np.save(tmp / f"{name}.npy", np.frombuffer(col, dtype=dtypes[col.typecode]))
        (tmp / "dataset.json").write_text(json.dumps({"format": FORMAT, "source": source, "fingerprint": fingerprint,
                                                      "examples": len(cols["line"]), "tokens": len(tokens)}))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)

    @classmethod
    def open(cls, directory: str | Path) -> "TokenizedDataset":
        directory = Path(directory)
        meta = json.loads((directory / "dataset.json").read_text())
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        return cls(directory, arrays, meta["source"])

    @staticmethod
    def fingerprint(directory: str | Path) -> str | None:
        meta = Path(directory) / "dataset.json"
        if not meta.is_file():
            return None
        data = json.loads(meta.read_text())
        return data["fingerprint"] if data.get("format") == FORMAT else None

    # --- reading ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.a["line"])

    def __getitem__(self, i: int) -> Example:
        first, last = int(self.a["example_row"][i]), int(self.a["example_row"][i + 1])
        starts = self.a["row_start"]
        rows = [Row(ids=self.a["tokens"][starts[r]:starts[r + 1]].tolist(), context_len=int(self.a["context_len"][r]),
                    ends_with_eos=bool(self.a["ends_with_eos"][r])) for r in range(first, last)]
        value = lambda x: None if np.isnan(x) else float(x)  # noqa: E731
        return Example(rows=rows, values=[value(v) for v in self.a["values"][first:last]],
                       ref_logps=[value(v) for v in self.ref_logps[first:last]],
                       where=self.where(i), line=int(self.a["line"][i]),
                       truncated=bool(self.a["truncated"][i]), tree=str(int(self.a["tree_key"][i])),
                       state=str(int(self.a["state_key"][i])))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def where(self, i: int) -> str:
        return f"{self.source}:{int(self.a['line'][i])}"

    def group_keys(self, group_by: str) -> list | None:
        if group_by == "tree":
            return self.a["tree_key"].tolist()
        if group_by == "state":
            return list(zip(self.a["tree_key"].tolist(), self.a["state_key"].tolist()))
        return None

    def example_tokens(self) -> np.ndarray:
        """Tokens of each example's rows together (an upper bound of its packed size)."""
        starts = np.asarray(self.a["row_start"])
        return starts[np.asarray(self.a["example_row"])[1:]] - starts[np.asarray(self.a["example_row"])[:-1]]

    # --- reference log-probs ------------------------------------------------------------------

    def missing_reference(self) -> bool:
        return bool(np.isnan(self.ref_logps).any())

    def set_reference(self, per_example: list[list[float]]) -> None:
        """Fill missing reference log-probs (the stored ones stay) from one list per example."""
        flat = np.array([v for values in per_example for v in values], dtype=np.float64)
        missing = np.isnan(self.ref_logps)
        self.ref_logps[missing] = flat[missing]
        if not np.isfinite(self.ref_logps).all():
            bad = int(np.argmax(~np.isfinite(self.ref_logps)))
            example = int(np.searchsorted(self.a["example_row"], bad, side="right")) - 1
            raise DataError(f"{self.where(example)}: the initial policy's reference log-prob {self.ref_logps[bad]} is not finite "
                            "(the init weights or this record are broken)")


def training_dataset(cfg, tokenizer, vocab_size: int, need_values: bool) -> TokenizedDataset:
    """The run's dataset under ``OUTPUT_DIR/dataset``: built by global rank 0 when missing or stale, then
    mapped by every rank. A bad record fails every rank with rank 0's ``file:line`` message."""
    import torch

    from sppd_megatron.config import config_to_dict
    from sppd_megatron.parallel import state as pstate
    from sppd_megatron.training.data import read_examples

    out_dir = Path(cfg.output_dir)
    directory = out_dir / "dataset"
    error = None
    if pstate.is_rank0():  # only the builder reads and hashes the inputs
        try:
            fingerprint = _fingerprint(cfg, tokenizer, vocab_size, need_values, config_to_dict)
            if TokenizedDataset.fingerprint(directory) != fingerprint:
                examples = read_examples(cfg.data.train_file, cfg.stage, tokenizer, cfg.data.max_length, vocab_size,
                                         append_eos=cfg.data.append_eos, need_values=need_values,
                                         overlong=cfg.data.overlong, rejects=out_dir / "rejects.jsonl",
                                         value_name=cfg.data.value_name)
                TokenizedDataset.build(examples, directory, str(cfg.data.train_file), fingerprint)
        except (DataError, OSError) as exc:  # a missing or unreadable input fails every rank alike
            error = exc
    if torch.distributed.is_initialized():
        holder = [error]
        torch.distributed.broadcast_object_list(holder, src=0)
        error = holder[0]
    if error is not None:
        raise error
    return TokenizedDataset.open(directory)


def _fingerprint(cfg, tokenizer, vocab_size: int, need_values: bool, config_to_dict) -> str:
    h = hashlib.sha256()
    for file in _input_files(cfg):
        h.update(file.name.encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    data = {k: v for k, v in config_to_dict(cfg.data).items()
            if k in ("max_length", "append_eos", "overlong", "value_name")}
    h.update(json.dumps({"data": data, "stage": cfg.stage, "vocab": vocab_size, "need_values": need_values,
                         "tokenizer": getattr(tokenizer, "name_or_path", ""), "vocab_hash": _tokenizer_hash(tokenizer)},
                        sort_keys=True).encode())
    return h.hexdigest()


def _input_files(cfg) -> list[Path]:
    """The files the stage reads: the training file, or stage prm's tree shards."""
    path = Path(cfg.data.train_file)
    if cfg.stage == "prm" and path.is_dir():
        from sppd_megatron.scoring.cli import input_shards

        return input_shards(path)
    return [path]


def _tokenizer_hash(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
