"""What packed and tree-shared batches need from the model: RoPE at given positions, tree-masked attention.

Megatron-core computes rotary embeddings for positions 0..S-1 of the sequence dimension and ignores
``position_ids``; a token of a packed bin or of a shared-prefix tree sits elsewhere than its position
in its own sequence. :class:`PositionedGPTModel` is GPTModel whose rotary embeddings are looked up
at the ``position_ids`` given to ``forward`` (for 0..S-1 that is exactly megatron's table), so the
change is in how RoPE is indexed, not a fork of the model.

Tree masks reach the core attention as megatron's ``attention_mask`` ([B, 1, S, S], True = masked).
Megatron's local core attention applies such a mask densely (the CPU path, and the reference).
:class:`FlexCoreAttention` is a drop-in core attention (a ModuleSpec swap) that turns the mask into
a FlexAttention block mask, so fully masked blocks are skipped and no [B, heads, S, S] scores are
kept: the GPU path for packed batches.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def positioned_gpt_model_class():
    """GPTModel whose RoPE follows ``position_ids`` (built lazily: megatron is imported on demand)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt import GPTModel

    class PositionedRotaryEmbedding(RotaryEmbedding):
        """Megatron's RotaryEmbedding, indexed by ``self.positions`` [B, S] when they are set."""

        def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
            table = super().forward(max_seq_len, offset, packed_seq, cp_group)  # [S, 1, 1, dim] for 0..S-1
            if self.positions is None:
                return table
            return table[:, 0][self.positions.transpose(0, 1)]  # [S, B, 1, dim]: each token's own position

    class PositionedGPTModel(GPTModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if isinstance(getattr(self, "rotary_pos_emb", None), RotaryEmbedding):
                # Same object and state (inv_freq, scaling), one method different.
                self.rotary_pos_emb.__class__ = PositionedRotaryEmbedding
                self.rotary_pos_emb.positions = None

        def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
            rope = getattr(self, "rotary_pos_emb", None)
            if rope is None:
                return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
            rope.positions = position_ids
            try:
                return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
            finally:
                rope.positions = None

    return PositionedGPTModel


_BLOCK_MASK: list = []  # [(attention_mask, batch, q_len, kv_len, block mask)]: the micro-batch in flight


def _block_mask(attention_mask: Optional[torch.Tensor], batch: int, q_len: int, kv_len: int, device):
    """FlexAttention's BlockMask for megatron's mask (True = masked), or causal; built once per micro-batch.

    Every layer (and a recomputed forward) receives the same mask tensor, so the cache is keyed on that
    object itself; holding it also keeps its memory from being reused by the next micro-batch's mask,
    which an address-keyed cache would mistake for this one.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if _BLOCK_MASK:
        mask, b, q, kv, block = _BLOCK_MASK[0]
        if mask is attention_mask and (b, q, kv) == (batch, q_len, kv_len) and block is not None:
            return block
    if attention_mask is None:
        def mask_mod(b, h, q, kv):
            return kv <= q
        b_arg = None
    else:
        allowed = ~attention_mask[:, 0]

        def mask_mod(b, h, q, kv):
            return allowed[b, q, kv]
        b_arg = batch
    block = create_block_mask(mask_mod, b_arg, None, q_len, kv_len, device=device, _compile=device.type == "cuda")
    _BLOCK_MASK[:] = [(attention_mask, batch, q_len, kv_len, block)]
    return block


_FLEX = None


def _flex_attention():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        # Compiled on GPUs (the fused kernel); eager elsewhere, where it is the reference implementation.
        _FLEX = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _FLEX


@functools.lru_cache(maxsize=None)
def flex_core_attention_class():
    from megatron.core.transformer.module import MegatronModule

    class FlexCoreAttention(MegatronModule):
        """Core attention with FlexAttention: megatron's DotProductAttention interface, block-sparse masks."""

        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None, pg_collection=None):
            super().__init__(config=config)
            dropout = config.attention_dropout if attention_dropout is None else attention_dropout
            if dropout:
                raise ValueError("precision.attention=flex has no attention dropout; set attention_dropout 0")
            self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if packed_seq_params is not None or attention_bias is not None:
                raise ValueError("FlexCoreAttention takes tree masks, not packed_seq_params or attention_bias")
            sq, b, heads, dim = query.shape
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
            mask = _block_mask(attention_mask, b, sq, key.shape[0], query.device)
            out = _flex_attention()(q, k, v, block_mask=mask, scale=self.softmax_scale,
                                    enable_gqa=k.shape[1] != heads)
            return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)

    return FlexCoreAttention
