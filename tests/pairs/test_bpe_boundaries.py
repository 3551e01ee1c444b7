"""Steps under a byte-level BPE tokenizer (the ``tokenizers`` library's, trained here on a few lines):
a step that merges with its context is counted by sampling and dropped by pairs, so training, which
refuses such a step, never sees one; a step sampled as other ids than its text encodes to is counted.
(SmolLM2's own BPE tokenizer goes through the same checks in ``./run test-real``.)
"""

from __future__ import annotations

import json

import pytest

from sppd_megatron.pairs.cli import MERGES, PairsConfig, TrainableConfig, run_pairs
from sppd_megatron.pairs.handmade import handmade_tree, step
from sppd_megatron.records import Prompt, PromptTemplate, write_jsonl
from sppd_megatron.sampling.config import SampleConfig
from sppd_megatron.sampling.engines.base import Generation
from sppd_megatron.sampling.tree_sampler import TreeSampler
from sppd_megatron.tokenization import BoundaryMergeError, encode, encode_continuation, load_tokenizer
from sppd_megatron.training.data import load_examples

CORPUS = ["The answer is 5.\n\nSo x = 5.\n\n", "The answer is 7.\n\nSo y = 7.\n\n", "Question: what is 2+3?\nAnswer:\n"]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS * 20, trainer)
    out = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert len(tok("answer", add_special_tokens=False)["input_ids"]) == 1  # the merge under test
    assert len(tok("\n\n", add_special_tokens=False)["input_ids"]) == 1
    return tok


def test_encode_continuation_refuses_a_merge(bpe):
    ids, n = encode_continuation(bpe, "The answer is", " 5.\n\n")
    assert ids[:n] == encode(bpe, "The answer is")
    ids, n = encode_continuation(bpe, "So x = 5.\n", "So y = 7.\n")
    assert ids[:n] == encode(bpe, "So x = 5.\n")
    with pytest.raises(BoundaryMergeError, match="merges across the boundary"):
        encode_continuation(bpe, "The answ", "er is 5.")
    # GPT-2's pre-tokenizer (SmolLM2's too) keeps a final blank line whole, but splits it once text
    # follows: a context ending in a blank-line step delimiter is not a prefix of itself plus a step.
    assert bpe.convert_ids_to_tokens(encode(bpe, "5.\n\n"))[-1] == "ĊĊ"
    with pytest.raises(BoundaryMergeError):
        encode_continuation(bpe, "So x = 5.\n\n", "So y = 7.\n\n")


class OneStepEngine:
    """Returns the given ids for every request, then EOS-free stops: enough for one level of a tree."""

    name = "one-step"

    def __init__(self, tokenizer, steps: list[list[int]]):
        self.tokenizer, self.steps = tokenizer, steps

    def generate(self, requests):
        out = []
        for i, _ in enumerate(requests):
            ids = self.steps[i % len(self.steps)]
            out.append(Generation(token_ids=ids, token_logprobs=[-0.5] * len(ids), finish_reason="stop",
                                  text=self.tokenizer.decode(ids, skip_special_tokens=True)))
        return out

    def update_weights_from_hf(self, hf_dir):
        pass

    def close(self):
        pass


def test_sampler_counts_merging_and_retokenised_steps(bpe):
    newline = bpe.convert_tokens_to_ids("Ċ")
    canonical = bpe("So x = 5.\n\n", add_special_tokens=False)["input_ids"]
    split_newlines = bpe("So x = 5.", add_special_tokens=False)["input_ids"] + [newline, newline]
    merging = bpe("er is 5.\n\n", add_special_tokens=False)["input_ids"]
    template = PromptTemplate(system_prompt="", use_chat_template=False, plain_format="{question}")
    cfg = SampleConfig(input="unused", output_dir="unused", K=1, C=3, max_depth=1, max_step_tokens=16,
                       max_total_tokens=16, progress=False)
    sampler = TreeSampler(OneStepEngine(bpe, [canonical, split_newlines, merging]), bpe, cfg, template)
    [tree] = sampler.sample([Prompt(id="q", question="The answ", gold_answer="5")])
    assert [n.text for n in tree.nodes[1:]] == ["So x = 5.\n\n", "So x = 5.\n\n", "er is 5.\n\n"]
    stats = sampler.stats
    assert (stats.steps, stats.steps_retokenised_differently, stats.steps_merging_with_context) == (3, 1, 1)


