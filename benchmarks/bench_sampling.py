"""Prefix reuse in the embedded engine: tree sampling of 50 GSM8K questions with K=64, C=2.

    .venv/bin/python benchmarks/bench_sampling.py [--questions 50] [--K 64] [--C 2] [--step-tokens 16]

Runs the same sampling twice with the tiny random Llama (character tokenizer) on CPU: with a
shared context prefilled once per expansion and a prefix cache across rounds
(``reuse_prefix=True``), and with every branch prefilling its own context. Prints the unique
tokens of the trees (each prompt once, each node's step once: the least any engine has to run
through the model), the tokens the engine actually computed (uncached context + generated) and
their ratio (below 1 is possible: a leaf's last token is sampled but never run through the
model), the prefix-cache hit rate (share of the requested context tokens that were not
recomputed), and the wall time of both runs. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import time

import torch

from sppd_megatron.records import PromptTemplate
from sppd_megatron.sampling.config import EngineConfig, SampleConfig
from sppd_megatron.sampling.engines.transformers_engine import TransformersEngine, load_causal_lm
from sppd_megatron.sampling.prompts import load_prompts, resolve_template
from sppd_megatron.sampling.tree_sampler import TreeSampler
from sppd_megatron.tokenization import build_char_tokenizer



def run(cfg: SampleConfig, prompts, model, tokenizer, template, reuse: bool):
    engine = TransformersEngine(model, tokenizer, reuse_prefix=reuse, seed=cfg.seed)
    sampler = TreeSampler(engine, tokenizer, cfg, template)
    start = time.perf_counter()
    trees = sampler.sample(prompts)
    return trees, sampler.stats, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default="gsm8k", help="prompt source (default: the packaged GSM8K test set)")
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--C", type=int, default=2)
    ap.add_argument("--step-tokens", type=int, default=16, help="max_step_tokens (tiny model: gibberish steps)")
    ap.add_argument("--total-tokens", type=int, default=96, help="max_total_tokens per trajectory")
    ap.add_argument("--max-depth", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = SampleConfig(input=args.input, output_dir="-", K=args.K, C=args.C, max_step_tokens=args.step_tokens,
                       max_total_tokens=args.total_tokens, max_depth=args.max_depth,
                       questions_per_round=args.questions, engine=EngineConfig(num_threads=args.threads))
    tokenizer = build_char_tokenizer()
    template = resolve_template(PromptTemplate(), tokenizer)
    model = load_causal_lm("tiny:llama", tokenizer)
    prompts = load_prompts(cfg.input, limit=args.questions)

    trees, shared, t_shared = run(cfg, prompts, model, tokenizer, template, reuse=True)
    trees_sep, separate, t_sep = run(cfg, prompts, model, tokenizer, template, reuse=False)

    unique = sum(len(n.token_ids) for t in trees for n in t.nodes)
    same = sum([n.token_ids for n in a.nodes] == [n.token_ids for n in b.nodes] for a, b in zip(trees, trees_sep))

    print(f"tiny llama (char tokenizer), {len(prompts)} questions, K={cfg.K}, C={cfg.C}, "
          f"max_step_tokens={cfg.max_step_tokens}, max_total_tokens={cfg.max_total_tokens}, "
          f"threads={args.threads}")
    print(f"trees: {sum(len(t.nodes) for t in trees)} nodes, {sum(len(t.trajectories()) for t in trees)} "
          f"trajectories, {shared.requests} engine requests, {shared.generated_tokens} generated tokens")
    print(f"unique tree tokens (prompts + steps, each once): {unique}")
    for name, stats in (("prefix reuse:   ", shared), ("no prefix reuse:", separate)):
        print(f"{name} computed {stats.computed_tokens} tokens = {stats.computed_tokens / unique:.2f}x the unique; "
              f"prefix-cache hit rate {stats.cached_prefix_tokens / stats.context_tokens:.1%} "
              f"({stats.cached_prefix_tokens} of {stats.context_tokens} context tokens not recomputed)")
    print(f"wall time: prefix reuse {t_shared:.1f}s, no reuse {t_sep:.1f}s, speed-up {t_sep / t_shared:.2f}x")
    # Reuse changes the shapes of the float computations, so a draw that lands within ~1e-7 of a
    # CDF boundary can flip and a tree then diverges; each run on its own is deterministic.
    print(f"trees identical with and without reuse: {same}/{len(trees)}")


if __name__ == "__main__":
    main()
