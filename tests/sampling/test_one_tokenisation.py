"""Sampling, Monte-Carlo rollouts and training condition the policy on the same token ids.

The tokenizer here adds BOS before every text, like a Llama base model's: the plain-format prompt a
tree was sampled from must reach training with that BOS, and a chat template that writes BOS
itself must not get a second one.
"""

from __future__ import annotations

import copy

import pytest

from sppd_megatron.records import Prompt, PromptTemplate, SFTExample, write_jsonl
from sppd_megatron.sampling.prompts import render_prompt, resolve_template
from sppd_megatron.sampling.tree_sampler import TreeSampler
from sppd_megatron.scoring.mc_prm import MonteCarloPRM, MonteCarloPRMConfig
from sppd_megatron.scoring.prm import StepQuery
from sppd_megatron.tokenization import CHAT_TEMPLATE, build_char_tokenizer
from sppd_megatron.training import data as tdata

from .helpers import ScriptedEngine, small_config

BOS = 1
QUESTION = "What is 2+3?"


@pytest.fixture(scope="module")
def bos_tokenizer():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    core = copy.deepcopy(build_char_tokenizer().backend_tokenizer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", clean_up_tokenization_spaces=False)
    assert tok("ab")["input_ids"][0] == BOS  # the convention under test
    tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    return tok


def _training_rows(tmp_path, tokenizer, prompt: str, response: str) -> tdata.Row:
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, [SFTExample(prompt=prompt, response=response)])
    [example] = tdata.load_examples(path, "sft", tokenizer, 512, len(tokenizer), append_eos=False)
    return example.rows[0]


@pytest.mark.parametrize("use_chat_template", [False, True])
def test_prompt_ids_are_training_context_ids(tmp_path, bos_tokenizer, use_chat_template):
    template = resolve_template(PromptTemplate(use_chat_template=use_chat_template), bos_tokenizer)
    text, ids = render_prompt(template, bos_tokenizer, QUESTION)
    assert ids[0] == BOS and ids.count(BOS) == 1
    row = _training_rows(tmp_path, bos_tokenizer, text, "Step 1: 2+3=5.\n\n")
    assert row.ids[: row.context_len] == ids


def test_sampled_contexts_are_what_training_tokenises(tmp_path, bos_tokenizer):
    template = resolve_template(PromptTemplate(use_chat_template=False), bos_tokenizer)
    engine = ScriptedEngine(bos_tokenizer)
    sampler = TreeSampler(engine, bos_tokenizer, small_config(), template)
    [tree] = sampler.sample([Prompt(id="q", question=QUESTION, gold_answer="5", source="t:0")])
    # A step ending in EOS carries the id but not its text; training appends EOS by its own rule.
    deepest = max((n for n in tree.nodes if bos_tokenizer.eos_token_id not in n.token_ids), key=lambda n: n.depth)
    assert deepest.depth >= 2
    sampled = list(tree.nodes[0].token_ids) + [t for n in tree.path(deepest.node_id) for t in n.token_ids]
    row = _training_rows(tmp_path, bos_tokenizer, tree.prompt, tree.state_text(deepest.node_id))
    assert row.ids == sampled


def test_monte_carlo_rollouts_start_like_training(bos_tokenizer):
    template = resolve_template(PromptTemplate(use_chat_template=False), bos_tokenizer)
    text, ids = render_prompt(template, bos_tokenizer, QUESTION)
    engine = ScriptedEngine(bos_tokenizer)
    prm = MonteCarloPRM(engine, bos_tokenizer, MonteCarloPRMConfig(num_rollouts=1, max_new_tokens=4))
    prm.score_batch([StepQuery(question=QUESTION, steps=("2+3=5.\n\n",), gold_answer="5", prompt=text)])
    [request] = engine.calls[0]
    assert request.context_ids[: len(ids)] == ids and request.context_ids.count(BOS) == 1
