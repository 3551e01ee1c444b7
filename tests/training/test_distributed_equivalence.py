"""The same tiny run under TP=2, PP=2 and DP=2 (gloo, CPU) matches one process step for step."""

import json
from pathlib import Path

import pytest

from sppd_megatron.testing.distributed import torchrun

REPO = Path(__file__).resolve().parents[2]
WORKER = str(REPO / "tests" / "training" / "dist_worker.py")
COMMON = ["schedule.train_steps=5", "checkpoint.save_final=false", "optim.optimizer=adamw", "optim.lr=1e-3"]
RUNS = {
    "step_dpo": ("configs/tiny-cpu/step_dpo.yaml", ["tp2", "pp2", "dp2", "dp2dist"]),
    "svpo": ("configs/tiny-cpu/svpo.yaml", ["tp2", "pp2"]),
    "sft": ("configs/tiny-cpu/sft.yaml", ["pp2"]),
}


def _launch(tmp_path: Path, nproc: int, layouts_of) -> dict:
    specs = [
        {"name": f"{stage}-{layout}", "config": cfg, "layout": layout, "overrides": COMMON}
        for stage, (cfg, layouts) in RUNS.items()
        for layout in layouts_of(layouts)
    ]
    proc = torchrun([WORKER, str(tmp_path / f"n{nproc}"), json.dumps(specs)], nproc=nproc, cwd=REPO, timeout=900)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    single = _launch(tmp, 1, lambda layouts: ["single"])
    multi = _launch(tmp, 2, lambda layouts: layouts)
    return {**single, **multi}


@pytest.mark.distributed
@pytest.mark.parametrize(
    "stage,layout",
    [(stage, layout) for stage, (_, layouts) in RUNS.items() for layout in layouts],
)
def test_layout_matches_single_process(results, stage, layout):
    base = results[f"{stage}-single"]
    other = results[f"{stage}-{layout}"]
    assert [r["step"] for r in other] == [1, 2, 3, 4, 5]
    for a, b in zip(base, other):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (stage, layout, a["step"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (stage, layout, a["step"])
        if "accuracy" in a:
            assert b["accuracy"] == a["accuracy"]
