"""transformer_impl: TE on CUDA, local without CUDA, and never a silent downgrade on a GPU machine."""

import sys

import pytest
import torch

from sppd_megatron.models.builder import PrecisionConfig, resolve_transformer_impl


@pytest.fixture
def cuda_without_te(monkeypatch):
    """A CUDA machine on which ``import transformer_engine`` fails (None in sys.modules raises ImportError)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)


def test_auto_on_cuda_with_a_broken_te_stops_with_the_import_error(cuda_without_te):
    with pytest.raises(RuntimeError, match="TransformerEngine does not import") as info:
        resolve_transformer_impl(PrecisionConfig(transformer_impl="auto"))
    assert isinstance(info.value.__cause__, ImportError)
    assert "transformer_impl=local" in str(info.value)
    with pytest.raises(RuntimeError, match="does not import"):
        resolve_transformer_impl(PrecisionConfig(transformer_impl="transformer_engine"))


def test_local_by_name_is_always_available(cuda_without_te):
    assert resolve_transformer_impl(PrecisionConfig(transformer_impl="local")) == "local"


def test_without_cuda_auto_is_local_and_te_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_transformer_impl(PrecisionConfig(transformer_impl="auto")) == "local"
    with pytest.raises(RuntimeError, match="no CUDA"):
        resolve_transformer_impl(PrecisionConfig(transformer_impl="transformer_engine"))
    with pytest.raises(RuntimeError, match="fp8"):
        resolve_transformer_impl(PrecisionConfig(transformer_impl="auto", fp8="e4m3"))


def test_fp8_with_local_layers_is_rejected_when_the_config_loads():
    with pytest.raises(ValueError, match="fp8"):
        PrecisionConfig(transformer_impl="local", fp8="e4m3")
