"""The one answer grader: ``extract_answer(text)`` and ``grade(prediction_text, gold_answer)``.

Every stage that decides "is this solution right?" (tree sampling, scoring, pair building,
evaluation) imports these two names, so a verdict means the same thing everywhere.

Extraction, in priority order: the last ``\\boxed{...}`` (nested braces allowed; ``\\fbox`` too),
then the last GSM8K ``#### N`` line, then the last "The answer is X" / "final answer: X".

Equivalence: a fast path first (same normalised string, or both plain numbers compared exactly),
then math-verify (numbers, fractions, radicals, intervals, sets, percentages, units in ``\\text``).

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


# --- fast path ----------------------------------------------------------------------------------

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
    """True/False when cheap string or exact number comparison settles it, else None."""
    p, g = _normalise(pred), _normalise(gold)
    if p == g:
        return True
    pn, gn = _as_number(p), _as_number(g)
    if pn is not None and gn is not None:
        return pn == gn
    return None


# --- math-verify, in a worker process with a deadline ------------------------------------------

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def _as_math(answer: str) -> str:
    """math-verify only finds bare LaTeX inside math delimiters: wrap unless already delimited."""
    return answer if _UNESCAPED_DOLLAR.search(answer) else f"${answer}$"


def _math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify's judgement with its own signal-based timeout disabled (we bound it outside)."""
    from math_verify import parse, verify

    gold_parsed = parse(_as_math(gold), parsing_timeout=None)
    pred_parsed = parse(_as_math(pred), parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


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
            reply: bool | str = _math_verify_equal(pred, gold)
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
        verdict = _math_verify_equal(pred, gold)
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
