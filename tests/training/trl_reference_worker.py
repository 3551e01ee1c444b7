"""Prints TRL's DPO and SFT losses and ours on the same tiny models and data (run as a subprocess by the test).

TRL runs its own tokenisation, collation and log-prob code on Hugging Face models; ours runs the
training data path and a Megatron GPTModel loaded with the same weights. For SFT ours is the
trainer's first step itself (micro-batches of one, Megatron's loss reduction), loss and gradient norm.
"""

import json
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")

ROWS = [
    {"prompt": "Q: 2+3?\nA:", "chosen": " 5.", "rejected": " 6!"},
    {"prompt": "Q: 1+1?\nA:", "chosen": " 2", "rejected": " 11"},
    {"prompt": "Q: 9-4?\nStep 1:", "chosen": " 9-4=5. The answer is 5", "rejected": " 4"},
    {"prompt": "Q: 3*3?\n", "chosen": "9", "rejected": "It is 33"},
]
# RPO: TRL averages the chosen NLL over the batch's tokens, we average per pair; equal chosen
# lengths make the two the same number.
RPO_ROWS = [
    {"prompt": "Q: 2+3?\nA:", "chosen": " 5.", "rejected": " 6!"},
    {"prompt": "Q: 1+1?\nA:", "chosen": " 2.", "rejected": " 11"},
    {"prompt": "Q: 9-4?\nStep 1:", "chosen": " 5.", "rejected": " 9-4=4. The answer is 4"},
    {"prompt": "Q: 3*3?\n", "chosen": "9.\n", "rejected": "It is 33"},
]
RPO_ALPHA = 0.7
# Responses of very different lengths, so a token-level mean and a mean of per-sequence means differ.
SFT_ROWS = [
    {"prompt": "Q: 2+3?\nA:", "completion": " 5"},
    {"prompt": "Q: 9-4?\n", "completion": "Step 1: 9-4=5.\n\nStep 2: so the answer is 5."},
    {"prompt": "Q: 1+1?\nA:", "completion": " 1+1=2, the answer is 2"},
    {"prompt": "Q: 3*3?\n", "completion": "9."},
]


def trl_loss(policy, ref, tok, beta, loss_type, label_smoothing, rows=ROWS, rpo_alpha=0.0):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    loss_types, weights = ([loss_type, "sft"], [1.0, rpo_alpha]) if rpo_alpha else ([loss_type], None)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), beta=beta, loss_type=loss_types, loss_weights=weights,
                     label_smoothing=label_smoothing, report_to=[], per_device_train_batch_size=len(rows),
                     max_length=128, use_cpu=True, bf16=False, fp16=False)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    return float(trainer.compute_loss(policy, batch))


def our_loss(policy, ref, tok, beta, variant, label_smoothing, rows=ROWS, rpo_alpha=0.0):
    import torch

    from sppd_megatron.conversion.mapping import load_hf_into_model
    from sppd_megatron.models.builder import PrecisionConfig, build_gpt_model
    from sppd_megatron.models.config import model_config_from_hf
    from sppd_megatron.parallel.state import ParallelConfig, initialize
    from sppd_megatron.records import PreferencePair, write_jsonl
    from sppd_megatron.training import data as tdata
    from sppd_megatron.training.config import LossConfig
    from sppd_megatron.training.forward import compute_losses, sequence_logps
    from sppd_megatron.training.packing import pad

    initialize(ParallelConfig(), seed=0)
    cfg = model_config_from_hf(policy.config.to_dict())
    path = tempfile.mktemp(suffix=".jsonl")
    write_jsonl(path, [PreferencePair(level="sentence", **r) for r in rows])
    examples = tdata.load_examples(path, "dpo", tok, 128, cfg.vocab_size)
    batch = pad(examples, 128, tok.pad_token_id)
    models = []
    for hf in (policy, ref):
        m = build_gpt_model(cfg, PrecisionConfig())
        sd = hf.state_dict()
        load_hf_into_model(m, sd.__getitem__, cfg)
        models.append(m)
    with torch.no_grad():
        out_ref = models[1](batch["tokens"], batch["position_ids"], None)
        batch["ref_logps"] = sequence_logps(out_ref, batch, cfg.vocab_size)[0]
        out = models[0](batch["tokens"], batch["position_ids"], None)
        loss_cfg = LossConfig(beta=beta, dpo_variant=variant, label_smoothing=label_smoothing, rpo_alpha=rpo_alpha)
        per_pair, _, _ = compute_losses("dpo", loss_cfg, models[0], out, batch, cfg.vocab_size)
    return float(per_pair.mean())


