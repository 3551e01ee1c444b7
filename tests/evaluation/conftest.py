"""Fixtures: a tiny random Llama saved as a Hugging Face directory (character tokenizer)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def tiny_hf(tmp_path_factory):
    from sppd_megatron.models.tiny import save_tiny_hf_checkpoint

    return save_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny-hf"), family="llama", seed=0)