def test_pairs_drop_what_training_would_refuse(bpe, bpe_dir, tmp_path):
    merging = handmade_tree("merge", "q", "5", [
        step("er is 5.\n\n", v=1.0, children=[step("\\boxed{5}", v=1.0)]),
        step(" is 7.\n\n", v=0.0, children=[step("\\boxed{7}", v=0.0)]),
    ], value_name="tree", prompt="The answ")
    clean = handmade_tree("clean", "q", "5", [
        step("So x = 5.\n", v=1.0, children=[step("\\boxed{5}", v=1.0)]),
        step("So y = 7.\n", v=0.0, children=[step("\\boxed{7}", v=0.0)]),
    ], value_name="tree", prompt="The answer is 5.\n")
    write_jsonl(tmp_path / "scored" / "trees-00000.jsonl", [merging, clean])
    out = tmp_path / "pairs"
    stats = run_pairs(PairsConfig(input_dir=str(tmp_path / "scored"), output_dir=str(out), progress=False,
                                  trainable=TrainableConfig(tokenizer=str(bpe_dir))))
    # The merging tree's SFT-PRM trajectory, DPO-PRM pair, step pair and SVPO pairs all start with "er is".
    assert stats["rejected_by_reason"][MERGES] >= 3
    assert (stats["sft"]["examples"], stats["dpo"]["pairs"], stats["step"]["pairs"]) == (1, 1, 1)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["question_id"] for r in rejects if r["category"] == MERGES} == {"merge"}
    for name, stage in (("sft.jsonl", "sft"), ("dpo.jsonl", "dpo"), ("step_pairs.jsonl", "step_dpo")):
        assert len(load_examples(out / name, stage, bpe, max_length=64, vocab_size=len(bpe))) == 1

    # Without a tokenizer the same trees reach training, which refuses them with file:line.
    unchecked = run_pairs(PairsConfig(input_dir=str(tmp_path / "scored"), output_dir=str(tmp_path / "raw"),
                                      progress=False))
    assert unchecked["trees_without_tokenizer_check"] == 2 and MERGES not in unchecked["rejected_by_reason"]
    with pytest.raises(ValueError, match=r"step_pairs.jsonl:1: the continuation re-tokenises differently"):
        load_examples(tmp_path / "raw" / "step_pairs.jsonl", "step_dpo", bpe, max_length=64, vocab_size=len(bpe))


def test_a_value_row_is_the_whole_state_even_across_a_merge(bpe):
    """Stage prm and the value-head PRM read V at a state's last token, and no loss reads the step's
    log-probs: a step that merges with its context (or is empty) is still a state, tokenised whole."""
    from sppd_megatron.training.data import state_row

    for prefix, step_text in (("The answ", "er is 5."), ("So x = 5.\n\n", "So y = 7.\n\n"), ("So x = 5.", "")):
        row = state_row(bpe, "Question: what is 2+3?\nAnswer:\n", prefix, step_text)
        whole = encode(bpe, "Question: what is 2+3?\nAnswer:\n" + prefix + step_text)
        assert row.ids == whole and 0 < row.context_len < len(whole) and not row.ends_with_eos
        assert row.ids[:row.context_len] == encode(bpe, "Question: what is 2+3?\nAnswer:\n" + prefix)[:row.context_len]
    assert state_row(bpe, "The answer", " is", " 5.").ids == encode(bpe, "The answer is 5.")
