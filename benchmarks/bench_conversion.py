"""Conversion speed and peak memory on the biggest model this machine handles comfortably.

    .venv/bin/python benchmarks/bench_conversion.py [--hidden 2048 --layers 16 --ffn 8192] [--keep DIR]

1. Writes a random Llama (default ~1.1B parameters, bf16, GQA 32/8 heads) as sharded safetensors,
   tensor by tensor (no transformers model in memory).
2. Runs ``convert hf-to-mcore`` and ``convert mcore-to-hf`` as subprocesses and samples their memory
   every 20 ms: peak RSS, and peak anonymous RSS (RssAnon: memory the process holds itself, without
   the page cache of the memory-mapped safetensors/checkpoint files, which the kernel can drop).
3. Times a dist-checkpoint save of a tiny model with megatron's default torch_dist writer and with
   the in-process writer used here (mcore_checkpoint / sync_writer).
Printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from sppd_megatron.conversion.hf_io import ShardedSafetensorsWriter


def write_random_llama(out: Path, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int, vocab: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    writer = ShardedSafetensorsWriter(out, max_shard_bytes=1 << 30)
    total = 0

    def add(name, t):
        nonlocal total
        total += t.numel()
        writer.add(name, t)

    add("model.embed_tokens.weight", rnd(vocab, hidden))
    for i in range(layers):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        add(p + "self_attn.q_proj.weight", rnd(heads * head_dim, hidden))
        add(p + "self_attn.k_proj.weight", rnd(kv_heads * head_dim, hidden))
        add(p + "self_attn.v_proj.weight", rnd(kv_heads * head_dim, hidden))
        add(p + "self_attn.o_proj.weight", rnd(hidden, heads * head_dim))
        add(p + "post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        add(p + "mlp.gate_proj.weight", rnd(ffn, hidden))
        add(p + "mlp.up_proj.weight", rnd(ffn, hidden))
        add(p + "mlp.down_proj.weight", rnd(hidden, ffn))
    add("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    add("lm_head.weight", rnd(vocab, hidden))
    writer.finish()
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "tie_word_embeddings": False,
        "hidden_act": "silu", "dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return total


def _rss_tree_kb(proc) -> tuple[int, int]:
    """(RSS, RssAnon) in kB summed over a process and its children."""
    import psutil

    rss = anon = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss += int(fields.get("VmRSS", "0 kB").split()[0])
        anon += int(fields.get("RssAnon", "0 kB").split()[0])
    return rss, anon


def run_measured(argv: list[str]) -> dict:
    import psutil

    start = time.perf_counter()
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proc = psutil.Process(child.pid)
    peak = [0, 0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss, anon = _rss_tree_kb(proc)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = child.communicate()
    done.set()
    t.join()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss_gib": peak[0] / 2**20, "peak_anon_gib": peak[1] / 2**20}


def bench_save_writers() -> dict:
    """Save the same tiny model's sharded state dict with megatron's default writer and ours."""
    from megatron.core import dist_checkpointing

    from sppd_megatron.conversion.mcore_checkpoint import sync_save_strategy
    from sppd_megatron.models.builder import PrecisionConfig, build_gpt_model
    from sppd_megatron.models.config import ModelConfig
    from sppd_megatron.parallel.state import ParallelConfig, destroy, initialize

    initialize(ParallelConfig(), seed=0)
    model = build_gpt_model(ModelConfig(), PrecisionConfig())
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, strategy in (("megatron_default", None), ("sppd_sync", sync_save_strategy())):
            times = []
            for i in range(2):
                d = Path(tmp) / f"{name}{i}"
                d.mkdir()
                t = time.perf_counter()
                dist_checkpointing.save(model.sharded_state_dict(), str(d), sharded_strategy=strategy)
                times.append(time.perf_counter() - t)
            result[name] = {"first_save_s": times[0], "second_save_s": times[1]}
    destroy()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--keep", default=None, help="work directory to keep (default: a temporary one)")
    args = ap.parse_args()

    print("save writers (tiny model, dist checkpoint):", json.dumps(bench_save_writers(), indent=2), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        t = time.perf_counter()
        n = write_random_llama(root / "hf", args.hidden, args.layers, args.ffn, args.heads, args.kv_heads, args.vocab)
        size_gib = n * 2 / 2**30
        print(f"random llama: {n / 1e9:.2f}B parameters, {size_gib:.2f} GiB bf16, written in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        cli = [sys.executable, "-m", "sppd_megatron.cli", "convert"]
        to_mcore = run_measured(cli + ["hf-to-mcore", "--hf", str(root / "hf"), "--out", str(root / "mcore"),
                                       "--overwrite"])
        print(f"hf-to-mcore: {json.dumps(to_mcore)}", flush=True)
        to_hf = run_measured(cli + ["mcore-to-hf", "--ckpt", str(root / "mcore"), "--out", str(root / "back"),
                                    "--max-shard-size", "1GB", "--overwrite"])
        print(f"mcore-to-hf: {json.dumps(to_hf)}", flush=True)
        print(f"peak anonymous memory / model size: hf-to-mcore {to_mcore['peak_anon_gib'] / size_gib:.2f}, "
              f"mcore-to-hf {to_hf['peak_anon_gib'] / size_gib:.2f}")


if __name__ == "__main__":  # dist-checkpoint writers re-import __main__ (spawn): keep the guard
    main()
