"""The one answer grader: ``extract_answer(text)`` and ``grade(prediction_text, gold_answer)``.

Every stage that decides "is this solution right?" (tree sampling, scoring, pair building,
evaluation) imports these two names, so a verdict means the same thing everywhere.

Extraction, in priority order: the last ``\\boxed{...}`` (nested braces allowed; ``\\fbox`` too),
then the last GSM8K ``#### N`` line, then the last "The answer is X" / "final answer: X".

Equivalence: plain numbers are compared exactly in this process; everything else goes through
math-verify (fractions, radicals, intervals, sets, matrices, percentages), given whole pieces of each
answer: prose between ``$`` signs and "or" lists split into parts, units taken off and compared,
set-builder sets as their conditions, every side of an equation compared (see "the comparison" below).

Time limit, and why it is ours: math-verify 0.9.0 bounds its own work with ``signal.alarm``, which
raises in any thread but the main one (the sampler and the engines grade from threads). We turn
its timeout off and run parse + verify in long-lived worker *subprocesses* (JSON lines over
pipes); a call waits on its worker's stdout with a deadline and, if the deadline passes, kills
that worker (a runaway sympy simplification cannot be interrupted any other way) and judges "not
equal". This works from any thread and any process, daemonic pool workers included, costs one
pipe round trip per uncached call, and each worker is started once and reused (one per thread
grading at the same moment). ``timeout_seconds=None`` runs math-verify in the calling process
with no limit. Verdicts are cached, so repeated (answer, gold) pairs cost nothing.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
from decimal import Decimal, InvalidOperation
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 5.0
"""Per-call limit on math-verify's parse + verify of one (prediction, gold) pair."""

WORKER_START_TIMEOUT_SECONDS = 120.0
"""Time a fresh worker may take to import math-verify and sympy (not counted in the call's limit)."""

__all__ = ["extract_answer", "grade", "answers_equal", "DEFAULT_TIMEOUT_SECONDS"]


# --- extraction ---------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*(\{|\s+(?=[^\s{]))")
_GSM8K_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"(?:final\s+answer|the\s+answer)\s*(?:is|:)\s*:?\s*([^\n]*)", re.IGNORECASE)


def _braced_content(text: str, open_brace: int) -> str | None:
    """The text inside the brace group starting at ``open_brace``; None if it never closes."""
    depth = 0
    for i in range(open_brace, len(text)):
        ch = text[i]
        if ch == "\\":  # an escaped brace \{ or \} does not open or close a group
            continue
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : i]
    return None


def _last_boxed(text: str) -> str | None:
    for match in reversed(list(_BOXED_RE.finditer(text))):
        if match.group(1) == "{":
            content = _braced_content(text, match.end() - 1)
        else:  # "\boxed 5": the answer is the next token
            content = re.match(r"[^\s$]+", text[match.end() :])
            content = content.group(0) if content else None
        if content is not None and content.strip():
            return content.strip()
    return None


_NUMBER_WITH_UNIT_RE = re.compile(r"^(\\?\$?\s*[-+]?[\d,]*\.?\d+\s*%?)\s+([A-Za-z][A-Za-z .]*)$")
_NOT_A_UNIT = {"and", "or", "to", "and/or", "plus", "minus", "times"}


