"""Worker (one process): the mapping in TransformerEngine's names, checked without TE.

TE cannot be imported on a CPU machine, so the TE layer spec is reproduced with megatron's local
tensor-parallel layers and TE's naming: ``LayerNormColumnParallelLinear`` below is what megatron's
``TELayerNormColumnParallelLinear`` (TE's ``LayerNormLinear``, transformer_engine/pytorch/module/
layernorm_linear.py) exposes: the pre-norm fused into the projection, its RMSNorm gain registered as
``layer_norm_weight`` (no ``layer_norm_bias`` for RMSNorm), and an ``_extra_state`` (TE's FP8
metadata) on every module. The spec is megatron's own TE layout: identity input/pre-MLP norms, fused
norms in linear_qkv and linear_fc1, no key renaming.

    python tests/conversion/worker_te_names.py ROOT      -> ROOT/te_names_results.json
"""

import copy
import json
import sys
from pathlib import Path

import torch

from conversion_helpers import assert_same_tensors, hf_logits, hf_tensors, make_tiny_hf, sample_input_ids


def te_like_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp

    class LayerNormColumnParallelLinear(ColumnParallelLinear):
        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.eps = config.layernorm_epsilon
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))

        def forward(self, input_, weight=None, runtime_gather_output=None):
            normed = torch.nn.functional.rms_norm(input_, (input_.shape[-1],), self.layer_norm_weight, self.eps)
            return super().forward(normed, weight, runtime_gather_output)

        def get_extra_state(self):
            return torch.zeros(4, dtype=torch.uint8)  # TE serialises its FP8 state as bytes

        def set_extra_state(self, state):
            pass

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    sub = copy.deepcopy(spec.submodules)
    sub.input_layernorm = IdentityOp
    sub.pre_mlp_layernorm = IdentityOp
    sub.self_attention.submodules.linear_qkv = LayerNormColumnParallelLinear
    sub.mlp.submodules.linear_fc1 = LayerNormColumnParallelLinear
    sub.sharded_state_dict_keys_map = {}
    return type(spec)(module=spec.module, params=spec.params, submodules=sub)


def main(root: Path) -> None:
    import sppd_megatron.models.builder as builder
    from sppd_megatron.conversion.hf_io import HFTensorReader
    from sppd_megatron.conversion.mapping import load_hf_into_model, mcore_local_keys, te_named_state
    from sppd_megatron.conversion.mcore_checkpoint import load_model_checkpoint, save_model_checkpoint
    from sppd_megatron.conversion.mcore_to_hf import iter_checkpoint_hf_tensors
    from sppd_megatron.conversion.weight_sync import export_hf_state_dict
    from sppd_megatron.models.config import model_config_from_hf
    from sppd_megatron.parallel.state import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=0)
    local_spec = builder.layer_spec

    def build(kind, cfg):
        builder.layer_spec = (lambda impl: te_like_spec()) if kind == "te" else local_spec
        try:
            return builder.build_gpt_model(cfg, builder.PrecisionConfig(transformer_impl="local")).eval()
        finally:
            builder.layer_spec = local_spec

    def logits(model, ids, cfg):
        with torch.no_grad():
            return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)[..., : cfg.vocab_size]

    results = {}
    for name in ("llama", "qwen2"):
        hf = make_tiny_hf(root / f"hf_{name}", name)
        cfg = model_config_from_hf(hf)
        ids = sample_input_ids(cfg.vocab_size)
        reference = hf_logits(hf, ids)
        models = {}
        for kind in ("local", "te"):
            model = build(kind, cfg)
            with HFTensorReader(hf) as reader:
                load_hf_into_model(model, reader.get, cfg)
            models[kind] = model
        weights = lambda m: {k for k in te_named_state(m, m.state_dict()) if not k.endswith("_extra_state")}
        te_state = models["te"].state_dict()
        r = {
            "te_keys": sorted(k for k in te_state if not k.endswith("_extra_state")),
            "te_has_extra_state": any(k.endswith("_extra_state") for k in te_state),
            "local_keys_in_te_names": sorted(weights(models["local"])),
            "mapping_keys": sorted(mcore_local_keys(cfg, cfg.num_layers, True, True)),
        }
        for kind, model in models.items():
            r[f"{kind}_logits_vs_hf"] = (logits(model, ids, cfg) - reference).abs().max().item()
            assert_same_tensors(hf_tensors(hf), dict(export_hf_state_dict(model, cfg)), f"{name} {kind} export")

        # A checkpoint written under one spec loads under the other (TE's _extra_state present or not).
        for writer, reader_kind in (("te", "local"), ("local", "te")):
            ckpt = root / f"ckpt_{name}_{writer}"
            save_model_checkpoint(models[writer], ckpt, cfg, None)
            fresh = build(reader_kind, cfg)
            load_model_checkpoint(fresh, ckpt, cfg)
            r[f"{writer}_ckpt_into_{reader_kind}_logits_vs_hf"] = (logits(fresh, ids, cfg) - reference).abs().max().item()
            assert_same_tensors(hf_tensors(hf), dict(iter_checkpoint_hf_tensors(ckpt, cfg, torch.float32)),
                                f"{name} {writer}-spec checkpoint -> HF")
        results[name] = r
    (root / "te_names_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
