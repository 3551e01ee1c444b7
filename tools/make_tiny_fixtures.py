"""Regenerate configs/tiny-cpu/data/*.jsonl: small, deterministic arithmetic records for the tiny configs.

    python tools/make_tiny_fixtures.py
"""

from __future__ import annotations

import random
from pathlib import Path

from sppd_megatron.pairs.handmade import handmade_tree, step
from sppd_megatron.records import PreferencePair, SFTExample, write_jsonl

OUT = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu" / "data"
PROMPT = "<|system|>\nPlease reason step by step and put your answer in \\boxed{{}}.\n<|user|>\n{q}\n<|assistant|>\n"


def problem(rng: random.Random):
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
    q = f"Tom has {a} apples, buys {b} more and then {c} more. How many apples?"
    s1 = f"Step 1: {a}+{b}={a + b}.\n\n"
    s2 = f"Step 2: {a + b}+{c}={a + b + c}. The answer is \\boxed{{{a + b + c}}}."
    bad1 = f"Step 1: {a}+{b}={a + b + 1}.\n\n"
    bad2 = f"Step 2: {a + b}+{c}={a + b + c + 2}. The answer is \\boxed{{{a + b + c + 2}}}."
    return PROMPT.format(q=q), (s1, s2), (bad1, bad2), f"q{a}{b}{c}"


def main() -> None:
    rng = random.Random(0)
    sft, dpo, steps = [], [], []
    for _ in range(16):
        prompt, good, bad, qid = problem(rng)
        sft.append(SFTExample(prompt=prompt, response="".join(good), question_id=qid, value=0.9))
        dpo.append(PreferencePair(prompt=prompt, chosen="".join(good), rejected="".join(bad), level="sentence",
                                  pair_type="trajectory", question_id=qid, chosen_value=0.9, rejected_value=0.1))
        steps.append(PreferencePair(prompt=prompt, prefix="", chosen=good[0], rejected=bad[0], chosen_ends=False,
                                    rejected_ends=False, question_id=qid, depth=1,
                                    chosen_value=round(rng.uniform(0.7, 1.0), 3),
                                    rejected_value=round(rng.uniform(0.0, 0.2), 3)))
        steps.append(PreferencePair(prompt=prompt, prefix=good[0], chosen=good[1], rejected=bad[1], question_id=qid,
                                    depth=2, chosen_value=1.0, rejected_value=0.0))
    write_jsonl(OUT / "sft.jsonl", sft)
    write_jsonl(OUT / "dpo.jsonl", dpo)
    write_jsonl(OUT / "step_pairs.jsonl", steps)
    write_jsonl(OUT / "trees.jsonl", trees())


def trees() -> list:
    """Scored trees (value ``tree``) for the prm stage: a right and a wrong first step, each finished
    right and wrong, the values being each state's share of correct leaves."""
    rng = random.Random(1)
    out = []
    for i in range(8):
        prompt, good, bad, qid = problem(rng)
        answer = good[1].split("boxed{")[1].rstrip("}.")
        finish_bad = f"Step 2: so the answer is \\boxed{{{int(answer) + 1}}}."
        out.append(handmade_tree(f"{qid}-{i}", prompt.split("<|user|>\n")[1].split("\n")[0], answer, [
            step(good[0], v=0.5, children=[step(good[1], v=1.0), step(bad[1], v=0.0)]),
            step(bad[0], v=0.0, children=[step(bad[1], v=0.0), step(finish_bad, v=0.0)]),
        ], value_name="tree", prompt=prompt))
    return out


if __name__ == "__main__":
    main()
