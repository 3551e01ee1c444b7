"""``convert hf-to-mcore`` does what its switches say: the mapper asked for, the dtype asked for, --overwrite."""

import json
from pathlib import Path

import pytest
import torch

from sppd_megatron.conversion.cli import _parser
from sppd_megatron.conversion.cli import main as convert
from sppd_megatron.conversion.mcore_checkpoint import META_FILE

from conversion_helpers import make_tiny_hf, one_line_error


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("hf") / "llama", "llama")


def with_torch_dtype(src: Path, dst: Path, name: str) -> Path:
    """A copy of ``src`` saved in ``name`` (config.json's dtype and the safetensors both)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = name
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k: v.to(getattr(torch, name)) for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


def stored_dtype(ckpt: Path) -> str:
    return json.loads((ckpt / META_FILE).read_text())["dtype"]


def test_the_builtin_mapper_unless_bridge_is_asked_for():
    args = _parser().parse_args(["hf-to-mcore", "--hf", "a", "--out", "b"])
    assert args.mapper == "builtin" and args.dtype == "auto"
    with pytest.raises(SystemExit):  # no silent switching: "auto" is not a mapper
        _parser().parse_args(["hf-to-mcore", "--hf", "a", "--out", "b", "--mapper", "auto"])


@pytest.mark.parametrize("source,expected", [("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp32")])
def test_dtype_auto_is_the_sources_torch_dtype(tiny_llama, tmp_path, source, expected):
    hf = with_torch_dtype(tiny_llama, tmp_path / "hf", source)
    assert convert(["hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "auto")]) == 0
    assert stored_dtype(tmp_path / "auto") == expected
    other = "fp32" if expected == "bf16" else "bf16"
    assert convert(["hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "asked"), "--dtype", other]) == 0
    assert stored_dtype(tmp_path / "asked") == other


def test_overwrite_replaces_a_non_empty_output(tiny_llama, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale").write_text("from an earlier run")
    assert "--overwrite" in one_line_error(capsys, ["hf-to-mcore", "--hf", str(tiny_llama), "--out", str(out)])
    assert (out / "stale").is_file()
    assert convert(["hf-to-mcore", "--hf", str(tiny_llama), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale").exists() and stored_dtype(out) == "fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where megatron-bridge cannot run")
def test_bridge_checks_the_same_switches_and_says_why_it_cannot_run(tiny_llama, tmp_path, capsys):
    out = tmp_path / "o"
    bridge = ["hf-to-mcore", "--hf", str(tiny_llama), "--out", str(out), "--mapper", "bridge"]
    msg = one_line_error(capsys, bridge)
    assert "megatron-bridge is not usable here: it needs a CUDA device" in msg and "--mapper builtin" in msg
    assert not out.exists()
    out.mkdir()
    (out / "keep").write_text("x")
    assert "--overwrite" in one_line_error(capsys, bridge)
    # With --overwrite the directory is still untouched: nothing is deleted before the bridge can run.
    assert "not usable here" in one_line_error(capsys, bridge + ["--overwrite"])
    assert (out / "keep").read_text() == "x"
