"""FlexAttention as the core attention (precision.attention=flex) gives the dense path's log-probs.

On a CPU FlexAttention runs forward only (its backward is GPU-only), so this compares the reference
pass (``precompute-ref``, forward only) of tree-packed batches under flex and dense attention with
the padded layout. Training with flex is checked on a GPU (tests/gpu).
"""

import os
import subprocess
import sys
from pathlib import Path

from sppd_megatron.records import PreferencePair, read_jsonl

REPO = Path(__file__).resolve().parents[2]


def _reference(tmp_path: Path, name: str, *overrides: str) -> list[float]:
    out = tmp_path / f"{name}.jsonl"
    proc = subprocess.run([sys.executable, "-m", "sppd_megatron", "precompute-ref", "configs/tiny-cpu/step_dpo.yaml",
                           "--out", str(out), *overrides], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [v for r in read_jsonl(out, PreferencePair) for v in (r.ref_chosen_logp, r.ref_rejected_logp)]


def test_flex_tree_masks_equal_dense_and_padded(tmp_path):
    padded = _reference(tmp_path, "padded", "data.packing=none")
    dense = _reference(tmp_path, "dense", "data.packing=trees", "precision.attention=dense")
    flex = _reference(tmp_path, "flex", "data.packing=trees", "precision.attention=flex")
    rel = lambda a, b: max(abs(x - y) / abs(x) for x, y in zip(a, b))  # noqa: E731
    print(f"\n{len(padded)} sequence log-probs, max relative difference: trees+dense vs padded {rel(padded, dense):.2g}, "
          f"trees+flex vs padded {rel(padded, flex):.2g}")
    assert rel(padded, dense) <= 1e-5 and rel(padded, flex) <= 1e-5


def test_each_micro_batch_gets_its_own_block_mask():
    """A new micro-batch's mask often lands where the last one was freed: the cache must not be fooled."""
    import torch

    from sppd_megatron.models.attention import _block_mask

    def dense(masked_blocks):  # 2 x 2 blocks of 128 tokens; the listed blocks fully masked
        allowed = torch.ones(1, 256, 256, dtype=torch.bool)
        for qb, kb in masked_blocks:
            allowed[:, qb * 128:(qb + 1) * 128, kb * 128:(kb + 1) * 128] = False
        return ~allowed[:, None]

    for masked in ([(1, 0)], [(0, 1)], [], [(0, 1), (1, 0)]):
        mask = dense(masked)
        block = _block_mask(mask, 1, 256, 256, torch.device("cpu"))
        assert _block_mask(mask, 1, 256, 256, torch.device("cpu")) is block  # every layer shares it
        kept = {(q, k) for q in range(2) for k in range(2) if block.to_dense()[0, 0, q, k]}
        assert kept == {(q, k) for q in range(2) for k in range(2)} - set(masked)
        del mask, block  # the next mask may reuse this memory