def _clean_inline(answer: str) -> str:
    """Tidy a free-text answer ("$12$.", "12 apples.") into what a grader can compare."""
    answer = answer.strip()
    answer = re.sub(r"[.;,!]+$", "", answer).strip()
    if len(answer) >= 2 and answer.startswith("$") and answer.endswith("$") and not answer.endswith("\\$"):
        answer = answer.strip("$").strip()
    # "18 dollars": math-verify would read the word as a product of symbols; keep the number.
    unit = _NUMBER_WITH_UNIT_RE.match(answer)
    if unit and not (_NOT_A_UNIT & set(unit.group(2).lower().split())):
        answer = unit.group(1).strip()
    return answer


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text``, or None when it states none.

    Last ``\\boxed{...}`` (nested braces kept), else last ``#### N``, else last "The answer is X".
    """
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return _clean_inline(boxed)
    for pattern in (_GSM8K_RE, _ANSWER_IS_RE):
        matches = pattern.findall(text)
        for found in reversed(matches):
            inner = _last_boxed(found)
            answer = inner if inner is not None else _clean_inline(found)
            if answer:
                return answer
    return None


# --- fast path: plain numbers only ---------------------------------------------------------------

_NUMBER_RE = re.compile(r"^[-+]?(?:\d+|\d{1,3}(?:,\d{3})+)?(?:\.\d+)?$")


def _normalise(answer: str) -> str:
    """Cosmetic normalisation only: differences that can never change the value."""
    s = answer.strip()
    s = _clean_inline(s)
    s = re.sub(r"\\[,;:! ]", "", s)  # LaTeX spacing
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s)
    if s.startswith("\\$"):
        s = s[2:]
    return s


def _as_number(s: str) -> Decimal | None:
    if not s or not _NUMBER_RE.match(s) or not any(c.isdigit() for c in s):
        return None
    try:
        return Decimal(s.replace(",", ""))
    except InvalidOperation:
        return None


def _fast_verdict(pred: str, gold: str) -> bool | None:
    """True/False when both answers are plain numbers (compared exactly), else None: the maths decides.

    Two equal strings are not a shortcut: an answer identical to its gold still goes through the
    comparison below, so a measured acceptance rate says something about the maths.
    """
    pn, gn = _as_number(_normalise(pred)), _as_number(_normalise(gold))
    if pn is not None and gn is not None:
        return pn == gn
    return None


# --- the comparison (in the worker: sympy may run away) ---------------------------------------
#
# math-verify compares what it extracts from the gold, and a gold it reads only in part is compared
# only in part: a change elsewhere in the answer goes unseen. These steps give it whole pieces.
# - Prose between $ signs ("x=1/5$ or $x=5", "45/98$ meters, $30/49$ seconds") and "or"/"and"
#   lists: split into parts, each with its unit; parts are matched one to one.
# - Newlines (multi-line matrices): math-verify's $...$ stops at a newline; they become spaces.
# - Set-builder sets {x | cond}: compared as their condition, which math-verify reads as an interval.
# - Units: taken off both sides; when both sides state one, they must agree.
# - Equations and chains: math-verify compares one side; here every side is compared (in order or
#   reversed), or the two equations must be multiples of each other (x^2+121=0 vs x^2=-121). A gold
#   "x = 5" (a lone symbol on the left) still accepts "5", as math-verify does.
# - \gamma, \Gamma (read as Euler's constant or the gamma function) and \Pi (read as pi) become
#   plain symbols.

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_CONNECTOR_RE = re.compile(
    r"\\(?:text|textnormal|mbox|mathrm)\{\s*(?:or|and|,|;)\s*\}|\\q?quad\b|(?<![A-Za-z\\])(?:or|and)(?![A-Za-z])|;"
)
_UNIT_GROUP = r"\\(?:text|textnormal|mbox|mathrm)\s*\{[^{}]*\}(?:\s*\^\s*\{?\d\}?)?"
_TRAILING_UNIT_RE = re.compile(rf"^(?P<math>.*?)\s*(?P<unit>(?:{_UNIT_GROUP}\s*)+)$")
_TRAILING_WORD_UNIT_RE = re.compile(r"^(?P<math>.*[\d}])\s+(?P<unit>[A-Za-z]{2,}(?:\s*\^\s*\{?\d\}?)?(?:\s+[A-Za-z]{2,})*)$")
_DEGREES_RE = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree)\s*$")
_SET_BUILDER_RE = re.compile(
    r"^(?:\\left)?\\\{\s*[A-Za-z](?:\s*\\in\s*\\mathbb\{R\})?\s*(?:\\mid|\\vert|(?:\\middle)?\||:)\s*(?P<cond>.+?)\s*(?:\\right)?\\\}$"
)
_FUNCTION_LIKE_SYMBOLS = {"gamma": "g_{gamma}", "Gamma": "G_{Gamma}", "Pi": "P_{Pi}"}
_FUNCTION_LIKE_RE = re.compile(r"\\(" + "|".join(_FUNCTION_LIKE_SYMBOLS) + r")(?![A-Za-z])")
_LONE_SYMBOL_RE = re.compile(r"^(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[\w\\]+\}?)?(?:\([A-Za-z]\))?$")
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_OPEN, _CLOSE = "([{", ")]}"


def _top_level_matches(text: str, pattern: re.Pattern) -> list[re.Match]:
    """Matches of ``pattern`` outside any bracket or brace group (intervals may mix ( and ])."""
    depth_at = [0]  # depth before each character, and at the end
    for ch in text:
        depth = depth_at[-1]
        depth_at.append(depth + 1 if ch in _OPEN else max(depth - 1, 0) if ch in _CLOSE else depth)
    return [m for m in pattern.finditer(text) if depth_at[m.start()] == 0 and depth_at[m.end()] == 0]


def _split_top(text: str, pattern: re.Pattern) -> list[str]:
    pieces, at = [], 0
    for m in _top_level_matches(text, pattern):
        pieces.append(text[at:m.start()])
        at = m.end()
    pieces.append(text[at:])
    return [p.strip() for p in pieces]


def _unit_key(unit: str) -> str:
    u = re.sub(r"\\(?:text|textnormal|mbox|mathrm)\s*", "", unit)
    u = re.sub(r"[{}\\\s]", "", u).lower()
    u = re.sub(r"^(?:degrees?|circ|degree)$", "deg", u)
    return u[:-1] if len(u) > 2 and u.endswith("s") and not u.endswith("ss") else u


def _split_unit(part: str) -> tuple[str, str]:
    """(math, unit key): a trailing \\text{...} / word unit / degree sign comes off when maths is left."""
    part = part.strip()
    degrees = _DEGREES_RE.search(part)
    if degrees and part[: degrees.start()].strip():
        return part[: degrees.start()].strip(), "deg"
    for pattern in (_TRAILING_UNIT_RE, _TRAILING_WORD_UNIT_RE):
        m = pattern.match(part)
        if m and re.search(r"[\d\\]", m.group("math")):
            unit = m.group("unit")
            if not _CONNECTOR_RE.fullmatch(unit.strip()):
                return m.group("math").strip(), _unit_key(unit)
    return part, ""


def _parts(answer: str) -> list[tuple[str, str]]:
    """An answer as its (math, unit) parts: several for prose between $ signs and "or"/"and" lists."""
    s = answer.replace("\n", " ").strip()
    out: list[tuple[str, str]] = []
    if _UNESCAPED_DOLLAR.search(s):
        pieces = _UNESCAPED_DOLLAR.split(s)
        first_math = 1 if not pieces[0].strip() else 0  # "$a$ or $b$" vs a bare gold "a$ or $b"
        for i in range(first_math, len(pieces), 2):
            math = pieces[i].strip()
            if not math:
                continue
            trailing = pieces[i + 1] if i + 1 < len(pieces) else ""
            words = re.sub(r"(?<![A-Za-z])(?:or|and)(?![A-Za-z])|[,;.]", " ", trailing).strip()
            sub = _parts(math)
            if words and not sub[-1][1]:
                sub[-1] = (sub[-1][0], _unit_key(words))
            out += sub
        return out or [(s, "")]
    for piece in _split_top(s, _CONNECTOR_RE):
        if piece:
            part = _split_unit(piece)
            # "a=2, b=3": a list of equations, not one chain a = (2, b) = 3
            out += _comma_parts(part) if _top_level_matches(part[0], _EQUALS_RE) else [part]
    return out or [(s, "")]


def _comma_parts(part: tuple[str, str]) -> list[tuple[str, str]]:
    math, unit = part
    if _THOUSANDS_RE.match(re.sub(r"\\[,!]", "", math)):
        return [part]
    pieces = [p for p in _split_top(math, re.compile(",")) if p]
    return [_split_unit(p) for p in pieces] if len(pieces) > 1 else [part]


def _prepare_math(text: str) -> str:
    text = _FUNCTION_LIKE_RE.sub(lambda m: _FUNCTION_LIKE_SYMBOLS[m.group(1)], text.replace("\n", " ")).strip()
    builder = _SET_BUILDER_RE.match(text)
    return builder.group("cond") if builder else text


def _parse(text: str):
    from math_verify import parse

    return parse(f"${text}$", parsing_timeout=None)


def _mv_equal(pred: str, gold: str) -> bool:
    """math-verify on two pieces of LaTeX; identical text math-verify cannot read is equal."""
    from math_verify import verify

    gold_parsed, pred_parsed = _parse(gold), _parse(pred)
    if not gold_parsed or not pred_parsed:
        return not gold_parsed and not pred_parsed and _normalise(pred) == _normalise(gold)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _proportional(pred_sides: list[str], gold_sides: list[str]) -> bool:
    """Whether lhs - rhs of one equation is a non-zero constant multiple of the other's."""
    import sympy

    try:
        exprs = [_parse(side) for side in (*gold_sides, *pred_sides)]
        gl, gr, pl, pr = (e[0] if e else None for e in exprs)
        if not all(isinstance(e, sympy.Expr) for e in (gl, gr, pl, pr)):
            return False
        gold_diff, pred_diff = sympy.simplify(gl - gr), sympy.simplify(pl - pr)
        # Without unknowns (48/2 = 24) an equation is a statement about numbers: only side by side says anything.
        if not gold_diff.free_symbols or gold_diff.free_symbols != pred_diff.free_symbols:
            return False
        ratio = sympy.simplify(pred_diff / gold_diff)
        return bool(ratio.is_number and ratio.is_finite and ratio != 0)
    except Exception:
        return False


