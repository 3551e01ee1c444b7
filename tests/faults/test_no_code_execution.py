"""Nothing runs code it was handed: checkpoints, model and tokenizer directories, configs.

Each forged input would create a marker file if anything ran it; each must end in one clean line
with the marker absent.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest

from faultlib import clean_error

ROOT = Path(__file__).resolve().parents[2]


class _Forged:
    """Unpickling this runs ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def mcore_checkpoint(tmp_path_factory) -> Path:
    from sppd_megatron.conversion.cli import main as convert
    from sppd_megatron.models.tiny import save_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("forged")
    hf = save_tiny_hf_checkpoint(root / "hf", family="llama", seed=3)
    assert convert(["hf-to-mcore", "--hf", str(hf), "--out", str(root / "mcore")]) == 0
    return root / "mcore"


@pytest.mark.parametrize("target", [".metadata", "common.pt"])
def test_a_forged_dist_checkpoint_is_refused_unread(mcore_checkpoint, target, tmp_path, capsys, tally):
    import torch

    from sppd_megatron.conversion.cli import main as convert

    forged = tmp_path / "ckpt"
    shutil.copytree(mcore_checkpoint, forged)
    marker = tmp_path / "ran"
    payload = _Forged(f"touch {marker}")
    path = forged / "model" / target
    if target == ".metadata":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save({"x": payload}, str(path))
    capsys.readouterr()
    assert convert(["mcore-to-hf", "--ckpt", str(forged), "--out", str(tmp_path / "out")]) == 2
    line = clean_error(capsys.readouterr().err, "sppd-megatron convert", str(path), "refused")
    assert "system" in line or "weights_only" in line or "plain data" in line
    assert not marker.exists()
    tally.corruption("forged checkpoints", "clean error")


def test_model_and_tokenizer_code_shipped_in_a_directory_never_runs(tmp_path, capsys, tally):
    from sppd_megatron.models.tiny import save_tiny_hf_checkpoint

    marker = tmp_path / "ran"
    evil = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")

    model = Path(save_tiny_hf_checkpoint(tmp_path / "model", family="llama", seed=4))
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["EvilForCausalLM"], auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text(evil)
    outcomes = [_no_code_ran(capsys, marker, model, f"model={model}", "tokenizer=builtin:char",
                             f"output_dir={tmp_path / 'a'}")]

    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(model, tokenizer)
    cfg = json.loads((tokenizer / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tokenizer / "tokenization_evil.py").write_text(evil)
    outcomes.append(_no_code_ran(capsys, marker, tokenizer, f"tokenizer={tokenizer}", f"output_dir={tmp_path / 'b'}"))
    for outcome in outcomes:
        tally.corruption("forged model and tokenizer directories", outcome)


def _no_code_ran(capsys, marker: Path, directory: Path, *overrides: str) -> str:
    """``sample`` on a directory shipping code: its data is read as data (trust_remote_code stays off: a
    Llama by model_type, a tokenizer by tokenizer.json), or it is refused in one line; the code never runs."""
    from sppd_megatron.sampling.cli import main as sample

    prompts = marker.parent / "prompts.jsonl"
    rc = sample([str(ROOT / "configs/tiny-cpu/sample.yaml"), f"input={prompts}", *overrides, "progress=false",
                 "num_questions=1", "K=1"])
    err = capsys.readouterr().err
    if rc != 0:
        assert rc == 2
        clean_error(err, "sppd-megatron sample", str(directory))
    assert not marker.exists()
    return "clean error" if rc else "recovered"


def test_a_yaml_tag_builds_nothing(tmp_path, capsys, tally):
    from sppd_megatron.sampling.cli import main as sample

    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f'input: !!python/object/apply:os.system ["touch {marker}"]\noutput_dir: {tmp_path / "o"}\n')
    assert sample([str(config)]) == 2
    clean_error(capsys.readouterr().err, "sppd-megatron sample", str(config), "not valid YAML")
    assert not marker.exists()
    tally.corruption("forged configs", "clean error")


def test_no_module_is_imported_by_a_string_from_outside_the_package_registry():
    """The one dynamic import is the verb registry (sppd_megatron/cli.py: fixed names); no eval/exec; YAML
    only through the safe loader; torch.load never without weights_only=True."""
    offenders = []
    for path in sorted((ROOT / "sppd_megatron").rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        for pattern in (r"\bimport_module\(", r"__import__\(", r"(?<![.\w])eval\(", r"(?<![.\w])exec\(", r"pydoc\.locate",
                        r"yaml\.load\((?![^)]*Loader=_LOADER)", r"yaml\.unsafe_load", r"pickle\.loads?\("):
            for match in re.finditer(pattern, text):
                offenders.append(f"{rel}: {match.group(0)}")
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{rel}: torch.load without weights_only=True")
    assert offenders == ["sppd_megatron/cli.py: import_module("], offenders
    cli = (ROOT / "sppd_megatron" / "cli.py").read_text()
    assert "importlib.import_module(VERBS[verb][0])" in cli
