"""torchrun worker (2 processes): converted checkpoints at TP=2 and PP=2 against transformers.

Per family: TP=2 logits and in-memory export; a TP=2 save (the trainer's writer) then PP=2 loads that
TP=2-written checkpoint (resharding on load), checks logits and the export again.
"""

import json
import sys
from pathlib import Path

import torch

from conversion_helpers import FAMILIES, assert_same_tensors, hf_logits, hf_tensors, sample_input_ids


def set_layout(tp: int, pp: int) -> None:
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(0)


def tp_logits(model, ids, vocab):
    from megatron.core import parallel_state

    with torch.no_grad():
        local = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    parts = [torch.empty_like(local) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., :vocab]


def pp_logits(model, ids, cfg):
    """Forward through two stages by hand: stage 0 sends its hidden states to stage 1."""
    from megatron.core import parallel_state

    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        if parallel_state.is_pipeline_first_stage():
            hidden = model(ids, pos, None)
            torch.distributed.send(hidden.contiguous(), dst=1)
            return None
        hidden = torch.empty(ids.shape[1], ids.shape[0], cfg.hidden_size)
        torch.distributed.recv(hidden, src=0)
        model.set_input_tensor(hidden)
        return model(ids, pos, None)[..., : cfg.vocab_size]


def main(root: Path) -> None:
    from sppd_megatron.conversion.mcore_checkpoint import (
        load_model_checkpoint,
        read_checkpoint_model_config,
        save_model_checkpoint,
    )
    from sppd_megatron.conversion.weight_sync import export_hf_state_dict
    from sppd_megatron.models.builder import PrecisionConfig, build_gpt_model
    from sppd_megatron.parallel.state import ParallelConfig, initialize

    initialize(ParallelConfig(tensor_model_parallel_size=2), seed=0)
    rank = torch.distributed.get_rank()
    results = {}
    for name in FAMILIES:
        hf, ckpt, resaved = root / f"hf_{name}", root / f"mcore_{name}", root / f"tp2_saved_{name}"
        cfg = read_checkpoint_model_config(ckpt)
        ids = sample_input_ids(cfg.vocab_size)
        ref = hf_logits(hf, ids)
        reference_tensors = hf_tensors(hf)

        set_layout(2, 1)
        model = build_gpt_model(cfg, PrecisionConfig()).eval()
        load_model_checkpoint(model, ckpt, cfg)
        tp2 = (tp_logits(model, ids, cfg.vocab_size) - ref).abs().max().item()
        assert tp2 <= 1e-4, f"{name}: TP=2 logits differ by {tp2}"
        exported = dict(export_hf_state_dict(model, cfg))
        if rank == 0:
            assert_same_tensors(reference_tensors, exported, f"{name} TP=2 export")
        save_model_checkpoint(model, resaved, cfg, "builtin:char")

        set_layout(1, 2)
        model = build_gpt_model(cfg, PrecisionConfig()).eval()
        load_model_checkpoint(model, resaved, cfg)
        logits = pp_logits(model, ids, cfg)
        exported = dict(export_hf_state_dict(model, cfg))
        if rank == 0:
            assert_same_tensors(reference_tensors, exported, f"{name} PP=2 export")
        if rank == 1:
            pp2 = (logits - ref).abs().max().item()
            assert pp2 <= 1e-4, f"{name}: PP=2 logits differ by {pp2}"
            results[name] = {"tp2_logits_max_abs_diff": tp2, "pp2_logits_max_abs_diff": pp2}
    if rank == 1:
        (root / "parallel_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
