"""bf16 training end to end on the CPU: every parameter in bf16 (megatron's local norms included),
checkpoints saved with the bf16 optimizer's fp32 main weights, and the checkpoint exports to HF."""

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "sppd_megatron", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_bf16_step_dpo_checkpoints_and_exports(tmp_path):
    out = tmp_path / "run"
    _cli("train", "configs/tiny-cpu/step_dpo.yaml", f"output_dir={out}", "precision.params_dtype=bf16",
         "schedule.train_steps=2", "optim.optimizer=adamw", "logging.progress=false", "logging.tensorboard=false")
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(l == l for l in losses)
    assert json.loads((out / "runtime.json").read_text())["params_dtype"] == "bfloat16"
    ckpt = out / "checkpoints" / "iter_0000002"
    assert (ckpt / "optimizer" / "metadata.json").is_file()
    _cli("convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"))
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}
    assert dtypes == {"torch.bfloat16"}
