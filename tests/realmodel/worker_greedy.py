"""torchrun worker (1 process): greedy generation of a trained Megatron checkpoint against its HF export.

    worker_greedy.py CHECKPOINT HF_EXPORT PROMPTS_JSON NEW_TOKENS OUT_JSON

The checkpoint's continuation is decoded by argmax over the Megatron model's logits (the whole sequence
recomputed each token); the export's by ``transformers`` ``generate(do_sample=False)``. PROMPTS_JSON
holds lists of prompt token ids.
"""

import json
import sys
from pathlib import Path

import torch


def main(ckpt: Path, hf_dir: Path, prompts_file: Path, new_tokens: int, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    from sppd_megatron.conversion.mcore_checkpoint import load_model_checkpoint, read_checkpoint_model_config
    from sppd_megatron.models.builder import PrecisionConfig, build_gpt_model
    from sppd_megatron.parallel.state import ParallelConfig, destroy, initialize

    prompts = json.loads(prompts_file.read_text())
    cfg = read_checkpoint_model_config(ckpt)
    initialize(ParallelConfig(), seed=0)
    model = build_gpt_model(cfg, PrecisionConfig()).eval()
    load_model_checkpoint(model, ckpt, cfg)
    exported = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ours, theirs = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for _ in range(new_tokens):
                logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
                ids = torch.cat([ids, logits[:, -1, :cfg.vocab_size].argmax(-1, keepdim=True)], dim=1)
            ours.append(ids[0, len(prompt):].tolist())
            gen = exported.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=0)
            theirs.append(gen[0, len(prompt):].tolist())
    destroy()
    result = {"prompts": len(prompts), "identical": sum(a == b for a, b in zip(ours, theirs)), "megatron": ours,
              "exported": theirs}
    out.write_text(json.dumps(result))
    print(json.dumps({k: result[k] for k in ("prompts", "identical")}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
