"""Stage manifests: what makes a stage directory skippable, resumable or a conflict.

Every stage of a run writes ``<stage dir>/manifest.json``::

    {"stage": "score", "status": "running" | "done", "config": {...},
     "inputs": {"trees": {"path": ..., "sha256": ...}}, "outputs": {...},
     "code_version": "0.1.0 (git v0.1-3-gabc123)", "started": ..., "finished": ..., "seconds": ...}

:func:`run_stage` decides from it: a ``done`` stage with the same config and input hashes is
skipped (its recorded outputs are returned); a ``running`` one (a killed run) is run again, and
since every stage verb resumes inside its own directory, it continues where it stopped; a stage
whose config or inputs differ from what the directory was made with is refused with an error
naming the differences, so outputs of two configs never mix. The code version is recorded, not
compared: a bug fix should not throw away finished sampling.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from sppd_megatron.config import RunStopped
from sppd_megatron.sampling.config import RETRY_KEYS

MANIFEST = "manifest.json"
LARGE_FILE_BYTES = 64 * 1024 * 1024
"""Files above this size are fingerprinted by size + first and last MiB, not read whole (checkpoints)."""
_EDGE_BYTES = 1024 * 1024
DISPLAY_ONLY_KEYS = frozenset({"progress", *RETRY_KEYS})
"""Config keys that never change a stage's outputs (progress bars, a rollout engine's retries): changing
them does not count as a different config."""


class StageConflict(RunStopped):
    """A stage directory was made with another config or other inputs than the ones given now."""


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as fh:
        if size <= LARGE_FILE_BYTES:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f"size={size}".encode())
            h.update(fh.read(_EDGE_BYTES))
            fh.seek(size - _EDGE_BYTES)
            h.update(fh.read(_EDGE_BYTES))
    return h.hexdigest()


def fingerprint(path: str | Path) -> str:
    """sha256 of a file, or of a directory's (relative path, file digest) list; ``missing`` if absent."""
    path = Path(path)
    if path.is_file():
        return _file_digest(path)
    if not path.is_dir():
        return "missing"
    from sppd_megatron.locking import LOCK_FILE

    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != LOCK_FILE):
        h.update(str(f.relative_to(path)).encode() + b"\0" + _file_digest(f).encode() + b"\n")
    return h.hexdigest()


def code_version() -> str:
    """Package version plus ``git describe`` of the source tree when it is a git checkout."""
    from sppd_megatron import __version__

    root = Path(__file__).resolve().parents[2]
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=root,
                                   capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return __version__
    tag = described.stdout.strip()
    return f"{__version__} (git {tag})" if described.returncode == 0 and tag else __version__


def read_manifest(stage_dir: str | Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise StageConflict(f"{path}: damaged ({exc}); delete this stage directory (and the stages after it) "
                            "to redo it") from None
    if not isinstance(body, dict) or not isinstance(body.get("inputs", {}), dict):
        raise StageConflict(f"{path}: not a stage manifest; delete this stage directory to redo it")
    return body


def write_manifest(stage_dir: str | Path, body: dict) -> None:
    """Atomic write (temp file + rename): a kill leaves the old manifest or the new one."""
    path = Path(stage_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted((set(old) | set(new)) - DISPLAY_ONLY_KEYS):
            out += _differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        return out
    return [] if old == new else [f"{where or '<root>'}: {old!r} -> {new!r}"]


def _plain(value: Any) -> Any:
    """JSON round trip, so a fresh config compares equal to the one read back from a manifest."""
    return json.loads(json.dumps(value, sort_keys=True))


def run_stage(stage_dir: str | Path, stage: str, config: dict, inputs: dict[str, str | Path],
              body: Callable[[], dict[str, str | Path]], log: Callable[[str], None] = print) -> dict[str, str]:
    """Run ``body`` (which writes into ``stage_dir`` and returns its named outputs) unless it is done.

    Returns the outputs as ``{name: path}``. Raises :class:`StageConflict` when ``stage_dir`` holds
    a stage made with another config or other inputs.
    """
    stage_dir = Path(stage_dir)
    config = _plain(config)
    hashed = {name: {"path": str(path), "sha256": fingerprint(path)} for name, path in inputs.items()}
    missing = [f"{name} ({info['path']})" for name, info in hashed.items() if info["sha256"] == "missing"]
    if missing:
        raise FileNotFoundError(f"stage {stage} in {stage_dir}: input(s) not found: {', '.join(missing)}")
    old = read_manifest(stage_dir)
    if old is not None:
        diffs = _differences(old.get("config"), config, "config")
        diffs += [f"input {name}: {old['inputs'].get(name, {}).get('sha256', 'absent')[:12]} -> "
                  f"{info['sha256'][:12]} ({info['path']})"
                  for name, info in hashed.items() if old.get("inputs", {}).get(name, {}).get("sha256") != info["sha256"]]
        diffs += [f"input {name}: no longer given" for name in old.get("inputs", {}) if name not in hashed]
        if diffs:
            shown = "\n  ".join(diffs[:12]) + ("\n  ..." if len(diffs) > 12 else "")
            raise StageConflict(
                f"{stage_dir / MANIFEST}: stage '{stage}' was {'made' if old.get('status') == 'done' else 'started'} "
                f"with a different config or inputs, refusing to mix outputs:\n  {shown}\n"
                "Use a new run directory, restore the original settings, or delete this stage directory "
                "(and the stages after it) to redo it."
            )
        if old.get("status") == "done":
            log(f"[{stage}] done already ({stage_dir}), skipped")
            return {name: info["path"] for name, info in old["outputs"].items()}
        log(f"[{stage}] resuming the unfinished stage in {stage_dir}")
    else:
        log(f"[{stage}] running in {stage_dir}")
    started = time.time()
    manifest = {"stage": stage, "status": "running", "config": config, "inputs": hashed,
                "code_version": code_version(), "started": started, "outputs": {}}
    write_manifest(stage_dir, manifest)
    outputs = {name: str(path) for name, path in body().items()}
    manifest.update(
        status="done", finished=time.time(), seconds=round(time.time() - started, 3),
        outputs={name: {"path": path, "sha256": fingerprint(path)} for name, path in outputs.items()},
    )
    write_manifest(stage_dir, manifest)
    return outputs
