"""Wrong inputs end as one line that says what to do (CLI: ``error: ...``, exit status 2)."""

import json
from pathlib import Path

import pytest

from sppd_megatron.config import config_to_dict
from sppd_megatron.conversion.errors import ConversionError
from sppd_megatron.conversion.mcore_checkpoint import (
    META_FILE,
    MODEL_SUBDIR,
    check_checkpoint_matches,
    write_checkpoint_meta,
)
from sppd_megatron.models.config import ModelConfig, model_config_from_hf

from conversion_helpers import make_tiny_hf, one_line_error


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("hf") / "llama", "llama")


def test_directory_without_config_json(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"")
    msg = one_line_error(capsys, ["hf-to-mcore", "--hf", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "no config.json" in msg and "pass a Hugging Face checkpoint directory" in msg


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    msg = one_line_error(capsys, ["hf-to-mcore", "--hf", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "unsupported architecture" in msg and "LlamaForCausalLM" in msg


def test_tp_size_that_does_not_divide_the_heads(tiny_llama, tmp_path, capsys):
    msg = one_line_error(capsys, ["hf-to-mcore", "--hf", str(tiny_llama), "--out", str(tmp_path / "o"), "--tp", "3"])
    assert "does not divide num_attention_heads=4" in msg and "choose a divisor" in msg
    assert not (tmp_path / "o").exists()


def test_weights_from_a_different_model_than_config_json(tiny_llama, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["hidden_size"] = 128
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "model.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes())
    msg = one_line_error(capsys, ["hf-to-mcore", "--hf", str(other), "--out", str(tmp_path / "o")])
    assert "different model" in msg


def fake_checkpoint(path: Path, model_cfg: ModelConfig) -> Path:
    """A checkpoint directory as far as the checks before loading see it (meta + dist metadata)."""
    (path / MODEL_SUBDIR).mkdir(parents=True)
    (path / MODEL_SUBDIR / "metadata.json").write_text("{}")
    write_checkpoint_meta(path, model_cfg, "builtin:char")
    return path


def test_checkpoint_from_a_different_model(tiny_llama, tmp_path, capsys):
    cfg = model_config_from_hf(tiny_llama)
    other = ModelConfig(**{**config_to_dict(cfg), "rope_scaling": None, "num_layers": 4})
    ckpt = fake_checkpoint(tmp_path / "ckpt", other)
    # Exporting with the template of another model.
    msg = one_line_error(capsys, ["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "o"),
                                  "--hf-template", str(tiny_llama)])
    assert "different model" in msg and "num_layers: 4 vs 2" in msg and "pass the template" in msg
    # Loading it into a model built from another config (what train does before touching tensors).
    with pytest.raises(ConversionError, match="different model.*num_layers: 4 vs 2") as info:
        check_checkpoint_matches(ckpt, cfg)
    assert "\n" not in str(info.value)


def test_not_a_megatron_checkpoint(tiny_llama, tmp_path, capsys):
    msg = one_line_error(capsys, ["mcore-to-hf", "--ckpt", str(tiny_llama), "--out", str(tmp_path / "o")])
    assert f"no {META_FILE}" in msg and "hf-to-mcore" in msg


def test_output_directory_not_empty(tiny_llama, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep")
    msg = one_line_error(capsys, ["hf-to-mcore", "--hf", str(tiny_llama), "--out", str(tmp_path / "o")])
    assert "--overwrite" in msg
