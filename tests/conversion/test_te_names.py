"""Conversion under TransformerEngine's layer spec, proved on CPU (TE itself cannot be imported here).

Every GPU recipe builds the TE spec, whose norms live inside the next linear layer
(``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``). The mapping
must produce exactly that key set, load HF weights into it with logits equal to transformers', export
it back bit-exact, and checkpoints must cross between the specs in both directions (TE's
``_extra_state`` present in one, absent in the other). worker_te_names.py builds the TE layout from
megatron's local layers with TE's parameter names.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("te_names")
    proc = subprocess.run([sys.executable, str(HERE / "worker_te_names.py"), str(root)], cwd=HERE, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((root / "te_names_results.json").read_text())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mapping_speaks_exactly_the_te_key_set(results, family):
    r = results[family]
    assert r["te_has_extra_state"]
    assert r["mapping_keys"] == r["te_keys"]
    # megatron's local spec declares the same names (its sharded_state_dict_keys_map) ...
    assert r["local_keys_in_te_names"] == r["te_keys"]
    assert any(k.endswith("linear_qkv.layer_norm_weight") for k in r["te_keys"])
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in r["te_keys"])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_both_specs_give_transformers_logits_and_checkpoints_cross(results, family):
    r = results[family]
    for key in ("local_logits_vs_hf", "te_logits_vs_hf", "te_ckpt_into_local_logits_vs_hf",
                "local_ckpt_into_te_logits_vs_hf"):
        assert r[key] <= 1e-5, (key, r[key])