_EQUALS_RE = re.compile(r"(?<![<>!:\\])=|:=")


_BASE_NUMBER_RE = re.compile(r"^([0-9A-Za-z]+)_\{?(\d+)\}?$")


def _math_equal(pred: str, gold: str) -> bool:
    pred, gold = _prepare_math(pred), _prepare_math(gold)
    # 2516_8: math-verify drops the subscript, so the base would go unseen.
    pred_base, gold_base = _BASE_NUMBER_RE.match(pred.replace(" ", "")), _BASE_NUMBER_RE.match(gold.replace(" ", ""))
    if pred_base and gold_base:
        return pred_base.group(1).lower() == gold_base.group(1).lower() and pred_base.group(2) == gold_base.group(2)
    gs, ps = _split_top(gold, _EQUALS_RE), _split_top(pred, _EQUALS_RE)
    if len(gs) == 1 and len(ps) == 1:
        return _mv_equal(pred, gold)
    if len(gs) == 2 and len(ps) == 1:
        return bool(_LONE_SYMBOL_RE.match(gs[0].replace(" ", ""))) and _mv_equal(ps[0], gs[1])
    if len(ps) == 2 and len(gs) == 1:
        return bool(_LONE_SYMBOL_RE.match(ps[0].replace(" ", ""))) and _mv_equal(ps[1], gs[0])
    if len(gs) != len(ps) or "" in gs or "" in ps:
        return False
    if all(_mv_equal(p, g) for p, g in zip(ps, gs)) or all(_mv_equal(p, g) for p, g in zip(reversed(ps), gs)):
        return True
    return len(gs) == 2 and _proportional(ps, gs)


