"""``rejects.jsonl``: bad input records and bad outputs, each with where it came from and why.

Stages that read many records (score, pairs) never stop at, nor silently drop, a bad one: it is
written here and counted. The file is rewritten by every run, since every run re-reads all input.
"""

from __future__ import annotations

import json
from pathlib import Path


class RejectsFile:
    """One ``{"file", "line", "reason"}`` object per rejected record (``line`` None for built records)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("w", encoding="utf-8")
        self.count = 0
        self.reasons: dict[str, int] = {}

    def add(self, file: str | Path, line: int | None, reason: str, category: str = "invalid record",
            **extra) -> None:
        """Record one reject; ``category`` groups reasons in the stats."""
        row = {"file": str(file), "line": line, "reason": reason, "category": category, **extra}
        self._fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        self._fh.flush()
        self.count += 1
        self.reasons[category] = self.reasons.get(category, 0) + 1

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "RejectsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
