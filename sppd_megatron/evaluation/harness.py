"""Evaluate a policy on benchmarks: generate, grade, score, and summarise per mode (SPPD section 6.1).

One run directory holds

- ``predictions.jsonl``: one :class:`~sppd_megatron.records.Prediction` per (benchmark, question),
  fsynced line by line, in benchmark then question order;
- ``eval_manifest.json``: the settings that decide the generations (a resumed run must match them);
- ``summary.json`` / ``summary.md``: accuracy and 95% Wilson interval per benchmark and mode,
  recomputed from the predictions at the end of every run.

Every question gets at most one greedy solution (temperature 0) and N sampled ones, N being the
largest of the modes' sample counts, and one step-level beam search per width of the ``sbs`` modes
(:mod:`.sbs`, guided by the reward model); all sampling modes read prefixes of the same samples, so
``maj@4`` and ``maj@8`` of one run use the first 4 and all 8 of the same solutions. Sample k of a
question is drawn with a seed derived from (seed, benchmark, question id, k), so it does not
depend on which other questions or modes are in the run.

Resuming: questions are generated in fixed groups of ``questions_per_batch`` (by position); a group
whose questions are all on disk is skipped, a group cut short by a crash is generated again in full
(so every engine call has the same shape as in an uninterrupted run, which keeps batched floats and
therefore the bytes identical) and only its missing questions are written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from sppd_megatron.config import ConfigError
from sppd_megatron.evaluation.modes import Mode, answer_classes, parse_modes
from sppd_megatron.evaluation.orm import OutcomeRewardModel, as_outcome_model
from sppd_megatron.evaluation.summary import summarize, write_summary
from sppd_megatron.records import (
    BeamSearchResult,
    JsonlAppender,
    Prediction,
    Prompt,
    PromptTemplate,
    RecordError,
    iter_jsonl_lenient,
)
from sppd_megatron.sampling.engines.base import GenerationRequest, RolloutEngine
from sppd_megatron.sampling.prompts import render_prompt, resolve_template
from sppd_megatron.scoring.grading import DEFAULT_TIMEOUT_SECONDS, answers_equal, extract_answer, gold_to_answer

PREDICTIONS = "predictions.jsonl"
MANIFEST = "eval_manifest.json"


@dataclass(frozen=True)
class GenerationPlan:
    """What each question needs so that every requested mode can be computed."""

    greedy: bool
    num_samples: int
    score: bool
    sbs_widths: tuple[int, ...] = ()

    @classmethod
    def from_modes(cls, modes: Sequence[Mode]) -> "GenerationPlan":
        return cls(greedy=any(m.kind == "greedy" for m in modes),
                   num_samples=max((m.samples_needed for m in modes), default=0),
                   score=any(m.needs_orm for m in modes),
                   sbs_widths=tuple(sorted({m.beam_width for m in modes if m.beam_width is not None})))

    def missing(self, pred: Prediction) -> str | None:
        """Why a stored record cannot serve these modes, or None when it can."""
        if self.greedy and pred.greedy_generation is None:
            return "has no greedy solution"
        absent = [w for w in self.sbs_widths if str(w) not in (pred.sbs or {})]
        if absent:
            return f"has no step-level beam search of width {absent[0]}"
        if len(pred.generations) < self.num_samples:
            return f"has {len(pred.generations)} samples, the modes need {self.num_samples}"
        if self.score and self.num_samples and pred.scores is None:
            return "has no ORM scores"
        return None


def sample_seed(seed: int, benchmark: str, question_id: str, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a question (index -1: the greedy request)."""
    digest = hashlib.sha256(f"{seed}\0{benchmark}\0{question_id}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def default_template(tokenizer) -> PromptTemplate:
    """The paper's prompt (appendix C.1) in the tokenizer's chat template, or plain text without one."""
    return PromptTemplate(use_chat_template=bool(getattr(tokenizer, "chat_template", None)))


# --- run directory -------------------------------------------------------------------------------


def _check_manifest(out: Path, settings: dict, orm_name: str | None) -> None:
    """Write the manifest; on a resumed run, refuse settings that would change the generations."""
    path = out / MANIFEST
    old: dict = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            old.get("settings", {}).get
        except (ValueError, AttributeError):
            raise ConfigError(f"{path}: damaged (not the JSON object evaluation writes); move it away to "
                              "evaluate this directory again") from None
        changed = sorted(k for k in set(old.get("settings", {})) | set(settings)
                         if old.get("settings", {}).get(k) != settings.get(k))
        if changed:
            raise ConfigError(f"{path}: this directory was evaluated with different settings (keys {changed}); "
                              "use a new output directory or the original settings to resume")
        if orm_name and old.get("orm") and old["orm"] != orm_name:
            raise ConfigError(f"{path}: scores here come from ORM {old['orm']!r}, not {orm_name!r}; "
                              "use a new output directory")
    body = {"settings": settings, "orm": orm_name or old.get("orm")}
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _load_done(path: Path, wanted: set[tuple[str, str]], plan: GenerationPlan) -> dict[tuple[str, str], Prediction]:
    """Stored records of the questions this run wants; a record that cannot serve the modes is an error."""
    done: dict[tuple[str, str], Prediction] = {}
    if not path.exists():
        return done
    for line, pred, reason in iter_jsonl_lenient(path, Prediction):
        if pred is None:
            raise RecordError(reason, path, line)
        key = (pred.benchmark, pred.id)
        if key not in wanted:
            continue
        why = plan.missing(pred)
        if why:
            raise RecordError(f"question {pred.benchmark}/{pred.id} {why}; evaluate into a new output directory",
                              path, line)
        done[key] = pred
    return done


# --- one group of questions ----------------------------------------------------------------------


@dataclass
class _Run:
    """The fixed parts of one evaluate() call; ``evaluate_group`` turns prompts into Prediction records."""

    engine: RolloutEngine | None
    make_engine: Callable[[], RolloutEngine] | None
    tokenizer: object
    template: PromptTemplate
    plan: GenerationPlan
    orm: OutcomeRewardModel | None
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    grade_timeout: float | None
    sbs_expansions: int = 5
    step_delimiter: str = "\n\n"
    generated_tokens: int = 0

    def get_engine(self) -> RolloutEngine:
        if self.engine is None:
            self.engine = self.make_engine()
        return self.engine

    def _grade(self, text: str, gold: str) -> tuple[str | None, bool]:
        answer = extract_answer(text)
        return answer, answer is not None and answers_equal(answer, gold, self.grade_timeout)

    def evaluate_group(self, benchmark: str, group: Sequence[Prompt]) -> list[Prediction]:
        plan = self.plan
        rendered = [render_prompt(self.template, self.tokenizer, p.question) for p in group]
        requests: list[GenerationRequest] = []
        for p, (_, ids) in zip(group, rendered):
            affinity = f"{benchmark}/{p.id}"  # a question's solutions share its prompt: one replica serves them
            if plan.greedy:
                requests.append(GenerationRequest(ids, self.max_new_tokens, temperature=0.0,
                                                  seed=sample_seed(self.seed, benchmark, p.id, -1), affinity=affinity))
            requests += [GenerationRequest(ids, self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                           seed=sample_seed(self.seed, benchmark, p.id, k), affinity=affinity)
                         for k in range(plan.num_samples)]
        engine = self.get_engine()
        reset = getattr(engine, "reset_prefix_cache", None)
        if reset is not None:  # a group must not depend on what earlier groups left in the cache
            reset()
        generations = engine.generate(requests) if requests else []
        self.generated_tokens += sum(len(g.token_ids) for g in generations)
        texts = [g.text for g in generations]

        per_question = int(plan.greedy) + plan.num_samples
        records = []
        for i, (p, (prompt_text, _)) in enumerate(zip(group, rendered)):
            mine = texts[i * per_question:(i + 1) * per_question]
            greedy_text, samples = (mine[0], mine[1:]) if plan.greedy else (None, mine)
            gold = gold_to_answer(p.gold_answer)
            graded = [self._grade(t, gold) for t in samples]
            answers = [a for a, _ in graded]
            greedy_answer, greedy_correct = self._grade(greedy_text, gold) if plan.greedy else (None, None)
            records.append(Prediction(
                id=p.id, benchmark=benchmark, prompt=prompt_text, question=p.question, gold_answer=p.gold_answer,
                generations=samples, answers=answers, correct=[c for _, c in graded],
                answer_classes=answer_classes(answers, self.grade_timeout),
                greedy_generation=greedy_text, greedy_answer=greedy_answer, greedy_correct=greedy_correct,
            ))
        if plan.score and plan.num_samples:
            flat = [(r.question, g, r.prompt) for r in records for g in r.generations]
            scores = self.orm.score_solutions(*zip(*flat))
            for i, r in enumerate(records):
                r.scores = scores[i * plan.num_samples:(i + 1) * plan.num_samples]
        for width in plan.sbs_widths:
            self._beam_search(benchmark, group, rendered, records, width)
        return records

    def _beam_search(self, benchmark: str, group: Sequence[Prompt], rendered, records: list[Prediction],
                     width: int) -> None:
        from sppd_megatron.evaluation.sbs import SearchQuestion, step_beam_search

        def seeds(question_id: str):
            return lambda rnd, beam, j: sample_seed(self.seed, benchmark, f"{question_id}/sbs{width}/{rnd}/{beam}", j)

        questions = [SearchQuestion(p.question, text, ids, seeds(p.id), affinity=f"{benchmark}/{p.id}")
                     for p, (text, ids) in zip(group, rendered)]
        found = step_beam_search(self.get_engine(), self.orm.prm, questions, width, self.sbs_expansions,
                                 self.max_new_tokens, self.temperature, self.top_p, self.step_delimiter)
        for record, beams in zip(records, found):
            texts = [self.tokenizer.decode(b.ids, skip_special_tokens=True) for b in beams]
            self.generated_tokens += sum(len(b.ids) for b in beams)
            gold = gold_to_answer(record.gold_answer)
            graded = [self._grade(t, gold) for t in texts]
            answers = [a for a, _ in graded]
            record.sbs = {**(record.sbs or {}), str(width): BeamSearchResult(
                generations=texts, values=[b.value for b in beams], answers=answers, correct=[c for _, c in graded],
                answer_classes=answer_classes(answers, self.grade_timeout))}


# --- public entry point --------------------------------------------------------------------------


def evaluate(engine: RolloutEngine | Callable[[], RolloutEngine], tokenizer, benchmarks: dict[str, list[Prompt]],
             modes: Sequence[str | Mode], out_dir: str | Path, *, template: PromptTemplate | None = None,
             max_new_tokens: int = 2048, temperature: float = 0.7, top_p: float = 1.0, seed: int = 0,
             orm=None, progress: bool = True, questions_per_batch: int = 8,
             grade_timeout_seconds: float | None = DEFAULT_TIMEOUT_SECONDS, model_id: str | None = None,
             sbs_expansions: int = 5, step_delimiter: str = "\n\n") -> dict:
    """Evaluate every question of ``benchmarks`` (name -> prompts) in ``modes``; returns the summary.

    ``engine`` is a RolloutEngine, or a zero-argument callable building one (called only if some
    question still needs generating, so re-summarising a finished run loads no model). ``orm`` is a
    ProcessRewardModel (read with its last step's value) or an OutcomeRewardModel; ORM modes need one,
    and the ``sbs`` modes read its step values (C = ``sbs_expansions`` candidate steps per beam, steps
    ending at ``step_delimiter``).
    ``template`` defaults to the paper's prompt in the tokenizer's chat template. ``model_id`` is
    recorded in the manifest so a resumed run cannot mix two models' generations.
    """
    from tqdm import tqdm

    modes = parse_modes(modes)
    plan = GenerationPlan.from_modes(modes)
    orm = as_outcome_model(orm)
    if (plan.score or plan.sbs_widths) and orm is None:
        needing = [m.name for m in modes if m.needs_orm or m.beam_width is not None]
        raise ValueError(f"modes {needing} need a reward model (pass orm=..., or --orm DIR)")
    if questions_per_batch < 1 or max_new_tokens < 1 or temperature < 0 or sbs_expansions < 1:
        raise ValueError("questions_per_batch, max_new_tokens and sbs_expansions must be >= 1 and temperature >= 0")
    template = resolve_template(template or default_template(tokenizer), tokenizer)

    from sppd_megatron.locking import locked

    out = Path(out_dir)
    with locked(out):  # one writer per directory
        settings = {"model": model_id, "template": dataclasses.asdict(template), "max_new_tokens": max_new_tokens,
                    "temperature": temperature, "top_p": top_p, "seed": seed, "questions_per_batch": questions_per_batch}
        if plan.sbs_widths:  # only then, so directories evaluated before beam search existed still resume
            settings.update(sbs_expansions=sbs_expansions, step_delimiter=step_delimiter)
        _check_manifest(out, settings, orm.name if plan.score or plan.sbs_widths else None)
        predictions_path = out / PREDICTIONS
        appender = JsonlAppender(predictions_path, Prediction, fault_point="eval.question")  # cuts a torn last line
        wanted = {(bench, p.id) for bench, prompts in benchmarks.items() for p in prompts}
        done = _load_done(predictions_path, wanted, plan)

        make_engine = None if hasattr(engine, "generate") else engine
        run = _Run(engine=None if make_engine else engine, make_engine=make_engine, tokenizer=tokenizer,
                   template=template, plan=plan, orm=orm, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, seed=seed, grade_timeout=grade_timeout_seconds, sbs_expansions=sbs_expansions,
                   step_delimiter=step_delimiter)
        written = 0
        start = time.perf_counter()
        bar = tqdm(total=len(wanted), initial=len(done), unit="q", desc="eval", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
        try:
            with appender:
                for bench, prompts in benchmarks.items():
                    bar.set_description(f"eval {bench}")
                    for first in range(0, len(prompts), questions_per_batch):
                        group = prompts[first:first + questions_per_batch]
                        if all((bench, p.id) in done for p in group):
                            continue
                        for record in run.evaluate_group(bench, group):
                            key = (bench, record.id)
                            if key in done:
                                continue
                            appender.append(record)
                            done[key] = record
                            written += 1
                            bar.update(1)
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix(tok_s=f"{run.generated_tokens / elapsed:.0f}", refresh=True)
        finally:
            bar.close()
            if run.engine is not None and run.make_engine is not None:
                run.engine.close()  # we built it, we close it

        ordered = [done[(bench, p.id)] for bench, prompts in benchmarks.items() for p in prompts]
        summary = summarize(ordered, modes)
        write_summary(summary, out)
        return summary
