"""Step-level beam search (``sbs@B``, ``sbs_vote@B``): selection rules, and B = C = 1 equals greedy decoding."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from sppd_megatron.evaluation.harness import PREDICTIONS, evaluate
from sppd_megatron.evaluation.modes import parse_mode
from sppd_megatron.evaluation.sbs import SearchQuestion, step_beam_search
from sppd_megatron.records import Prediction, PromptTemplate, read_jsonl
from sppd_megatron.sampling.engines.base import Generation
from sppd_megatron.scoring.prm import BatchedPRM
from sppd_megatron.tokenization import build_char_tokenizer

from .helpers import prompts


class StepTable:
    """A model-free engine: the next step of a state is ``table[state][j]`` for candidate j (the greedy
    candidate is j = 0; sampled candidates take the next entries in request order)."""

    name = "steps"

    def __init__(self, tokenizer, table: dict[str, list[str]]):
        self.tokenizer, self.table, self.calls = tokenizer, table, 0

    def generate(self, requests):
        self.calls += 1
        count: Counter = Counter()
        out = []
        for r in requests:
            state = self.tokenizer.decode(r.context_ids).split("A: ", 1)[1]
            j = 0 if r.temperature == 0 else 1 + count[state]
            if r.temperature > 0:
                count[state] += 1
            options = self.table[state]
            text = options[min(j, len(options) - 1)]
            ends = text.endswith("<EOS>")
            text = text.removesuffix("<EOS>")
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: r.max_new_tokens]
            reason = "eos" if ends else ("stop" if text.endswith("\n\n") else "length")
            if ends:
                ids = ids + [self.tokenizer.eos_token_id]
            out.append(Generation(token_ids=ids, token_logprobs=[0.0] * len(ids),
                                  text=self.tokenizer.decode(ids, skip_special_tokens=True), finish_reason=reason))
        return out

    def close(self):
        pass


class StatePRM(BatchedPRM):
    """Values by the state's text: ``values[text]``, 0.5 otherwise."""

    name = "state"

    def __init__(self, values):
        self.values = values

    def score_batch(self, queries):
        return [[self.values.get("".join(q.steps[: t + 1]), 0.5) for t in range(len(q.steps))] for q in queries]


TABLE = {
    "": ["a\n\n", "b\n\n", "c\n\n"],
    "a\n\n": ["\\boxed{1}<EOS>", "\\boxed{2}<EOS>"],
    "b\n\n": ["\\boxed{2}<EOS>", "x\n\n"],
    "b\n\nx\n\n": ["\\boxed{2}<EOS>"],
    "c\n\n": ["\\boxed{3}<EOS>"],
}
VALUES = {"a\n\n": 0.9, "b\n\n": 0.8, "c\n\n": 0.1, "a\n\n\\boxed{1}": 0.3, "a\n\n\\boxed{2}": 0.7,
          "b\n\n\\boxed{2}": 0.6, "b\n\nx\n\n": 0.65, "b\n\nx\n\n\\boxed{2}": 0.55}


def _question(tok, text="t?"):
    prompt = f"Q: {text}\nA: "
    return SearchQuestion(text, prompt, tok(prompt, add_special_tokens=False)["input_ids"],
                          lambda rnd, b, j: 1000 * rnd + 10 * b + j)


def test_beams_keep_the_best_valued_candidates_and_finish_at_eos():
    tok = build_char_tokenizer()
    engine = StepTable(tok, TABLE)
    (found,) = step_beam_search(engine, StatePRM(VALUES), [_question(tok)], width=2, expansions=2,
                                max_new_tokens=40, temperature=0.7, top_p=1.0, stop="\n\n")
    # round 1: the root's candidates are a (greedy, 0.9) and b (0.8), both kept; round 2: a -> boxed1 (0.3), boxed2 (0.7); b -> boxed2 (0.6), x (0.65): keep boxed2 of a (0.7, done)
    # and x (0.65); round 3: x -> boxed2 (0.55, done).
    texts = [tok.decode(b.ids, skip_special_tokens=True) for b in found]
    assert texts == ["a\n\n\\boxed{2}", "b\n\nx\n\n\\boxed{2}"]
    assert [b.value for b in found] == [0.7, 0.55] and all(b.done for b in found)
    assert engine.calls == 3


def test_width_one_one_expansion_follows_the_greedy_steps():
    tok = build_char_tokenizer()
    (found,) = step_beam_search(StepTable(tok, TABLE), StatePRM(VALUES), [_question(tok)], width=1, expansions=1,
                                max_new_tokens=40, temperature=0.7, top_p=1.0, stop="\n\n")
    assert [tok.decode(b.ids, skip_special_tokens=True) for b in found] == ["a\n\n\\boxed{1}"]


