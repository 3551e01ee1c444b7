"""Fixtures: the character tokenizer, a tiny random Llama, a small prompts file, a resolved template."""

from __future__ import annotations

import json

import pytest
import torch

from sppd_megatron.records import PromptTemplate
from sppd_megatron.sampling.prompts import resolve_template
from sppd_megatron.tokenization import build_char_tokenizer

from .helpers import QUESTIONS


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    # The tiny model is fastest on one thread, especially when other jobs share the two cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    from sppd_megatron.sampling.engines.transformers_engine import load_causal_lm

    return load_causal_lm("tiny:llama", tokenizer)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "gsm8k" / "test.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


@pytest.fixture
def template(tokenizer):
    return resolve_template(PromptTemplate(), tokenizer)
