"""``sppd-megatron sample CONFIG.yaml [dotted.key=value ...]``: a directory of tree shards.

Questions are processed in fixed groups of ``questions_per_round`` (by index), so the float
arithmetic of every batched engine call is the same in an uninterrupted and a resumed run. A group
whose trees are all on disk is skipped; a group cut short by a crash is sampled again in full (its
trees would otherwise come from a differently-shaped batch) and only its missing trees are written.
"""

from __future__ import annotations

import sys
import time

from sppd_megatron.config import USER_ERRORS, config_to_dict, parse_config_command, report_error
from sppd_megatron.locking import locked
from sppd_megatron.sampling.config import SampleConfig
from sppd_megatron.sampling.output import ShardedTreeWriter, write_manifest


def resolve_tokenizer_spec(cfg: SampleConfig) -> str:
    if cfg.tokenizer:
        return cfg.tokenizer
    return "builtin:char" if cfg.model.startswith("tiny:") else cfg.model


def run_sampling(cfg: SampleConfig) -> dict:
    """Sample every missing tree of ``cfg`` into ``cfg.output_dir`` (locked meanwhile); returns a summary."""
    with locked(cfg.output_dir):
        return _sample(cfg)


def _sample(cfg: SampleConfig) -> dict:
    from tqdm import tqdm

    from sppd_megatron.sampling.engines import build_engine
    from sppd_megatron.sampling.prompts import load_prompts, resolve_template
    from sppd_megatron.sampling.tree_sampler import TreeSampler
    from sppd_megatron.tokenization import load_tokenizer

    prompts = load_prompts(cfg.input, cfg.fields, cfg.num_questions)
    tokenizer_spec = resolve_tokenizer_spec(cfg)
    tokenizer = load_tokenizer(tokenizer_spec)
    template = resolve_template(cfg.template, tokenizer)
    # Only once the inputs are read: a typo fixed in the next command is not "a different config".
    write_manifest(cfg.output_dir, config_to_dict(cfg), {"num_questions": len(prompts)})

    writer = ShardedTreeWriter(cfg.output_dir, cfg.shard_size)
    skipped = sum(p.id in writer.done for p in prompts)
    todo_groups = []
    for start in range(0, len(prompts), cfg.questions_per_round):
        group = list(range(start, min(start + cfg.questions_per_round, len(prompts))))
        if any(prompts[i].id not in writer.done for i in group):
            todo_groups.append(group)
    summary = {"questions": len(prompts), "already_done": skipped, "written": 0}
    if not todo_groups:
        writer.close()
        return {**summary, "generated_tokens": 0, "computed_tokens": 0, "context_tokens": 0,
                "cached_prefix_tokens": 0, "cache_hit_rate": 0.0, "seconds": 0.0, "steps": 0,
                "steps_retokenised_differently": 0, "steps_merging_with_context": 0}

    engine = build_engine(cfg.engine, cfg.model, tokenizer, tokenizer_path=tokenizer_spec, seed=cfg.seed)
    value_prm = None
    if cfg.algorithm == "mcts" and cfg.mcts.value_weight > 0:  # AlphaMath's leaf estimate from a value head
        from sppd_megatron.training.value_prm import MegatronValuePRM, ValueHeadPRMConfig

        value_prm = MegatronValuePRM(ValueHeadPRMConfig(path=cfg.mcts.value_model))
    sampler = TreeSampler(engine, tokenizer, cfg, template, value_prm=value_prm)
    start_time = time.perf_counter()
    bar = tqdm(total=len(prompts), initial=skipped, unit="q", desc="sample", disable=not cfg.progress,
               file=sys.stderr, dynamic_ncols=True)

    def on_round(stats) -> None:
        elapsed = max(time.perf_counter() - start_time, 1e-9)
        bar.set_postfix(tok_s=f"{stats.generated_tokens / elapsed:.0f}", cache_hit=f"{stats.cache_hit_rate:.0%}",
                        refresh=False)
        bar.refresh()

    try:
        with writer:
            for group in todo_groups:
                trees = sampler.sample([prompts[i] for i in group], on_round=on_round)
                for i, tree in zip(group, trees):
                    if tree.id in writer.done:
                        continue
                    writer.write(i, tree)
                    summary["written"] += 1
                    bar.update(1)
    finally:
        bar.close()
        engine.close()
        if value_prm is not None:
            value_prm.close()
    stats = sampler.stats
    summary.update(generated_tokens=stats.generated_tokens, computed_tokens=stats.computed_tokens,
                   context_tokens=stats.context_tokens, cached_prefix_tokens=stats.cached_prefix_tokens,
                   cache_hit_rate=stats.cache_hit_rate, seconds=time.perf_counter() - start_time, steps=stats.steps,
                   steps_retokenised_differently=stats.steps_retokenised_differently,
                   steps_merging_with_context=stats.steps_merging_with_context)
    # What this invocation did (a resumed run counts only the trees it sampled).
    this_run = {k: v for k, v in summary.items() if k not in ("questions", "already_done")}
    write_manifest(cfg.output_dir, config_to_dict(cfg), {"num_questions": len(prompts), "complete": True,
                                                         "this_run": this_run})
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config_command("sppd-megatron sample", SampleConfig, argv, __doc__, "K=8 engine.reuse_prefix=false")
        summary = run_sampling(cfg)
    except USER_ERRORS as exc:
        return report_error("sppd-megatron sample", exc)
    secs = max(summary["seconds"], 1e-9)
    print(f"sampled {summary['written']} trees ({summary['already_done']} already done) of "
          f"{summary['questions']} questions into {cfg.output_dir} in {summary['seconds']:.1f}s; "
          f"generated {summary['generated_tokens']} tokens ({summary['generated_tokens'] / secs:.0f} tok/s), "
          f"computed {summary['computed_tokens']}; prefix cache served {summary['cache_hit_rate']:.1%} of "
          f"{summary['context_tokens']} context tokens; of {summary['steps']} steps, "
          f"{summary['steps_retokenised_differently']} re-tokenise to other ids in context and "
          f"{summary['steps_merging_with_context']} merge with their context (pairs drops those)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