def test_sbs_modes_in_the_harness(tmp_path):
    tok = build_char_tokenizer()
    table = {**TABLE, "": ["a\n\n", "b\n\n", "c\n\n"]}
    template = PromptTemplate(system_prompt="", use_chat_template=False, plain_format="Q: {question}\nA: ")
    summary = evaluate(StepTable(tok, table), tok, {"b": prompts(("t?", "2"))}, ["greedy", "sbs@1", "sbs@2", "sbs_vote@2"],
                       tmp_path, template=template, max_new_tokens=40, orm=StatePRM(VALUES), progress=False,
                       sbs_expansions=2)
    results = summary["results"]["b"]
    # sbs@1: a (0.9) then boxed2 of a (0.7) -> right; sbs@2 as above -> its best, boxed2 (0.7), right.
    assert results["sbs@1"]["correct"] == 1 and results["sbs@2"]["correct"] == 1 and results["sbs_vote@2"]["correct"] == 1
    (pred,) = read_jsonl(tmp_path / PREDICTIONS, Prediction)
    assert sorted(pred.sbs) == ["1", "2"] and pred.sbs["2"].values == [0.7, 0.55]
    assert pred.sbs["2"].answers == ["2", "2"] and pred.sbs["2"].answer_classes == [0, 0]
    manifest = json.loads((tmp_path / "eval_manifest.json").read_text())
    assert manifest["settings"]["sbs_expansions"] == 2
    with pytest.raises(ValueError, match="need a reward model"):
        evaluate(StepTable(tok, table), tok, {"b": prompts(("t?", "2"))}, ["sbs@2"], tmp_path / "x", progress=False)
    assert parse_mode("SBS_VOTE@3").beam_width == 3 and parse_mode("sbs@1").samples_needed == 0


def test_sbs_vote_sums_values_per_answer():
    from sppd_megatron.evaluation.modes import judge
    from sppd_megatron.records import BeamSearchResult

    search = BeamSearchResult(generations=["\\boxed{5}", "\\boxed{6}", "\\boxed{6}"], values=[0.6, 0.5, 0.4],
                              answers=["5", "6", "6"], correct=[False, True, True], answer_classes=[None, 1, 1])
    search.answer_classes = [0, 1, 1]
    pred = Prediction(id="q", benchmark="b", prompt="p", gold_answer="6", generations=[], answers=[], correct=[],
                      sbs={"3": search})
    assert judge(parse_mode("sbs@3"), pred).answer == "5"  # the single best-valued solution
    assert judge(parse_mode("sbs_vote@3"), pred).answer == "6"  # 0.9 against 0.6


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model on a shared machine: spinning threads cost more than they give
    yield
    torch.set_num_threads(threads)


def test_width_one_one_expansion_equals_greedy_on_a_tiny_model(tmp_path, tiny_hf, one_thread):
    """sbs@1 with C = 1 gives the greedy solution, text for text, on a random tiny Llama. Its greedy
    solutions repeat a few characters, so with the commonest of them as the step delimiter every
    solution is cut into many steps (continued from the same token ids each time)."""
    from sppd_megatron.evaluation.orm import OutcomeRewardModel
    from sppd_megatron.pipeline.problems import make_split
    from sppd_megatron.sampling.engines.transformers_engine import TransformersEngine, load_causal_lm

    tok = build_char_tokenizer()
    engine = TransformersEngine(load_causal_lm(str(tiny_hf), tok), tok)
    template = PromptTemplate(system_prompt="", use_chat_template=False, plain_format="Q: {question}\nA: ")
    bench = {"toy": [p.to_prompt("toy") for p in make_split(0, "heldout", 8, 2, 3)]}
    first = evaluate(engine, tok, bench, ["greedy"], tmp_path / "greedy", template=template, max_new_tokens=48,
                     progress=False)
    greedy = [p.greedy_generation for p in read_jsonl(tmp_path / "greedy" / PREDICTIONS, Prediction)]
    delimiter = Counter("".join(greedy)).most_common(1)[0][0]
    orm = OutcomeRewardModel(StatePRM({}))
    evaluate(engine, tok, bench, ["greedy", "sbs@1"], tmp_path / "sbs", template=template, max_new_tokens=48,
             progress=False, orm=orm, sbs_expansions=1, step_delimiter=delimiter)
    preds = list(read_jsonl(tmp_path / "sbs" / PREDICTIONS, Prediction))
    assert [p.sbs["1"].generations[0] for p in preds] == greedy
    assert [p.sbs["1"].answers[0] for p in preds] == [p.greedy_answer for p in preds]
    steps = sum(g.count(delimiter) for g in greedy)
    assert steps >= 3 * len(greedy), (delimiter, greedy)  # many rounds per solution, not one long step
    assert first["results"]["toy"]["greedy"]["n"] == 8
