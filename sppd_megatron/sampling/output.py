"""The sampling run directory: ``trees-NNNNN.jsonl`` shards and ``sample_manifest.json``.

Question ``i`` always goes to shard ``i // shard_size`` and trees are appended in question order,
so a resumed run writes exactly the bytes an uninterrupted one would. Each tree is one fsynced
line (records.JsonlAppender); a half-written last line from a crash is cut when the shard is
reopened, and trees already present are never written twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sppd_megatron.config import ConfigError
from sppd_megatron.records import SCHEMA_VERSION, JsonlAppender, Tree
from sppd_megatron.sampling.config import RETRY_KEYS

MANIFEST = "sample_manifest.json"
# Config keys that may change between a run and its resumption without changing any tree.
RESUME_FREE_KEYS = ("output_dir", "progress")


def shard_path(output_dir: str | Path, shard: int) -> Path:
    return Path(output_dir) / f"trees-{shard:05d}.jsonl"


def write_manifest(output_dir: str | Path, config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write the manifest atomically; on a resumed run, refuse a config that would change the trees."""
    path = Path(output_dir) / MANIFEST
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("config", {})
        except (ValueError, AttributeError):
            raise ConfigError(f"{path}: damaged (not the JSON object sampling writes); move it away to sample "
                              "this directory again") from None
        changed = sorted(k for k in set(old) | set(config)
                         if k not in RESUME_FREE_KEYS and _trees_part(k, old.get(k)) != _trees_part(k, config.get(k)))
        if changed:
            raise ConfigError(f"{path}: this directory was sampled with a different config (keys {changed}); "
                              "use a new output_dir or the original settings to resume")
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"schema_version": SCHEMA_VERSION, "config": config, **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _trees_part(key: str, value: Any) -> Any:
    """What of a config entry decides the trees (an engine's retry settings do not)."""
    if key == "engine" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in RETRY_KEYS}
    return value


class ShardedTreeWriter:
    """Appends trees to their question's shard; ``done`` holds the ids already on disk."""

    def __init__(self, output_dir: str | Path, shard_size: int):
        self.output_dir = Path(output_dir)
        self.shard_size = shard_size
        self._open: dict[int, JsonlAppender] = {}
        self.done: set[str] = set()
        for path in sorted(self.output_dir.glob("trees-*.jsonl")):
            with JsonlAppender(path, Tree) as appender:  # opening cuts a half-written last line
                self.done |= appender.done_keys

    def write(self, question_index: int, tree: Tree) -> None:
        if tree.id in self.done:
            return
        shard = question_index // self.shard_size
        if shard not in self._open:
            # Shards fill in order: an earlier shard cannot receive more trees once a later one opens.
            for old in [s for s in self._open if s < shard]:
                self._open.pop(old).close()
            self._open[shard] = JsonlAppender(shard_path(self.output_dir, shard), Tree, fault_point="sample.tree")
        self._open[shard].append(tree)
        self.done.add(tree.id)

    def close(self) -> None:
        for appender in self._open.values():
            appender.close()
        self._open.clear()

    def __enter__(self) -> "ShardedTreeWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