def trl_sft(model, tok, reduction: str) -> tuple[float, float]:
    """TRL SFTTrainer's loss and gradient norm on SFT_ROWS as one batch.

    TRL's loss is the token-level mean over the batch; the per-sequence convention is the mean of
    TRL's loss on each row alone.
    """
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=tempfile.mkdtemp(), report_to=[], per_device_train_batch_size=len(SFT_ROWS),
                     max_length=128, use_cpu=True, bf16=False, fp16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(SFT_ROWS), processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(len(SFT_ROWS))]
    groups = [rows] if reduction == "token" else [[r] for r in rows]
    model.zero_grad()
    loss = sum(trainer.compute_loss(model, trainer.data_collator(g)) for g in groups) / len(groups)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return float(loss), float(grad_norm)


def our_sft(hf_dir: str, reduction: str | None) -> tuple[float, float]:
    """Step 1 of ``train`` (stage sft, micro-batches of one row) from the same weights: loss and grad norm."""
    from pathlib import Path

    from sppd_megatron.config import load_config
    from sppd_megatron.records import SFTExample, write_jsonl
    from sppd_megatron.training.config import TrainConfig
    from sppd_megatron.training.trainer import train

    work = Path(tempfile.mkdtemp())
    data = work / "sft.jsonl"
    write_jsonl(data, [SFTExample(prompt=r["prompt"], response=r["completion"]) for r in SFT_ROWS])
    (work / "sft.yaml").write_text("stage: sft\n")
    overrides = [f"output_dir={work / 'out'}", f"data.train_file={data}", "init.source=hf", f"init.path={hf_dir}",
                 "data.max_length=128", f"schedule.global_batch_size={len(SFT_ROWS)}", "schedule.micro_batch_size=1",
                 "schedule.train_steps=1", "optim.optimizer=sgd", "optim.lr=0", "checkpoint.save_final=false",
                 "logging.progress=false", "logging.tensorboard=false"]
    if reduction is not None:
        overrides.append(f"loss.sft_reduction={reduction}")
    last = train(load_config(TrainConfig, str(work / "sft.yaml"), overrides))
    return last["loss"], last["grad_norm"]


def main():
    from sppd_megatron.models.tiny import build_tiny_hf_model, save_tiny_hf_checkpoint
    from sppd_megatron.tokenization import build_char_tokenizer

    tok = build_char_tokenizer()
    out = {}
    for family in ("llama", "qwen2"):
        policy = build_tiny_hf_model(family, seed=0)
        ref = build_tiny_hf_model(family, seed=1)
        # TRL 1.x's "sigmoid" ignores label_smoothing (cDPO is checked against its formula instead).
        out[family] = {"trl": trl_loss(policy, ref, tok, 0.5, "sigmoid", 0.0),
                       "ours": our_loss(policy, ref, tok, 0.5, "sigmoid", 0.0)}
        out[f"{family}-rpo"] = {"trl": trl_loss(policy, ref, tok, 0.5, "sigmoid", 0.0, RPO_ROWS, RPO_ALPHA),
                                "ours": our_loss(policy, ref, tok, 0.5, "sigmoid", 0.0, RPO_ROWS, RPO_ALPHA)}
    for family in ("llama", "qwen2"):
        hf_dir = tempfile.mkdtemp()
        save_tiny_hf_checkpoint(hf_dir, family, seed=0)
        model = build_tiny_hf_model(family, seed=0)
        for reduction in ("token", "sequence"):
            trl = trl_sft(model, tok, reduction)
            # The default is token-level (no override), as in Megatron and TRL.
            ours = our_sft(hf_dir, None if reduction == "token" else reduction)
            out[f"{family}-sft-{reduction}"] = {"trl": trl[0], "ours": ours[0]}
            out[f"{family}-sft-{reduction}-grad_norm"] = {"trl": trl[1], "ours": ours[1]}
    print("RESULTS " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
