"""The records the stages of the data's journey pass to each other: one definition each.

    prompts.jsonl --sample--> trees --score--> trees with values --pairs--> sft / dpo / step / svpo
    pairs --train--> checkpoints;  eval: model + benchmark --> predictions --> summary

Every record carries ``schema_version``; every reader validates each line and raises
:class:`RecordError` naming the file and line. Writers validate too, so a stage can never write a
record the next stage would reject.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, TypeVar, get_args, get_origin, get_type_hints

SCHEMA_VERSION = 1

R = TypeVar("R", bound="Record")


class RecordError(ValueError):
    """A bad record; ``str()`` is ``file:line: reason`` so users can open the exact line."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None, line: int | None = None):
        self.reason = reason
        self.path = str(path) if path is not None else None
        self.line = line
        where = f"{self.path}:{line}: " if self.path and line else (f"{self.path}: " if self.path else "")
        super().__init__(f"{where}{reason}")


def _check_finite(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise RecordError(f"field '{name}' must be a number, got {value!r}")
    if value is not None and not math.isfinite(value):
        raise RecordError(f"field '{name}' is {value} (NaN/inf values are not allowed)")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(tp: Any, value: Any) -> bool:
    """Whether a JSON value has the field type ``tp`` (records hold plain JSON types, lists and dicts)."""
    if tp is Any:
        return True
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(arg, value) for arg in get_args(tp))
    if tp is type(None):
        return value is None
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (dict, tp))
    if origin is list:
        (item,) = get_args(tp) or (Any,)
        return isinstance(value, list) and all(_matches(item, v) for v in value)
    if origin is dict:
        _, item = get_args(tp) or (str, Any)
        return isinstance(value, dict) and all(isinstance(k, str) and _matches(item, v) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


@lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_unit(name: str, value: float | None) -> None:
    _check_finite(name, value)
    if value is not None and not (0.0 <= value <= 1.0):
        raise RecordError(f"field '{name}'={value} is outside [0, 1]")


@dataclass
class Record:
    """Base of all records: from/to plain dicts with required-field and type checks."""

    kind: ClassVar[str] = "record"

    def validate(self) -> None:  # overridden where there is more to check
        pass

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["schema_version"] = SCHEMA_VERSION
        return d

    @classmethod
    def from_dict(cls: type[R], data: Any) -> R:
        if not isinstance(data, dict):
            raise RecordError(f"expected a JSON object for a {cls.kind} record, got {type(data).__name__}")
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise RecordError(
                f"{cls.kind} record has schema_version {version}; this version reads {SCHEMA_VERSION}"
            )
        names = {f.name: f for f in dataclasses.fields(cls)}
        missing = [
            n
            for n, f in names.items()
            if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise RecordError(f"{cls.kind} record is missing required field(s) {missing}")
        # An unknown field is a typo or another tool's record: refused, never silently dropped.
        unknown = sorted(str(k)[:40] for k in data if k not in names and k != "schema_version")
        if unknown:
            raise RecordError(f"{cls.kind} record has unknown field(s) {unknown[:5]}")
        for name, tp in _field_types(cls).items():
            if name in data and not _matches(tp, data[name]):
                raise RecordError(f"field '{name}' of a {cls.kind} record must be {_type_name(tp)}, "
                                  f"got {type(data[name]).__name__}")
        kwargs = {n: data[n] for n in names if n in data}
        obj = cls._from_fields(kwargs)
        obj.validate()
        return obj

    @classmethod
    def _from_fields(cls: type[R], kwargs: dict) -> R:
        return cls(**kwargs)


def _require_str(name: str, value: Any, allow_empty: bool = True) -> None:
    if not isinstance(value, str):
        raise RecordError(f"field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"field '{name}' is empty")


@dataclass
class Prompt(Record):
    """A question to sample or evaluate: ``id``, ``question``, ``gold_answer``, ``source``."""

    kind: ClassVar[str] = "prompt"
    id: str
    question: str
    gold_answer: str
    source: str = ""

    def validate(self) -> None:
        _require_str("id", self.id, allow_empty=False)
        _require_str("question", self.question, allow_empty=False)
        _require_str("gold_answer", self.gold_answer)
        _require_str("source", self.source)


@dataclass
class PromptTemplate(Record):
    """How a question became the model's prompt; stored with every tree so it can be replayed.

    ``rendered`` of a question is exactly the text the policy was conditioned on. With
    ``use_chat_template`` the tokenizer's chat template (recorded verbatim in ``chat_template``)
    renders ``[system, user]`` with a generation prompt; otherwise ``plain_format`` is used.
    """

    kind: ClassVar[str] = "template"
    system_prompt: str = "Please reason step by step and put your answer in \\boxed{}."
    use_chat_template: bool = True
    chat_template: str | None = None
    plain_format: str = "{system}\n\nQuestion: {question}\nAnswer:\n"


@dataclass
class TreeNode(Record):
    """One reasoning step. The root (``node_id`` 0, ``parent`` None, depth 0) holds the prompt.

    ``text`` is the step exactly as generated, including its trailing delimiter, so the state
    text s_t is ``prompt + ''.join(texts on the path)``; ``token_ids`` are the step's generated
    tokens (the root's are the prompt's). ``token_logprobs`` are the sampling engine's;
    ``trainer_logprobs`` the trainer's recomputation where one exists. ``values`` maps a scorer
    name to V(s_t) in [0, 1].

    MCTS trees (``sppd-megatron sample`` with ``algorithm: mcts``) also carry ``visits`` (how many
    evaluations were backed up through the node) and ``q`` (their mean, in [-1, 1]: +1 a correct
    terminal, -1 a wrong one); both are None in trees sampled otherwise.
    """

    kind: ClassVar[str] = "node"
    node_id: int
    parent: int | None
    depth: int
    text: str
    token_ids: list[int]
    token_logprobs: list[float] = field(default_factory=list)
    mean_logprob: float = 0.0
    terminal: bool = False
    finish_reason: str | None = None  # eos | answer | max_depth | max_tokens
    answer: str | None = None
    correct: bool | None = None
    values: dict[str, float] = field(default_factory=dict)
    trainer_logprobs: list[float] | None = None
    visits: int | None = None
    q: float | None = None

    def validate(self) -> None:
        if not isinstance(self.node_id, int) or self.node_id < 0:
            raise RecordError(f"node_id must be a non-negative integer, got {self.node_id!r}")
        _require_str("text", self.text)
        if not isinstance(self.token_ids, list) or not all(isinstance(t, int) for t in self.token_ids):
            raise RecordError(f"node {self.node_id}: token_ids must be a list of integers")
        if self.token_logprobs and len(self.token_logprobs) != len(self.token_ids):
            raise RecordError(
                f"node {self.node_id}: {len(self.token_logprobs)} token_logprobs for {len(self.token_ids)} tokens"
            )
        for i, lp in enumerate(self.token_logprobs):
            _check_finite(f"token_logprobs[{i}]", lp)
        _check_finite("mean_logprob", self.mean_logprob)
        for name, v in self.values.items():
            _check_unit(f"values.{name}", v)
        if self.visits is not None and (not isinstance(self.visits, int) or isinstance(self.visits, bool)
                                        or self.visits < 0):
            raise RecordError(f"node {self.node_id}: visits must be a non-negative integer, got {self.visits!r}")
        _check_finite("q", self.q)
        if self.q is not None and not -1.0 <= self.q <= 1.0:
            raise RecordError(f"node {self.node_id}: q={self.q} is outside [-1, 1]")


@dataclass
class Tree(Record):
    """The prefix tree of one question (SPPD section 4.2): one JSONL line per tree."""

    kind: ClassVar[str] = "tree"
    id: str
    question: str
    gold_answer: str
    source: str
    template: PromptTemplate
    prompt: str
    policy: str
    sampling: dict[str, Any]
    nodes: list[TreeNode]

    @classmethod
    def _from_fields(cls, kwargs: dict) -> "Tree":
        tmpl = kwargs["template"]
        kwargs["template"] = tmpl if isinstance(tmpl, PromptTemplate) else PromptTemplate.from_dict(tmpl)
        nodes = kwargs["nodes"]
        if not isinstance(nodes, list):
            raise RecordError("field 'nodes' must be a list")
        kwargs["nodes"] = [n if isinstance(n, TreeNode) else TreeNode.from_dict(n) for n in nodes]
        return cls(**kwargs)

    def validate(self) -> None:
        _require_str("id", self.id, allow_empty=False)
        if not self.nodes:
            raise RecordError(f"tree {self.id}: no nodes")
        for i, n in enumerate(self.nodes):
            if n.node_id != i:
                raise RecordError(f"tree {self.id}: node at index {i} has node_id {n.node_id}")
            if i == 0:
                if n.parent is not None or n.depth != 0:
                    raise RecordError(f"tree {self.id}: node 0 must be the root (parent null, depth 0)")
                continue
            if n.parent is None or not (0 <= n.parent < i):
                raise RecordError(f"tree {self.id}: node {i} has parent {n.parent!r} (must be an earlier node)")
            if self.nodes[n.parent].terminal:
                raise RecordError(f"tree {self.id}: node {i} is a child of terminal node {n.parent}")
            if n.depth != self.nodes[n.parent].depth + 1:
                raise RecordError(f"tree {self.id}: node {i} depth {n.depth} != parent depth + 1")

    # --- navigation -------------------------------------------------------------------------
    def children(self, node_id: int) -> list[TreeNode]:
        return [n for n in self.nodes if n.parent == node_id]

    def path(self, node_id: int) -> list[TreeNode]:
        """Nodes from the first step (depth 1) down to ``node_id``; the root is not included."""
        out = []
        node = self.nodes[node_id]
        while node.parent is not None:
            out.append(node)
            node = self.nodes[node.parent]
        return out[::-1]

    def state_text(self, node_id: int) -> str:
        """s_t without the prompt: the steps a_1..a_t joined exactly as generated."""
        return "".join(n.text for n in self.path(node_id))

    def leaves(self) -> list[TreeNode]:
        parents = {n.parent for n in self.nodes}
        return [n for n in self.nodes if n.node_id not in parents and n.node_id != 0]

    def trajectories(self) -> list[list[TreeNode]]:
        """Every complete (root-to-terminal) trajectory, as lists of step nodes."""
        return [self.path(n.node_id) for n in self.leaves() if n.terminal]


@dataclass
class PreferencePair(Record):
    """A preference between two continuations of a shared context (one definition for all levels).

    The model sees ``prompt + prefix + chosen`` and ``prompt + rejected_prefix + rejected``;
    ``prompt`` and the prefix are context only and never in the loss. ``level`` is ``step``
    (SPPD D_step: siblings under the same parent, ``prefix`` = the common steps) or ``sentence``
    (DPO-PRM: whole solutions, empty prefix). SVPO's cousin/terminal pairs set ``rejected_prefix``
    when the rejected step continues a different state. ``*_ends`` says whether a continuation
    ends the solution (only those get EOS). ``chosen_value``/``rejected_value`` are V(s_{t+1}).
    """

    kind: ClassVar[str] = "pair"
    prompt: str
    chosen: str
    rejected: str
    prefix: str = ""
    rejected_prefix: str | None = None
    chosen_value: float | None = None
    rejected_value: float | None = None
    chosen_ends: bool = True
    rejected_ends: bool = True
    level: str = "step"
    pair_type: str = "sibling"
    question_id: str = ""
    depth: int = 0
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None

    def validate(self) -> None:
        _require_str("prompt", self.prompt, allow_empty=False)
        _require_str("chosen", self.chosen, allow_empty=False)
        _require_str("rejected", self.rejected, allow_empty=False)
        _require_str("prefix", self.prefix)
        if self.rejected_prefix is not None:
            _require_str("rejected_prefix", self.rejected_prefix)
        if self.level not in ("step", "sentence"):
            raise RecordError(f"field 'level' must be 'step' or 'sentence', got {self.level!r}")
        if self.pair_type not in ("sibling", "cousin", "terminal", "trajectory"):
            raise RecordError(f"field 'pair_type' {self.pair_type!r} is not sibling/cousin/terminal/trajectory")
        _check_unit("chosen_value", self.chosen_value)
        _check_unit("rejected_value", self.rejected_value)
        _check_finite("ref_chosen_logp", self.ref_chosen_logp)
        _check_finite("ref_rejected_logp", self.ref_rejected_logp)

    @property
    def rejected_context(self) -> str:
        return self.prefix if self.rejected_prefix is None else self.rejected_prefix


@dataclass
class SFTExample(Record):
    """Supervised example (SFT-PRM): loss on ``response`` only; ``prompt`` is context."""

    kind: ClassVar[str] = "sft"
    prompt: str
    response: str
    question_id: str = ""
    value: float | None = None
    ends: bool = True

    def validate(self) -> None:
        _require_str("prompt", self.prompt)
        _require_str("response", self.response, allow_empty=False)
        _check_unit("value", self.value)


@dataclass
class BeamSearchResult(Record):
    """The finished solutions of one step-level beam search, best value first (``sbs@B`` modes).

    ``values`` are the reward model's values of each solution's last state; ``answers``, ``correct``
    and ``answer_classes`` run parallel to ``generations`` as in :class:`Prediction`.
    """

    kind: ClassVar[str] = "beam_search"
    generations: list[str]
    values: list[float]
    answers: list[str | None]
    correct: list[bool]
    answer_classes: list[int | None]

    def validate(self) -> None:
        n = len(self.generations) if isinstance(self.generations, list) else -1
        for name in ("values", "answers", "correct", "answer_classes"):
            value = getattr(self, name)
            if not isinstance(value, list) or len(value) != n:
                raise RecordError(f"beam search: '{name}' must be a list parallel to generations ({n})")
        for i, v in enumerate(self.values):
            _check_unit(f"values[{i}]", v)
        if any(self.values[i] < self.values[i + 1] for i in range(n - 1)):
            raise RecordError("beam search: solutions must be in order of value, best first")
        for i, cls in enumerate(self.answer_classes):
            if cls is not None and not (isinstance(cls, int) and 0 <= cls <= i):
                raise RecordError(f"beam search: answer_classes[{i}]={cls!r} is not an earlier solution's index")


@dataclass
class Prediction(Record):
    """One evaluated question: generations, extracted answers, verdicts and ORM scores.

    ``generations`` are the sampled solutions; ``answers``, ``correct``, ``scores`` (ORM) and
    ``answer_classes`` (index of the first sample with an equivalent answer, None when no answer)
    run parallel to them. The greedy solution, when evaluated, is kept apart in ``greedy_*``, and
    each step-level beam search in ``sbs`` under its width (``"3"`` for ``sbs@3``).
    """

    kind: ClassVar[str] = "prediction"
    id: str
    benchmark: str
    prompt: str
    gold_answer: str
    generations: list[str]
    answers: list[str | None]
    correct: list[bool]
    scores: list[float] | None = None
    question: str = ""
    answer_classes: list[int | None] | None = None
    greedy_generation: str | None = None
    greedy_answer: str | None = None
    greedy_correct: bool | None = None
    sbs: dict[str, BeamSearchResult] | None = None

    @classmethod
    def _from_fields(cls, kwargs: dict) -> "Prediction":
        searches = kwargs.get("sbs")
        if isinstance(searches, dict):
            kwargs["sbs"] = {str(w): r if isinstance(r, BeamSearchResult) else BeamSearchResult.from_dict(r)
                             for w, r in searches.items()}
        return cls(**kwargs)

    def validate(self) -> None:
        _require_str("id", self.id, allow_empty=False)
        _require_str("benchmark", self.benchmark, allow_empty=False)
        if self.sbs is not None:
            if not isinstance(self.sbs, dict):
                raise RecordError(f"prediction {self.id}: 'sbs' must map a beam width to a search")
            for width, result in self.sbs.items():
                if not (isinstance(width, str) and width.isdigit() and isinstance(result, BeamSearchResult)):
                    raise RecordError(f"prediction {self.id}: sbs[{width!r}] is not a beam width with its search")
                result.validate()
        n = len(self.generations) if isinstance(self.generations, list) else -1
        for name in ("answers", "correct", "scores", "answer_classes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, list) or len(value) != n):
                raise RecordError(f"prediction {self.id}: '{name}' must be a list parallel to generations ({n})")
        for i, score in enumerate(self.scores or []):
            _check_finite(f"scores[{i}]", score)
        for i, cls in enumerate(self.answer_classes or []):
            if cls is not None and not (isinstance(cls, int) and 0 <= cls <= i):
                raise RecordError(f"prediction {self.id}: answer_classes[{i}]={cls!r} is not an earlier sample index")


# --- JSONL I/O ----------------------------------------------------------------------------------


def json_lines(path: Path, what: str = "", hint: str = "") -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, parsed JSON, None)`` or ``(line number, None, reason)`` for each non-blank line.

    Lines are read as bytes and decoded one by one, so a stray invalid byte is that line's problem
    (named with its number), not an exception in the middle of iteration. A file that cannot be
    opened raises RecordError ("cannot open ``what`` (reason)``hint``").
    """
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise RecordError(f"cannot open{' ' + what if what else ''} ({exc.strerror}){hint}", path) from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw.decode("utf-8")), None
            except UnicodeDecodeError as exc:
                yield lineno, None, f"not UTF-8 text (byte {exc.start} of the line: {exc.reason})"
            except json.JSONDecodeError as exc:
                yield lineno, None, f"malformed JSON ({exc.msg} at column {exc.colno})"
            except RecursionError:
                yield lineno, None, "malformed JSON (nested too deeply)"


def _record(cls: type[R], data: Any) -> R:
    try:
        return cls.from_dict(data)
    except RecordError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        raise RecordError(f"invalid {cls.kind} record: {exc}") from None


def read_jsonl(path: str | os.PathLike, cls: type[R]) -> Iterator[R]:
    """Yield validated records; the first bad line raises RecordError(file, line)."""
    path = Path(path)
    for lineno, data, reason in json_lines(path):
        if reason is not None:
            raise RecordError(reason, path, lineno)
        try:
            yield _record(cls, data)
        except RecordError as exc:
            raise RecordError(exc.reason, path, lineno) from None


def iter_jsonl_lenient(path: str | os.PathLike, cls: type[R]) -> Iterator[tuple[int, R | None, str | None]]:
    """Yield ``(line, record, None)`` or ``(line, None, reason)``: for stages that reject, not stop."""
    path = Path(path)
    for lineno, data, reason in json_lines(path):
        if reason is not None:
            yield lineno, None, reason
            continue
        try:
            yield lineno, _record(cls, data), None
        except RecordError as exc:
            yield lineno, None, exc.reason


def dumps_record(record: Record) -> str:
    record.validate()
    return json.dumps(record.to_dict(), ensure_ascii=False, sort_keys=True, allow_nan=False)


def write_jsonl(path: str | os.PathLike, records: Iterable[Record]) -> int:
    """Write all records atomically (temp file + rename): a crash leaves the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(dumps_record(r) + "\n")
            n += 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return n


class JsonlAppender:
    """Append-only JSONL writer for resumable stages: each record is one fsynced line.

    On open, a half-written last line (a crash mid-write) is cut off, so a resumed run never
    sees a broken or duplicate record; every complete line is checked as a ``cls`` record, and one
    that is not (a file damaged or edited since) stops the run with its file and line.
    ``done_keys`` lists the ``key`` field of what is there. ``fault_point`` names the
    :mod:`sppd_megatron.faults` point reached before each append.
    """

    def __init__(self, path: str | os.PathLike, cls: type[Record], key: str = "id", fault_point: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.fault_point = fault_point
        self.done_keys: set[str] = set()
        if self.path.exists():
            data = self.path.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut != len(data):
                with self.path.open("r+b") as fh:
                    fh.truncate(cut)
            for lineno, parsed, reason in json_lines(self.path):
                if reason is not None:
                    raise RecordError(f"{reason}; this file was written by an earlier run and is damaged "
                                      "(move it away to redo its records)", self.path, lineno)
                try:
                    record = _record(cls, parsed)
                except RecordError as exc:
                    raise RecordError(f"{exc.reason}; this file was written by an earlier run and is damaged "
                                      "(move it away to redo its records)", self.path, lineno) from None
                self.done_keys.add(str(getattr(record, key)))
        self._fh = self.path.open("a", encoding="utf-8")

    def append(self, record: Record) -> None:
        if self.fault_point is not None:
            from sppd_megatron import faults

            faults.hit(self.fault_point, self.path)
        self._fh.write(dumps_record(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done_keys.add(str(getattr(record, self.key)))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
