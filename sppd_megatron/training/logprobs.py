"""Per-token log-probs from vocabulary-parallel logits, without gathering the vocabulary.

megatron-core's ``vocab_parallel_cross_entropy`` already computes -log p(label) from each TP rank's
vocabulary slice with two all-reduces (max and sum-exp) and no gather. It works in fp32 and edits
its input in place (``.float()`` of an fp32 tensor is the tensor itself), so each chunk is handed
over as a fresh contiguous fp32 copy: the model's logits stay intact for autograd and for the
recomputation, and a chunk sliced out of a batch of several rows (not contiguous) can be viewed as
2-D. We feed it the sequence in chunks under activation checkpointing: at most one chunk's fp32 copy
[batch, chunk, vocab / TP] exists at a time, forward or backward, instead of the whole sequence.
Logits of padded vocabulary rows (ids >= the tokenizer's vocabulary) are masked out first, so the
distribution equals the Hugging Face model's exactly.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, true_vocab: int) -> torch.Tensor:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    local_vocab = logits.shape[-1]
    work = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if vocab_start + local_vocab > true_vocab:
        ids = torch.arange(vocab_start, vocab_start + local_vocab, device=logits.device)
        work = work.masked_fill_(ids >= true_vocab, float("-inf"))
    return -vocab_parallel_cross_entropy(work, labels)


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, true_vocab_size: int, chunk_size: int = 1024
) -> torch.Tensor:
    """log p(labels[b, s] | ...) for logits [b, s, vocab/TP] (this rank's slice). Returns fp32 [b, s]."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    vocab_start = rank * logits.shape[-1]
    labels = labels.clamp(min=0)
    seq = logits.shape[1]
    if seq <= chunk_size or not torch.is_grad_enabled():
        pieces = [
            _chunk_logprobs(logits[:, i : i + chunk_size], labels[:, i : i + chunk_size], vocab_start, true_vocab_size)
            for i in range(0, seq, chunk_size)
        ]
    else:
        pieces = [
            checkpoint(
                _chunk_logprobs,
                logits[:, i : i + chunk_size],
                labels[:, i : i + chunk_size],
                vocab_start,
                true_vocab_size,
                use_reentrant=False,
            )
            for i in range(0, seq, chunk_size)
        ]
    return torch.cat(pieces, dim=1)
