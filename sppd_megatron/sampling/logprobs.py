"""Teacher-forced log-probs of a tree's steps: the check that an engine's stored log-probs are the model's.

The trainer computes its own log-probs (through Megatron); this is the transformers-side
recomputation used by tests and by anyone who wants ``trainer_logprobs`` filled from an HF model.
"""

from __future__ import annotations

import torch

from sppd_megatron.records import Tree


def teacher_forced_logprobs(model, context_ids: list[int], continuation_ids: list[int]) -> list[float]:
    """log pi(continuation_i | context, continuation_<i) from one forward pass (temperature 1)."""
    ids = torch.tensor([list(context_ids) + list(continuation_ids)], device=next(model.parameters()).device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(context_ids) - 1:-1].float()
    target = ids[0, len(context_ids):]
    return torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).squeeze(-1).tolist()


def fill_trainer_logprobs(model, tree: Tree) -> Tree:
    """Set ``trainer_logprobs`` of every step node, one forward pass per trajectory (leaf)."""
    root = tree.nodes[0]
    for leaf in tree.leaves():
        path = tree.path(leaf.node_id)
        steps = [t for n in path for t in n.token_ids]
        lps = teacher_forced_logprobs(model, root.token_ids, steps)
        at = 0
        for node in path:
            node.trainer_logprobs = lps[at:at + len(node.token_ids)]
            at += len(node.token_ids)
    return tree
