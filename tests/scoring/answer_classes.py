"""Grader test cases built from real answers: the packaged MATH-500 and GSM8K test sets.

Each class holds (gold, rewrites, perturbations): rewrites state the same answer in another form
(never the gold's own string), perturbations change exactly one digit of the gold. The classes are the
answer forms where a grader can read the gold only in part: prose between ``$`` signs, multi-line
matrices, set-builder and interval notation, units, equations and chains, symbols that a LaTeX parser
reads as functions (``\\gamma``), beside plain MATH-500 and GSM8K answers.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

from sppd_megatron.sampling.prompts import source_path


@dataclass
class Case:
    gold: str
    rewrites: list[str] = field(default_factory=list)
    perturbed: list[str] = field(default_factory=list)


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in source_path(name).read_text().splitlines() if line.strip()]


def one_digit_changes(text: str, rng: random.Random, count: int = 2) -> list[str]:
    """``count`` copies of ``text`` with one digit replaced by another (a leading digit never by 0)."""
    spots = [m.start() for m in re.finditer(r"\d", text)]
    out: list[str] = []
    for at in rng.sample(spots, min(count, len(spots))):
        leading = at == 0 or not text[at - 1].isdigit() and text[at - 1] != "."
        choices = [d for d in "0123456789" if d != text[at] and not (leading and d == "0" and text[at + 1:at + 2].isdigit())]
        out.append(text[:at] + rng.choice(choices) + text[at + 1:])
    return out


def restyle(latex: str) -> str:
    """The same LaTeX written differently: \\frac as \\dfrac (or back), else a number as N.0, else in \\left( \\right)."""
    if "\\dfrac" in latex:
        return latex.replace("\\dfrac", "\\frac")
    if "\\frac" in latex:
        return latex.replace("\\frac", "\\dfrac")
    if re.fullmatch(r"-?\d+", latex):
        return f"{latex}.0"
    if re.fullmatch(r"-?\d{1,3}(?:,(?:\\!)?\s*\d{3})+", latex):  # 10,\!080
        return re.sub(r",(?:\\!)?\s*", "", latex)
    if re.search(r"[=<>]|\\le|\\ge|\\cup|\\begin|\\in|\\infty", latex):
        spaced = latex.replace(",", ",\\,")
        return spaced if spaced != latex else " " + latex.replace("=", " = ").replace("<", " < ") + " "
    return rf"\left({latex}\right)"


def _numeric_golds(rows: list[dict]) -> list[str]:
    return [r["answer"] for r in rows if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\\frac\{\d+\}\{\d+\}", r["answer"])]


def build_classes(seed: int = 0) -> dict[str, list[Case]]:
    rng = random.Random(seed)
    math500, gsm8k = _rows("math500"), _rows("gsm8k")
    numbers = _numeric_golds(math500)
    classes: dict[str, list[Case]] = {}

    # Plain GSM8K answers: the number after ####.
    cases = []
    for row in gsm8k[:400]:
        n = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        value = float(n)
        rewrites = [f"{int(value):,}" if value == int(value) and abs(value) >= 1000 else f"{n}.0",
                    rf"\frac{{{2 * int(value)}}}{{2}}" if value == int(value) else f"{n}0",
                    rf"\${n}", rf"{n}\text{{ dollars}}"]
        cases.append(Case(n, rewrites, one_digit_changes(n, rng)))
    classes["GSM8K numbers"] = cases

    # MATH-500 answers as written (every one, minus the forms the classes below cover).
    cases = []
    for row in math500:
        gold = row["answer"]
        if re.search(r"\\begin|\\text|\\mbox|\\circ|=|\\gamma|\\\$", gold) or not re.search(r"\d", gold):
            continue
        cases.append(Case(gold, [restyle(gold)], one_digit_changes(gold, rng)))
    classes["MATH-500 answers"] = cases

    # Prose between $ signs, the gold as a bare string ("x=1/5$ or $x=5"): pairs of MATH-500 numbers.
    cases = []
    for a, b in zip(numbers[0::2], numbers[1::2]):
        if a == b:
            continue
        gold = f"x={a}$ or $x={b}"
        cases.append(Case(gold, [rf"x={restyle(b)} \text{{ or }} x={restyle(a)}", f"{restyle(a)}, {b}"],
                          [c for c in one_digit_changes(gold, rng) if "$" in c]))
        gold = f"{a}$ meters, ${b}$ seconds"
        cases.append(Case(gold, [rf"{restyle(a)}\text{{ meters}}, {b}\text{{ seconds}}"], one_digit_changes(gold, rng)))
    classes["prose between $ signs"] = cases

    # Multi-line matrices: MATH-500's pmatrix answers with a line break after each row.
    cases = []
    for row in math500:
        gold = row["answer"]
        if "\\begin{pmatrix}" in gold:
            multi = gold.replace("\\\\", "\\\\\n")
            cases.append(Case(multi, [restyle(gold).replace("pmatrix", "bmatrix")], one_digit_changes(multi, rng, 3)))
    classes["multi-line matrices"] = cases

    # Set-builder and interval notation: MATH-500's intervals, and each as a set-builder set.
    cases = []
    interval = re.compile(r"^(?:\\left)?([\(\[])\s*(-?[\w\\{}]+)\s*,\s*(-?[\w\\{}]+)\s*(?:\\right)?([\)\]])$")
    for row in math500:
        gold = row["answer"]
        if ("\\infty" in gold or "\\cup" in gold) and re.search(r"\d", gold):
            cases.append(Case(gold, [restyle(gold)], one_digit_changes(gold, rng)))
            m = interval.match(gold.replace(" ", ""))
            if m:
                lo_op = {"(": "<", "[": r"\le"}[m.group(1)]
                hi_op = {")": "<", "]": r"\le"}[m.group(4)]
                lo, hi = m.group(2), m.group(3)
                cond = (f"x > {lo}" if lo_op == "<" else rf"x \ge {lo}") if "infty" in hi else \
                       (f"x < {hi}" if hi_op == "<" else rf"x \le {hi}") if "infty" in lo else f"{lo} {lo_op} x {hi_op} {hi}"
                builder = rf"\{{x \mid {cond}\}}"
                cases.append(Case(builder, [gold, cond], one_digit_changes(builder, rng)))
    for a, b in zip(numbers[0::2], numbers[1::2]):
        if re.fullmatch(r"-?\d+", a) and re.fullmatch(r"-?\d+", b) and int(a) < int(b):
            builder = rf"\{{x\mid {a}\le x<{b}\}}"
            cases.append(Case(builder, [f"[{a}, {b})", rf"{a} \leq x < {b}"], one_digit_changes(builder, rng)))
    classes["set-builder and intervals"] = cases

    # Units: MATH-500's answers with units or degrees, GSM8K numbers with the unit their question asks for.
    cases = []
    for row in math500:
        gold = row["answer"]
        if re.search(r"\d", gold) and re.search(r"\\text|\\mbox|\\circ", gold):
            bare = re.sub(r"\s*(\\(?:text|mbox)\{[^}]*\}(\^\d)?|\^\\circ)", "", gold)
            rewrites = [bare, gold.replace("\\mbox", "\\text").replace("\\text{ ", "\\text{")]
            cases.append(Case(gold, [r for r in rewrites if r != gold] or [restyle(gold)], one_digit_changes(gold, rng, 3)))
    unit_words = ["dollars", "minutes", "miles", "cm", "pounds", "hours"]
    for i, row in enumerate(gsm8k[:120]):
        n = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        unit = unit_words[i % len(unit_words)]
        gold = rf"{n}\text{{ {unit}}}" + ("^2" if unit == "cm" else "")
        rewrites = [n, rf"{n} \mbox{{{unit}}}" + ("^2" if unit == "cm" else "")]
        cases.append(Case(gold, rewrites, one_digit_changes(gold, rng, 2)))
    classes["units"] = cases

    # Equations and chains: MATH-500's equations, GSM8K's calculator annotations (<<48/2=24>>).
    cases = []
    for row in math500:
        gold = row["answer"]
        if "=" in gold and re.search(r"\d", gold) and "\\begin" not in gold:
            lhs, _, rhs = gold.partition("=")
            cases.append(Case(gold, [f"{rhs.strip()} = {lhs.strip()}"], one_digit_changes(gold, rng, 3)))
    for row in gsm8k[:300]:
        for note in re.findall(r"<<([^<>]*=[^<>]*)>>", row["answer"])[:1]:
            lhs, _, rhs = note.partition("=")
            if not re.search(r"[a-zA-Z]", note) and lhs.strip() != rhs.strip():
                times = lhs.replace("*", r" \cdot ")
                cases.append(Case(note, [f"{rhs} = {times}"], one_digit_changes(note, rng, 2)))
    for a in numbers[:40]:
        if re.fullmatch(r"\d+", a) and int(a) > 1:
            gold = f"x^2+{a}=0"
            cases.append(Case(gold, [f"x^2=-{a}", f"-x^2-{a}=0"], one_digit_changes(gold, rng, 2)))
    classes["equations and chains"] = cases

    # Symbols read as functions: \gamma (Euler's constant, the gamma function) beside \alpha, \beta.
    cases = []
    for a, b, c in zip(numbers[0::3], numbers[1::3], numbers[2::3]):
        gold = rf"\alpha={a}, \beta={b}, \gamma={c}"
        cases.append(Case(gold, [rf"\gamma={restyle(c)}, \alpha={a}, \beta={b}"], one_digit_changes(gold, rng, 2)))
        gold = rf"{a}\gamma+{b}"
        cases.append(Case(gold, [rf"{b}+{restyle(a)}\gamma"], one_digit_changes(gold, rng, 2)))
    classes["symbols read as functions"] = cases
    return classes
