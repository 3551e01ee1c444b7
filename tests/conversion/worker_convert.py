"""torchrun worker (1 process): CLI conversions both ways, TP=1 logits, bit-exact round trip, in-memory export."""

import json
import sys
from pathlib import Path

import torch

from conversion_helpers import FAMILIES, assert_same_tensors, hf_logits, hf_tensors, make_tiny_hf, sample_input_ids


def main(root: Path) -> None:
    from sppd_megatron.conversion.cli import main as convert
    from sppd_megatron.conversion.mcore_checkpoint import load_model_checkpoint, read_checkpoint_model_config
    from sppd_megatron.conversion.weight_sync import export_hf_state_dict, load_into_hf_model
    from sppd_megatron.models.builder import PrecisionConfig, build_gpt_model
    from sppd_megatron.parallel.state import ParallelConfig, destroy, initialize

    results = {}
    for name in FAMILIES:
        hf = make_tiny_hf(root / f"hf_{name}", name)
        ckpt, back = root / f"mcore_{name}", root / f"back_{name}"
        assert convert(["hf-to-mcore", "--hf", str(hf), "--out", str(ckpt), "--tp", "2", "--pp", "2"]) == 0
        # Small shards so the index + several files path is exercised.
        assert convert(["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back), "--hf-template", str(hf),
                        "--max-shard-size", "60KB"]) == 0
        assert (back / "model.safetensors.index.json").is_file()
        assert_same_tensors(hf_tensors(hf), hf_tensors(back), f"{name} HF -> Megatron -> HF")

        cfg = read_checkpoint_model_config(ckpt)
        initialize(ParallelConfig(), seed=0)
        model = build_gpt_model(cfg, PrecisionConfig()).eval()
        load_model_checkpoint(model, ckpt, cfg)
        ids = sample_input_ids(cfg.vocab_size)
        with torch.no_grad():
            pos = torch.arange(ids.shape[1]).expand_as(ids)
            logits = model(ids, pos, None)[..., : cfg.vocab_size]
        diff = (logits - hf_logits(hf, ids)).abs().max().item()
        assert diff <= 1e-4, f"{name}: TP=1 logits differ by {diff}"
        exported = dict(export_hf_state_dict(model, cfg))
        assert_same_tensors(hf_tensors(hf), exported, f"{name} in-memory export")
        from transformers import AutoModelForCausalLM

        engine_model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
        for p in engine_model.parameters():
            p.data.zero_()
        load_into_hf_model(engine_model, export_hf_state_dict(model, cfg))
        with torch.no_grad():
            synced = (engine_model(ids).logits - hf_logits(hf, ids)).abs().max().item()
        assert synced == 0.0, f"{name}: weight-synced engine differs by {synced}"
        destroy()
        results[name] = {"tp1_logits_max_abs_diff": diff}
    # bf16 storage: the export equals the source cast to bf16, bit for bit.
    hf = root / "hf_qwen2"
    assert convert(["hf-to-mcore", "--hf", str(hf), "--out", str(root / "bf16"), "--dtype", "bf16"]) == 0
    assert convert(["mcore-to-hf", "--ckpt", str(root / "bf16"), "--out", str(root / "bf16_back")]) == 0
    expected = {k: v.to(torch.bfloat16) for k, v in hf_tensors(hf).items()}
    assert_same_tensors(expected, hf_tensors(root / "bf16_back"), "bf16 round trip")
    (root / "convert_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
