"""megatron-bridge for hf-to-mcore, only when asked for (``convert hf-to-mcore --mapper bridge``).

megatron-bridge cannot be installed on a CPU machine (it needs TransformerEngine and CUDA builds), so
this path is written against its ``AutoBridge`` API and is not exercised here; the built-in streaming
mapping (:mod:`hf_to_mcore`, the default) is the tested path. The bridge loads HF weights into the
trainer's own GPTModel (TransformerEngine spec on GPUs, whose parameter names the bridge expects) at
the requested TP/PP under ``torchrun --nproc-per-node TP*PP``, and the result is saved in the same
sppd-megatron checkpoint format. Both mappers share the checks before writing (config, layout,
``--dtype``, ``--overwrite``: :func:`hf_to_mcore.plan_conversion`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sppd_megatron.conversion.errors import ConversionError
from sppd_megatron.conversion.hf_to_mcore import HfToMcoreOptions, plan_conversion, prepare_output_dir


def bridge_unusable_reason() -> str | None:
    """Why megatron-bridge cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "it needs a CUDA device"
    try:
        from megatron.bridge import AutoBridge  # noqa: F401
    except Exception as exc:  # a broken TE/bridge install raises more than ImportError
        return f"importing megatron.bridge failed ({exc}); install megatron-bridge"
    return None


def convert_hf_to_mcore_with_bridge(hf_dir: str | Path, out_dir: str | Path, options: HfToMcoreOptions) -> Path:
    """Run under ``torchrun --nproc-per-node tp*pp``: every rank loads its shard through the bridge."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    hf_config, model_cfg, dtype = plan_conversion(hf_dir, out, options)
    reason = bridge_unusable_reason()
    if reason:
        raise ConversionError(f"--mapper bridge: megatron-bridge is not usable here: {reason}; or use --mapper builtin")
    from megatron.bridge import AutoBridge

    from sppd_megatron.conversion.hf_io import copy_tokenizer_files
    from sppd_megatron.conversion.mcore_checkpoint import save_model_checkpoint
    from sppd_megatron.models.builder import PrecisionConfig, build_gpt_model
    from sppd_megatron.parallel.state import ParallelConfig, destroy, initialize

    tp, pp = options.tensor_model_parallel_size, options.pipeline_model_parallel_size
    initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=0)
    try:
        if torch.distributed.get_rank() == 0:  # one rank clears and fills the shared directory
            prepare_output_dir(out, options.overwrite)
            has_tokenizer = bool(copy_tokenizer_files(hf_dir, out / "tokenizer"))
        else:
            has_tokenizer = False
        flag = [has_tokenizer]
        torch.distributed.broadcast_object_list(flag, src=0)
        model = build_gpt_model(model_cfg, PrecisionConfig(params_dtype=dtype))
        AutoBridge.from_hf_pretrained(str(hf_dir)).load_hf_weights([model])
        save_model_checkpoint(model, out, model_cfg, "tokenizer" if flag[0] else None,
                              source=str(hf_dir.resolve()), hf_config=hf_config, dtype=dtype)
    finally:
        destroy()
    return out
