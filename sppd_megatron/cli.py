"""``sppd-megatron VERB ...``: one console script, one module per verb.

Each verb lives in its stage's package as ``<module>.main(argv) -> int`` and is imported only when
called, so ``sppd-megatron pairs`` never pays for importing Megatron.
"""

from __future__ import annotations

import importlib
import sys

VERBS: dict[str, tuple[str, str]] = {
    "train": ("sppd_megatron.training.cli", "train a policy: stages sft, dpo, step_dpo, svpo"),
    "precompute-ref": ("sppd_megatron.training.cli_reference", "store reference log-probs with a dataset"),
    "convert": ("sppd_megatron.conversion.cli", "convert checkpoints: hf-to-mcore, mcore-to-hf"),
    "sample": ("sppd_megatron.sampling.cli", "tree-based self-sampling of reasoning steps"),
    "score": ("sppd_megatron.scoring.cli", "add process-reward step values to trees"),
    "pairs": ("sppd_megatron.pairs.cli", "build SFT-PRM, DPO-PRM, step and SVPO pairs from scored trees"),
    "eval": ("sppd_megatron.evaluation.cli", "Greedy-CoT, MAJ@N, ORM_VOTE@N, ORM_MAX@N on benchmarks"),
    "run": ("sppd_megatron.pipeline.cli", "the whole self-training loop in a run directory"),
    "demo": ("sppd_megatron.pipeline.demo", "the embedded CPU default: train a tiny model, run SPPD"),
    "plan": ("sppd_megatron.planning.cli", "validate a recipe's parallel layout and plan per-GPU memory"),
}


def _usage() -> str:
    lines = ["usage: sppd-megatron VERB [args...]", "", "verbs:"]
    lines += [f"  {verb:<15} {help_}" for verb, (_, help_) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"sppd-megatron: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
