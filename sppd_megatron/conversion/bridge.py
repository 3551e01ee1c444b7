"""megatron-bridge, used for hf-to-mcore when it is installed and works (GPU machines).

megatron-bridge cannot be installed on a CPU machine (it needs TransformerEngine and CUDA builds), so
this path is written against its documented ``AutoBridge`` API and is not exercised here; the
built-in streaming mapping (:mod:`hf_to_mcore`) is the tested path and the fallback. The bridge
loads HF weights into the trainer's own GPTModel (TransformerEngine spec on GPUs, whose parameter
names the bridge expects) at the requested TP/PP under torchrun, and the result is saved in the
same sppd-megatron checkpoint format.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sppd_megatron.conversion.errors import ConversionError


def bridge_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from megatron.bridge import AutoBridge  # noqa: F401
    except Exception:  # a broken TE/bridge install raises more than ImportError
        return False
    return True


def convert_hf_to_mcore_with_bridge(hf_dir: str | Path, out_dir: str | Path, tp: int, pp: int, dtype: str) -> Path:
    """Run under ``torchrun --nproc-per-node tp*pp``: every rank loads its shard through the bridge."""
    if not bridge_usable():
        raise ConversionError("megatron-bridge is not usable here (needs CUDA + megatron-bridge); use --mapper builtin")
    from megatron.bridge import AutoBridge

    from sppd_megatron.conversion.hf_io import copy_tokenizer_files, read_hf_config
    from sppd_megatron.conversion.mcore_checkpoint import save_model_checkpoint
    from sppd_megatron.models.builder import PrecisionConfig, build_gpt_model
    from sppd_megatron.parallel.state import ParallelConfig, destroy, initialize

    hf_config, model_cfg = read_hf_config(hf_dir)
    initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=0)
    try:
        model = build_gpt_model(model_cfg, PrecisionConfig(params_dtype=dtype))
        AutoBridge.from_hf_pretrained(str(hf_dir)).load_hf_weights([model])
        out = Path(out_dir)
        tokenizer_spec = "tokenizer" if copy_tokenizer_files(hf_dir, out / "tokenizer") else None
        save_model_checkpoint(model, out, model_cfg, tokenizer_spec, source=str(Path(hf_dir).resolve()),
                              hf_config=hf_config, dtype=dtype)
    finally:
        destroy()
    return out
