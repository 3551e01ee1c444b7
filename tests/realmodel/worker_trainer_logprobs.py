"""torchrun worker (1 process): the trainer's teacher-forced log-probs of every sampled token of a trees
directory, against the log-probs the rollout engine stored.

    worker_trainer_logprobs.py HF_DIR TREES_DIR OUT_JSON

The HF policy is converted to Megatron (``convert hf-to-mcore``, as training's ``init`` does) and each
root-to-leaf path, as the token ids the engine was given and produced, goes through the Megatron model
once; the trainer's log p(token | context) is compared with the node's ``token_logprobs``, token by
token and as each step's mean (what selection's softmax reads).
"""

import json
import sys
import tempfile
from pathlib import Path

import torch


def main(hf_dir: Path, trees_dir: Path, out: Path) -> None:
    from sppd_megatron.conversion.cli import main as convert
    from sppd_megatron.conversion.mcore_checkpoint import load_model_checkpoint, read_checkpoint_model_config
    from sppd_megatron.models.builder import PrecisionConfig, build_gpt_model
    from sppd_megatron.parallel.state import ParallelConfig, destroy, initialize
    from sppd_megatron.records import Tree, read_jsonl
    from sppd_megatron.training.logprobs import token_logprobs

    trees = [t for f in sorted(trees_dir.glob("trees-*.jsonl")) for t in read_jsonl(f, Tree)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "mcore"
        assert convert(["hf-to-mcore", "--hf", str(hf_dir), "--out", str(ckpt)]) == 0
        cfg = read_checkpoint_model_config(ckpt)
        initialize(ParallelConfig(), seed=0)
        model = build_gpt_model(cfg, PrecisionConfig()).eval()
        load_model_checkpoint(model, ckpt, cfg)
    token_diffs, step_diffs = [], []
    seen: set[tuple[str, int]] = set()
    with torch.no_grad():
        for tree in trees:
            prompt = tree.nodes[0].token_ids
            for leaf in tree.leaves():
                path = tree.path(leaf.node_id)
                ids = torch.tensor([prompt + [t for n in path for t in n.token_ids]])
                logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)[:, :-1]
                ours = token_logprobs(logits.contiguous(), ids[:, 1:], cfg.vocab_size)[0, len(prompt) - 1:]
                at = 0
                for node in path:
                    n = len(node.token_ids)
                    if (tree.id, node.node_id) not in seen and n:  # a node shared by several leaves counts once
                        seen.add((tree.id, node.node_id))
                        diff = ours[at:at + n] - torch.tensor(node.token_logprobs)
                        token_diffs.append(diff.abs())
                        step_diffs.append(abs(diff.mean().item()))
                    at += n
    destroy()
    diffs = torch.cat(token_diffs)
    result = {"trees": len(trees), "steps": len(step_diffs), "tokens": diffs.numel(),
              "token_mean_abs": diffs.mean().item(), "token_max_abs": diffs.max().item(),
              "step_mean_logprob_max_abs": max(step_diffs)}
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
