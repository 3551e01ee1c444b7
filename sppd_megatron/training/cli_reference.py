"""``sppd-megatron precompute-ref CONFIG.yaml --out PAIRS.jsonl [dotted.key=value ...]``

Stores reference log-probs with a preference dataset: one forward-only pass of the config's initial
policy (``init``) over ``data.train_file`` writes a copy of it with ``ref_chosen_logp`` and
``ref_rejected_logp`` filled. Training on that file needs no reference model at all. Runs in one
process or under torchrun with the config's TP/PP layout. (``train`` does the same pass by itself
when the records lack reference values; this verb is for preparing a dataset once for many runs.)
With ``data.overlong=drop`` the records left out are not written; they are listed in OUT.rejects.jsonl.
"""

from __future__ import annotations

import argparse
import warnings

from sppd_megatron.config import USER_ERRORS, ConfigError, load_config, report_error
from sppd_megatron.training.config import TrainConfig


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(prog="sppd-megatron precompute-ref", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a preference-stage TrainConfig YAML (dpo, step_dpo, svpo)")
    parser.add_argument("--out", required=True, help="where to write the dataset with reference log-probs")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    # Intermixed: overrides may follow --out, as the usage line writes them.
    args = parser.parse_intermixed_args(argv)
    from sppd_megatron.parallel import state as pstate
    from sppd_megatron.records import PreferencePair, iter_jsonl_lenient, write_jsonl
    from sppd_megatron.tokenization import load_tokenizer
    from sppd_megatron.training import data as tdata
    from sppd_megatron.training.model import build_policy, resolve_model_and_tokenizer
    from sppd_megatron.training.reference import reference_logps

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        if cfg.stage == "sft":
            raise ConfigError(f"{args.config}: stage sft has no reference model")
        pstate.initialize(cfg.parallel, seed=cfg.schedule.seed)
        model_cfg, tokenizer_spec = resolve_model_and_tokenizer(cfg)
        tokenizer = load_tokenizer(tokenizer_spec)
        examples = tdata.load_examples(cfg.data.train_file, cfg.stage, tokenizer, cfg.data.max_length,
                                       model_cfg.vocab_size, append_eos=cfg.data.append_eos,
                                       overlong=cfg.data.overlong,
                                       rejects=f"{args.out}.rejects.jsonl" if pstate.is_rank0() else None)
        model = build_policy(cfg, model_cfg)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        refs = reference_logps(model, examples, cfg, pad_id, model_cfg.vocab_size)
        if pstate.is_rank0():
            kept = {ex.line for ex in examples}  # data.overlong=drop leaves some out
            records = [rec for line, rec, _ in iter_jsonl_lenient(cfg.data.train_file, PreferencePair) if line in kept]
            for rec, (chosen, rejected) in zip(records, refs):
                rec.ref_chosen_logp, rec.ref_rejected_logp = chosen, rejected
            n = write_jsonl(args.out, records)
            print(f"wrote {n} pairs with reference log-probs to {args.out}")
    except USER_ERRORS as exc:
        return report_error("sppd-megatron precompute-ref", exc)
    finally:
        pstate.destroy()
    return 0
