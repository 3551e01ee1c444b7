"""A token trie over KV-cache segments: the embedded engine's answer to SGLang's radix cache.

Tree sampling keeps extending contexts it has seen: a leaf expanded in round r is the context of
a round r-1 request plus that request's output. The trie remembers, for every cached token
position, which KV segment holds it, so a new context reuses the longest cached prefix and only
its tail goes through the model. Segments chain to their parent segment, so a prefix shared by
many branches is stored once.

Hand-written because the only maintained implementation (sglang.srt.mem_cache.radix_cache) comes
with SGLang's CUDA stack, which does not install on a CPU machine (docs/platform-notes.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [1, heads, tokens, head_dim]


@dataclass(eq=False)
class _Segment:
    kv: KV
    parent: "_Segment | None"
    parent_len: int  # tokens of the parent chain this segment follows (parent's own tokens used)


@dataclass(eq=False)
class _Node:
    segment: _Segment | None = None
    index: int = -1  # this token's position inside ``segment``
    children: dict[int, "_Node"] = field(default_factory=dict)


class PrefixKVCache:
    """Longest-prefix lookup and insertion of KV for token sequences, bounded by ``max_tokens``.

    When more than ``max_tokens`` positions are stored the whole cache is cleared: simple,
    and deterministic (it depends only on the calls made since the last clear).
    """

    def __init__(self, max_tokens: int = 1_000_000):
        self.max_tokens = max_tokens
        self.clear()

    def clear(self) -> None:
        self._root = _Node()
        self.stored_tokens = 0

    def lookup(self, tokens: list[int]) -> tuple[int, _Node]:
        """(number of leading ``tokens`` with cached KV, the trie node of the last one)."""
        node, depth = self._root, 0
        for tok in tokens:
            child = node.children.get(tok)
            if child is None:
                break
            node, depth = child, depth + 1
        return depth, node

    def kv(self, node: _Node) -> KV | None:
        """The KV of every position from the root to ``node``, concatenated per layer."""
        if node.segment is None:
            return None
        pieces: list[KV] = []
        seg, upto = node.segment, node.index + 1
        while seg is not None:
            pieces.append([(k[:, :, :upto], v[:, :, :upto]) for k, v in seg.kv])
            seg, upto = seg.parent, seg.parent_len
        pieces.reverse()
        if len(pieces) == 1:
            return pieces[0]
        return [(torch.cat([p[i][0] for p in pieces], dim=2), torch.cat([p[i][1] for p in pieces], dim=2))
                for i in range(len(pieces[0]))]

    def insert(self, after: _Node, tokens: list[int], kv: KV) -> _Node:
        """Store ``kv`` (one position per token) as the continuation of ``after``; returns the last node."""
        if not tokens:
            return after
        if self.stored_tokens + len(tokens) > self.max_tokens:
            self.clear()  # full: start over (this continuation is simply not stored)
            return after
        parent = after.segment
        segment = _Segment(kv=kv, parent=parent, parent_len=after.index + 1 if parent is not None else 0)
        node = after
        for i, tok in enumerate(tokens):
            child = node.children.get(tok)
            if child is None:
                child = node.children[tok] = _Node()
                self.stored_tokens += 1
            child.segment, child.index = segment, i
            node = child
        return node
