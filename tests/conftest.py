"""Shared fixtures: a tiny policy that has memorised a few demo problems, so the loop has signal, and
one uninterrupted ``sppd-megatron run`` of configs/tiny-cpu/run.yaml with it (tests/pipeline checks
it, tests/faults kills and resumes copies of it against it); and the summary tables of the opt-in
suites (``./run test-gpu``, ``test-real``, ``test-vllm``): see :mod:`sppd_megatron.testing.suite`.

A random tiny model never reaches a correct answer, which leaves every preference dataset empty;
this one, fitted in plain torch for a few seconds, answers its problems mostly right at
temperature 1 with occasional slips, so trees hold correct and incorrect steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sppd_megatron.pipeline.problems import make_split
from sppd_megatron.records import PromptTemplate, write_jsonl
from sppd_megatron.sampling.prompts import render_prompt
from sppd_megatron.testing import suite
from sppd_megatron.tokenization import build_char_tokenizer

TEMPLATE = PromptTemplate(system_prompt="", use_chat_template=False, plain_format="Q: {question}\nA: ")
NUM_PROBLEMS = 6


def fit_policy(out: Path, problems, steps: int = 120) -> Path:
    from sppd_megatron.models.tiny import build_tiny_hf_model

    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    model = build_tiny_hf_model("llama", seed=0, vocab_size=len(tok), hidden_size=64, num_layers=2,
                                intermediate_size=128).train()
    rows, masks = [], []
    for p in problems:
        prompt_ids = render_prompt(TEMPLATE, tok, p.question)[1]
        ids = prompt_ids + tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(ids)
        masks.append([0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids)))
    width = max(map(len, rows))
    x = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    m = torch.tensor([k + [0] * (width - len(k)) for k in masks], dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        logits = model(input_ids=x).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="none")
        loss = (nll * m[:, 1:].reshape(-1)).sum() / m[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    """A fitted tiny policy and the prompts it was fitted on (also used as the eval benchmark)."""
    root = tmp_path_factory.mktemp("pipeline-data")
    problems = make_split(0, "test", NUM_PROBLEMS, 2, 2)
    prompts = root / "prompts.jsonl"
    write_jsonl(prompts, [p.to_prompt("test") for p in problems])
    return {"policy": fit_policy(root / "policy", problems), "prompts": prompts, "root": root}


@pytest.fixture(scope="session")
def pipeline_reference(demo_data, tmp_path_factory) -> Path:
    """The run directory of one uninterrupted run of the tiny loop (see pipeline_run.command)."""
    from pipeline_run import command, run

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = run(command(demo_data, run_dir))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def pytest_sessionstart(session):
    suite.session_started()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    suite.print_tables(terminalreporter)


def pytest_runtest_logfinish(nodeid, location):
    suite.write_tables()