def _part_equal(pred: tuple[str, str], gold: tuple[str, str]) -> bool:
    if pred[1] and gold[1] and pred[1] != gold[1]:
        return False
    return _math_equal(pred[0], gold[0])


def _parts_match(pred: list[tuple[str, str]], gold: list[tuple[str, str]]) -> bool:
    """Each gold part equal to its own pred part, in any order (a small bipartite search)."""
    if len(pred) != len(gold):
        return False
    equal = [[_part_equal(p, g) for p in pred] for g in gold]

    def assign(i: int, used: set[int]) -> bool:
        return i == len(gold) or any(equal[i][j] and assign(i + 1, used | {j}) for j in range(len(pred)) if j not in used)

    return assign(0, set())


def _equal(pred: str, gold: str) -> bool:
    """The full comparison of two extracted answers (pure; run in the worker)."""
    gold_parts, pred_parts = _parts(gold), _parts(pred)
    if len(gold_parts) > 1 and len(pred_parts) == 1:
        pred_parts = _comma_parts(pred_parts[0])
    elif len(pred_parts) > 1 and len(gold_parts) == 1:
        gold_parts = _comma_parts(gold_parts[0])
    if len(gold_parts) == 1 and len(pred_parts) == 1:
        return _part_equal(pred_parts[0], gold_parts[0])
    return _parts_match(pred_parts, gold_parts)


