"""Subprocess worker: the trainer's forward/backward with the accelerator played by ``meta``.

    python tests/training/placement_worker.py

The CPU shim stands ``meta`` in for CUDA, so the policy is built where it would be on a GPU, batches
are collated on the host (CPU) as in a real run, and any tensor the trainer creates without naming
the model's device is a CPU tensor that cannot meet a ``meta`` one: the op raises. Nothing computes,
so collectives are skipped for ``meta`` tensors (one process: they would be identities anyway).
Prints ``PLACEMENT {json}``.
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")


def _skip_collectives_on_meta() -> None:
    import torch.distributed as dist

    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
        real = getattr(dist, name)

        def wrapper(*args, _real=real, **kwargs):
            tensors = [a for a in args if hasattr(a, "is_meta")]
            if tensors and all(t.is_meta for t in tensors):
                return None
            return _real(*args, **kwargs)

        setattr(dist, name, wrapper)


def main() -> None:
    import torch

    from sppd_megatron.parallel.cpu_shim import enable_cpu_shim

    enable_cpu_shim(stand_in="meta")
    _skip_collectives_on_meta()

    from megatron.core import parallel_state

    from sppd_megatron.config import load_config
    from sppd_megatron.parallel import state as pstate
    from sppd_megatron.tokenization import load_tokenizer
    from sppd_megatron.training import data as tdata
    from sppd_megatron.training import batching, model as policy
    from sppd_megatron.training.config import TrainConfig
    from sppd_megatron.training.forward import make_forward_step, make_logp_step

    results = {}
    for stage in ("sft", "step_dpo", "svpo"):
        cfg = load_config(TrainConfig, f"configs/tiny-cpu/{stage}.yaml", ["logging.progress=false"])
        pstate.initialize(cfg.parallel, seed=0)
        model_cfg, tok_spec = policy.resolve_model_and_tokenizer(cfg)
        tokenizer = load_tokenizer(tok_spec)
        examples = tdata.load_examples(cfg.data.train_file, stage, tokenizer, cfg.data.max_length,
                                       model_cfg.vocab_size, need_values=stage != "sft")
        for ex in examples:  # as if precomputed: the reference pass itself is checked below
            ex.ref_logps = [-1.0 for _ in ex.ref_logps]
        model = policy.build_policy(cfg, model_cfg)
        devices = sorted({str(p.device) for p in model.parameters()})
        ddp = policy.wrap_ddp(model, cfg)
        indices = list(range(cfg.schedule.global_batch_size))
        batches = batching.microbatches(examples, indices, cfg, pad_id=0)
        host = sorted({str(t.device) for b in batches for t in b.values()})
        reports = batching.run_forward_backward(ddp, make_forward_step(stage, cfg.loss, model_cfg.vocab_size),
                                               batches, cfg, forward_only=False)
        report_devices = sorted({str(t.device) for r in reports for t in r.values()})
        grad_devices = sorted({str(p.main_grad.device) for p in model.parameters() if hasattr(p, "main_grad")})
        with torch.no_grad():
            logp = batching.run_forward_backward(model, make_logp_step(model_cfg.vocab_size), batches, cfg,
                                                forward_only=True)
        results[stage] = {
            "parameters": devices,
            "batches": host,
            "reports": report_devices,
            "grads": grad_devices,
            "reference": sorted({str(r["seq_logps"].device) for r in logp}),
        }
        parallel_state.destroy_model_parallel()
    print("PLACEMENT " + json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
