"""The planner's exact parts equal the bytes a tiny CPU training run's Megatron objects hold.

Each launch trains one step of a tiny recipe under torchrun with ``tools/plan_memory.py --measure``,
which records per rank the parameter, main-grad and optimizer-state bytes and the peak of tensors
saved for backward (sppd_megatron/planning/measure.py). Weights, grads and optimizer state must match
exactly; activations are an estimate, asserted within 5% on padded rows (``pytest -s`` prints each
rank's difference). For packed bins the plan is a bound (full bins, every token scored): asserted
not below what a run holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sppd_megatron.testing.distributed import torchrun

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["logging.progress=false", "logging.tensorboard=false", "checkpoint.save_final=false",
          "schedule.train_steps=1", "precision.params_dtype=bf16", "data.packing=none"]


def _measure(tmp_path: Path, recipe: str, nproc: int, overrides: list[str]) -> list[dict]:
    out = tmp_path / "measure.json"
    torchrun(["tools/plan_memory.py", recipe, f"output_dir={tmp_path / 'run'}", *COMMON, *overrides,
              "--measure", "--json", str(out)], nproc=nproc, cwd=ROOT, timeout=300)
    return json.loads(out.read_text())


def _check_activations(rows: list[dict]) -> None:
    """The planned activations + logits within 5% of the measured peak (docs and README claim this)."""
    for row in rows:
        planned = row["planned"]["activations+logits"]
        measured = row["rank"]["activations_saved_peak"]
        r = row["rank"]
        print(f"\ntp{r['tp_rank']} pp{r['pp_rank']} dp{r['dp_rank']}: activations+logits planned "
              f"{planned / 2**20:.2f} MiB, saved-for-backward peak {measured / 2**20:.2f} MiB "
              f"({planned / measured - 1:+.1%})")
        assert abs(planned - measured) <= 0.05 * measured, (planned, measured)


@pytest.mark.distributed
def test_tp2_pp2_step_dpo_sgd_momentum_bf16(tmp_path):
    rows = _measure(tmp_path, "configs/tiny-cpu/step_dpo.yaml", 4, [
        "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
        "schedule.global_batch_size=4", "schedule.micro_batch_size=1", "optim.sgd_momentum=0.9",
    ])
    assert sorted((r["rank"]["tp_rank"], r["rank"]["pp_rank"]) for r in rows) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for row in rows:
        planned, measured = row["planned"], row["rank"]
        assert measured["optimizer"] > 0
        for part in ("weights", "grads", "optimizer"):
            assert planned[part] == measured[part], (part, measured)
    _check_activations(rows)


@pytest.mark.distributed
def test_dp2_distributed_adam_bf16_shards_optimizer_state(tmp_path):
    rows = _measure(tmp_path, "configs/tiny-cpu/sft.yaml", 2, ["parallel.use_distributed_optimizer=true"])
    assert sorted(r["rank"]["dp_rank"] for r in rows) == [0, 1]
    for row in rows:
        planned, measured = row["planned"], row["rank"]
        assert planned["weights"] == measured["weights"] and planned["grads"] == measured["grads"]
        # Each rank's shard ends on Megatron's bucket boundaries; together they hold the whole state.
        assert abs(planned["optimizer"] - measured["optimizer"]) <= 0.01 * planned["optimizer"]
    assert sum(r["rank"]["optimizer"] for r in rows) == 2 * rows[0]["planned"]["optimizer"]
    _check_activations(rows)


@pytest.mark.distributed
def test_packed_plan_bounds_the_run(tmp_path):
    rows = _measure(tmp_path, "configs/tiny-cpu/step_dpo.yaml", 1, ["data.packing=trees"])
    for row in rows:
        planned, measured = row["planned"], row["rank"]
        assert planned["weights"] == measured["weights"] and planned["grads"] == measured["grads"]
        print(f"\npacked bins: activations+logits planned {planned['activations+logits'] / 2**20:.2f} MiB (bound), "
              f"saved-for-backward peak {measured['activations_saved_peak'] / 2**20:.2f} MiB")
        assert planned["activations+logits"] >= measured["activations_saved_peak"]