def _quiet_math_verify() -> None:
    # It warns once per process that its timeout is off; that is deliberate here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _worker_main() -> None:
    """Worker loop (``python -m sppd_megatron.scoring.grading``): JSON [pred, gold] in, verdict out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _quiet_math_verify()
    import math_verify  # noqa: F401  (import cost paid before reporting ready)

    out = sys.stdout
    sys.stdout = sys.stderr  # a library print must not corrupt the reply stream
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        pred, gold = json.loads(line)
        try:
            reply: bool | str = _equal(pred, gold)
        except Exception as exc:  # a parse/verify crash means "not shown equal"
            reply = f"error: {type(exc).__name__}: {exc}"
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _Worker:
    """One grading subprocess. A plain subprocess (not multiprocessing) because it neither
    re-imports the caller's ``__main__`` nor is refused inside daemonic pool workers."""

    def __init__(self) -> None:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sppd_megatron.scoring.grading"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )
        if self._read_line(WORKER_START_TIMEOUT_SECONDS) != '"ready"':
            self.kill()
            raise RuntimeError("the math-verify grading worker did not start (see its stderr above)")

    def _read_line(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.process.stdout.readline()
        if not line:
            raise EOFError("grading worker exited")
        return line.strip()

    def call(self, pred: str, gold: str, timeout: float) -> bool | None:
        """The verdict, or None if the deadline passed (the worker is then killed)."""
        self.process.stdin.write(json.dumps([pred, gold]) + "\n")
        self.process.stdin.flush()
        line = self._read_line(timeout)
        if line is None:
            self.kill()
            return None
        reply = json.loads(line)
        if isinstance(reply, str):
            logger.debug("math-verify failed on %r vs %r: %s", pred, gold, reply)
            return False
        return bool(reply)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            stream.close()


class _WorkerPool:
    """Idle workers to borrow: one per concurrently grading thread, created on demand."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._pid = os.getpid()

    def run(self, pred: str, gold: str, timeout: float) -> bool | None:
        with self._lock:
            if os.getpid() != self._pid:  # a forked child must not share its parent's pipes
                self._idle, self._pid = [], os.getpid()
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker()
        try:
            verdict = worker.call(pred, gold, timeout)
        except (EOFError, OSError, ValueError):
            worker.kill()
            raise
        if verdict is not None:
            with self._lock:
                self._idle.append(worker)
        return verdict

    def close(self) -> None:
        with self._lock:
            if os.getpid() == self._pid:
                for worker in self._idle:
                    worker.kill()
            self._idle = []


_POOL = _WorkerPool()
atexit.register(_POOL.close)


@functools.lru_cache(maxsize=1 << 16)
def _equal_cached(pred: str, gold: str, timeout: float | None) -> bool:
    fast = _fast_verdict(pred, gold)
    if fast is not None:
        return fast
    if timeout is None:
        _quiet_math_verify()
        verdict = _equal(pred, gold)
    else:
        verdict = _POOL.run(pred, gold, timeout)
    if verdict is None:
        logger.warning("grading timed out after %.1fs: %r vs gold %r (judged unequal)", timeout, pred, gold)
        return False
    return verdict


def answers_equal(pred_answer: str, gold_answer: str, timeout_seconds: float | None = DEFAULT_TIMEOUT_SECONDS) -> bool:
    """Whether two already-extracted answers are mathematically the same.

    ``timeout_seconds`` bounds math-verify per call (None: no limit, run in this process).
    """
    return _equal_cached(pred_answer.strip(), gold_answer.strip(), timeout_seconds)


def gold_to_answer(gold_answer: str) -> str:
    """A gold as stored in a dataset -> the bare answer (GSM8K solutions and boxed golds accepted)."""
    gold = gold_answer.strip()
    if "####" in gold or "\\boxed" in gold or "\\fbox" in gold:
        gold = extract_answer(gold) or gold
    return gold


def grade(prediction_text: str, gold_answer: str, timeout_seconds: float | None = DEFAULT_TIMEOUT_SECONDS) -> bool:
    """True when the answer stated in ``prediction_text`` equals ``gold_answer``.

    A prediction that states no answer (no boxed, ``####`` or "The answer is") is wrong. The gold
    may be bare LaTeX (MATH-500), LaTeX in ``$...$`` (GaoKao), a number with commas or a whole
    GSM8K solution ending in ``#### N``.
    """
    pred = extract_answer(prediction_text)
    if pred is None:
        return False
    return answers_equal(pred, gold_to_answer(gold_answer), timeout_seconds)


if __name__ == "__main__":
    _worker_main()
