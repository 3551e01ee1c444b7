"""Packed, prefix-shared and tree-packed training equal padded training, pair for pair.

One process runs dpo, step_dpo and svpo for 5 steps under each ``data.packing`` with an odd global
batch (5 pairs: bins then hold uneven numbers of pairs, and pairs of one tree share a trie), and
tree packing again with two bins per micro-batch (the last one padded with an empty bin). Every
run first computes its reference log-probs in its own layout, so the stored per-pair log-probs of
the initial policy are compared too. The TP/PP/DP layouts run the default packing in
test_distributed_equivalence.py.
"""

import json
from pathlib import Path

import pytest

from sppd_megatron.testing.distributed import torchrun

REPO = Path(__file__).resolve().parents[2]
WORKER = str(REPO / "tests" / "training" / "dist_worker.py")
STAGES = {"dpo": "configs/tiny-cpu/dpo.yaml", "step_dpo": "configs/tiny-cpu/step_dpo.yaml",
          "svpo": "configs/tiny-cpu/svpo.yaml"}
PACKINGS = ["none", "sequences", "pairs", "trees", "trees-2bins"]
COMMON = ["schedule.train_steps=5", "schedule.global_batch_size=5", "schedule.micro_batch_size=1",
          "checkpoint.save_final=false", "optim.optimizer=adamw", "optim.lr=1e-3", "data.group_by=tree"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("packing")
    specs = [{"name": f"{stage}-{packing}", "config": cfg, "layout": "single",
              "overrides": [*COMMON, f"data.packing={packing.split('-')[0]}",
                            *(["schedule.micro_batch_size=2"] if packing.endswith("2bins") else [])]}
             for stage, cfg in STAGES.items() for packing in PACKINGS]
    proc = torchrun([WORKER, str(out), json.dumps(specs)], nproc=1, cwd=REPO, timeout=1200)
    assert proc.returncode == 0
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS "))
    metrics = json.loads(line[len("RESULTS "):])
    refs = {s["name"]: [json.loads(l)["ref_logps"] for l in (out / s["name"] / "reference_logps.jsonl")
                        .read_text().splitlines()[1:]] for s in specs}
    return metrics, refs


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


@pytest.mark.distributed
@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("packing", PACKINGS[1:])
def test_packed_equals_padded(runs, stage, packing):
    metrics, refs = runs
    base, other = metrics[f"{stage}-none"], metrics[f"{stage}-{packing}"]
    padded_refs = [v for pair in refs[f"{stage}-none"] for v in pair]
    packed_refs = [v for pair in refs[f"{stage}-{packing}"] for v in pair]
    ref_diff = _max_rel(padded_refs, packed_refs)
    loss = _max_rel([r["loss"] for r in base], [r["loss"] for r in other])
    grad = _max_rel([r["grad_norm"] for r in base], [r["grad_norm"] for r in other])
    print(f"\n{stage} {packing} vs padded: {len(padded_refs)} sequence log-probs max relative difference {ref_diff:.2g}; "
          f"5 steps max relative difference loss {loss:.2g}, grad_norm {grad:.2g}")
    assert [r["step"] for r in other] == [1, 2, 3, 4, 5]
    assert ref_diff <= 1e-5 and loss <= 1e-5 and grad <= 1e-5
