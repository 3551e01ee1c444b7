"""The GPU path end to end, in one command: ``./run test-gpu`` (a summary table at the end).

1. HF checkpoints (tiny Llama and Qwen2) into Megatron under the local and the TransformerEngine layer
   specs, fp32 and bf16: next-token log-probs against transformers on the same device.
2. Five step-DPO steps on a repeated batch for each precision (local fp32 / bf16, TE bf16 / FP8),
   tree-packed (FlexAttention on the GPU): finite and decreasing; GPU fp32 against the same run on
   the CPU; tree-packed against padded; TE bf16 against local bf16.
3. The trained checkpoints exported to HF reload in transformers with the trainer's log-probs.
4. Tree sampling on the GPU with the embedded transformers engine, and with vLLM and SGLang where
   they import: stored log-probs against the trainer's teacher-forced log-probs (Megatron, fp32).
5. SGLang weight sync in memory, then generation equal to an engine started from the export.
6. The main job, ``demo --quick``, with its trainer on the GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpu_suite import DEVICE, REPO, Timer, cli, fp8_error, import_error, metrics, needs_gpu, not_run, record, te_error

pytestmark = needs_gpu

FAMILIES = ("llama", "qwen2")
LOGIT_LIMIT = {"fp32": 1e-4, "bf16": 5e-2}
TRAIN_RUNS = {
    # name: (params_dtype, transformer_impl, fp8); tree-packed batches (the default) unless "padded"
    "local fp32": ("fp32", "local", "none"),
    "local fp32 padded": ("fp32", "local", "none"),
    "local bf16": ("bf16", "local", "none"),
    "TE bf16": ("bf16", "transformer_engine", "none"),
    "TE fp8 (hybrid, delayed)": ("bf16", "transformer_engine", "hybrid"),
}
QUESTIONS = [
    {"question": "Tom has 4 apples and buys 3 more. How many apples?", "answer": "4+3=7\n#### 7"},
    {"question": "What is 6 times 7?", "answer": "6*7=42\n#### 42"},
    {"question": "Ann had 9 pens and gave away 5. How many are left?", "answer": "9-5=4\n#### 4"},
    {"question": "A box holds 3 rows of 5 eggs. How many eggs?", "answer": "3*5=15\n#### 15"},
]


# --- shared set-up ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    from sppd_megatron.models.tiny import save_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("hf")
    return {f: save_tiny_hf_checkpoint(root / f, family=f, seed=3) for f in FAMILIES}


@pytest.fixture(scope="module")
def megatron():
    """Megatron's process groups for this process (one rank, NCCL on the GPU)."""
    from sppd_megatron.parallel.state import ParallelConfig, destroy, initialize

    initialize(ParallelConfig(), seed=0)
    yield
    destroy()


def build_loaded(cfg, impl: str, dtype: str, hf_dir: Path | None = None, ckpt: Path | None = None):
    from sppd_megatron.conversion.hf_io import HFTensorReader
    from sppd_megatron.conversion.mapping import load_hf_into_model
    from sppd_megatron.conversion.mcore_checkpoint import load_model_checkpoint
    from sppd_megatron.models.builder import PrecisionConfig, build_gpt_model

    model = build_gpt_model(cfg, PrecisionConfig(params_dtype=dtype, transformer_impl=impl)).eval()
    if hf_dir is not None:
        with HFTensorReader(hf_dir) as reader:
            load_hf_into_model(model, reader.get, cfg)
    else:
        load_model_checkpoint(model, ckpt, cfg)
    return model


def megatron_logprobs(model, cfg, ids: torch.Tensor) -> torch.Tensor:
    """The trainer's log p(ids[:, t+1] | ids[:, :t+1]) for every position, fp32 [b, s-1]."""
    from sppd_megatron.training.logprobs import token_logprobs

    ids = ids.to(DEVICE)
    pos = torch.arange(ids.shape[1], device=DEVICE).expand_as(ids)
    with torch.no_grad():
        logits = model(ids, pos, None)
        return token_logprobs(logits[:, :-1].contiguous(), ids[:, 1:], cfg.vocab_size)


def hf_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    ids = ids.to(DEVICE)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def sample_ids(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(4, vocab_size, (2, 48), generator=g)


# --- 1. conversion logits -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_checkpoint_logprobs_match_transformers(megatron, tiny_hf, family, impl, dtype):
    from transformers import AutoModelForCausalLM

    from sppd_megatron.models.config import model_config_from_hf

    check, config = "HF -> Megatron log-probs vs transformers", f"{family}, {impl}, {dtype}"
    if impl == "transformer_engine" and te_error():
        not_run(check, config, f"TransformerEngine: {te_error()}")
    cfg = model_config_from_hf(tiny_hf[family])
    model = build_loaded(cfg, impl, dtype, hf_dir=tiny_hf[family])
    ids = sample_ids(cfg.vocab_size)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_hf[family]), dtype=torch.float32).to(DEVICE).eval()
    diff = (megatron_logprobs(model, cfg, ids) - hf_logprobs(hf, ids)).abs().max().item()
    limit = LOGIT_LIMIT[dtype]
    record(check, config, f"max abs diff {diff:.2e} (transformers fp32)", f"<= {limit:g}", diff <= limit)
    assert diff <= limit


# --- 2. training --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repeated_batch(tmp_path_factory) -> Path:
    """Four step pairs = one global batch, so every step trains on the same batch."""
    lines = (REPO / "configs" / "tiny-cpu" / "data" / "step_pairs.jsonl").read_text().splitlines()[:4]
    path = tmp_path_factory.mktemp("data") / "step_pairs_4.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


_runs: dict[str, Path] = {}


def train_run(name: str, root: Path, data: Path, on_cpu: bool = False) -> Path:
    """Five step-DPO steps under TRAIN_RUNS[name] (cached per session); returns the output directory."""
    key = name + (" (cpu)" if on_cpu else "")
    if key in _runs:
        return _runs[key]
    dtype, impl, fp8 = TRAIN_RUNS[name]
    out = root / key.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
    cli("train", "configs/tiny-cpu/step_dpo.yaml", f"output_dir={out}", f"data.train_file={data}",
        "data.shuffle=false", "schedule.train_steps=5", "schedule.global_batch_size=4", "schedule.micro_batch_size=2",
        "optim.optimizer=adamw", "optim.lr=1.0e-3", "optim.lr_decay_style=constant", "logging.progress=false",
        "logging.tensorboard=false", f"precision.params_dtype={dtype}", f"precision.transformer_impl={impl}",
        f"precision.fp8={fp8}", f"data.packing={'none' if name.endswith('padded') else 'trees'}",
        env={"CUDA_VISIBLE_DEVICES": ""} if on_cpu else None)
    _runs[key] = out
    return out


@pytest.fixture(scope="module")
def train_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


def _skip_unavailable(check: str, name: str) -> None:
    _, impl, fp8 = TRAIN_RUNS[name]
    err = fp8_error() if fp8 != "none" else te_error() if impl == "transformer_engine" else None
    if err:
        not_run(check, name, f"TransformerEngine: {err}")


@pytest.mark.parametrize("name", list(TRAIN_RUNS))
def test_five_step_dpo_steps_decrease_the_loss(train_root, repeated_batch, name):
    check = "5 step-DPO steps, repeated batch"
    _skip_unavailable(check, name)
    with Timer() as t:
        out = train_run(name, train_root, repeated_batch)
    rows = metrics(out)
    runtime = json.loads((out / "runtime.json").read_text())
    losses = [r["loss"] for r in rows]
    ok = len(losses) == 5 and all(map(lambda x: x == x and abs(x) != float("inf"), losses)) and losses[-1] < losses[0]
    peak = rows[-1].get("max_memory_allocated_gib")
    record(check, name, f"loss {losses[0]:.4f} -> {losses[-1]:.4f} on {runtime['device']} "
           f"({runtime['transformer_impl']}{', peak %.3f GiB' % peak if peak is not None else ''}, {t.seconds:.0f} s)",
           "finite, decreasing", ok)
    assert runtime["device"].startswith(DEVICE)
    assert ok, losses


def test_gpu_losses_equal_the_cpu_run(train_root, repeated_batch):
    check, config = "GPU vs CPU, same 5 steps", "local fp32"
    if DEVICE != "cuda":
        not_run(check, config, "this is the CPU")
    gpu = [r["loss"] for r in metrics(train_run("local fp32", train_root, repeated_batch))]
    cpu = [r["loss"] for r in metrics(train_run("local fp32", train_root, repeated_batch, on_cpu=True))]
    rel = max(abs(a - b) / abs(b) for a, b in zip(gpu, cpu))
    record(check, config, f"max relative loss difference {rel:.1e}", "<= 1e-3", rel <= 1e-3)
    assert rel <= 1e-3


def test_tree_packed_training_equals_padded(train_root, repeated_batch):
    check = "tree-packed vs padded, same 5 steps"
    config = f"local fp32, {'FlexAttention' if DEVICE == 'cuda' else 'dense'} tree masks"
    packed = metrics(train_run("local fp32", train_root, repeated_batch))
    padded = metrics(train_run("local fp32 padded", train_root, repeated_batch))
    rel = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(packed, padded))
    grad = max(abs(a["grad_norm"] - b["grad_norm"]) / abs(b["grad_norm"]) for a, b in zip(packed, padded))
    ms = lambda rows: 1000 * sorted(r["step_time_s"] for r in rows[1:])[len(rows[1:]) // 2]  # noqa: E731
    record(check, config, f"max relative difference loss {rel:.1e}, grad norm {grad:.1e}; median step "
           f"{ms(packed):.0f} ms packed, {ms(padded):.0f} ms padded", "<= 1e-4", rel <= 1e-4 and grad <= 1e-4)
    assert rel <= 1e-4 and grad <= 1e-4


def test_te_bf16_tracks_local_bf16(train_root, repeated_batch):
    check, config = "TE vs local layers, same 5 steps", "bf16"
    _skip_unavailable(check, "TE bf16")
    te = [r["loss"] for r in metrics(train_run("TE bf16", train_root, repeated_batch))]
    local = [r["loss"] for r in metrics(train_run("local bf16", train_root, repeated_batch))]
    diff = max(abs(a - b) for a, b in zip(te, local))
    record(check, config, f"max abs loss difference {diff:.1e}", "<= 2e-2", diff <= 2e-2)
    assert diff <= 2e-2


# --- 3. export --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["local fp32", "local bf16", "TE bf16"])
def test_trained_checkpoint_exports_to_transformers(megatron, train_root, repeated_batch, tmp_path, name):
    from transformers import AutoModelForCausalLM

    from sppd_megatron.conversion.mcore_checkpoint import read_checkpoint_model_config
    from sppd_megatron.training.checkpoint import iter_dir

    check = "trained checkpoint -> HF -> transformers"
    _skip_unavailable(check, name)
    dtype, impl, _ = TRAIN_RUNS[name]
    ckpt = iter_dir(train_run(name, train_root, repeated_batch) / "checkpoints", 5)
    cli("convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"))
    cfg = read_checkpoint_model_config(ckpt)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch_dtype).to(DEVICE).eval()
    ids = sample_ids(cfg.vocab_size)
    diff = (megatron_logprobs(build_loaded(cfg, impl, dtype, ckpt=ckpt), cfg, ids) - hf_logprobs(hf, ids)).abs().max().item()
    limit = LOGIT_LIMIT[dtype]
    record(check, name, f"max abs log-prob diff {diff:.2e}", f"<= {limit:g}", diff <= limit)
    assert diff <= limit


# --- 4. rollout engines ---------------------------------------------------------------------------


def _sample(tmp: Path, hf_dir: Path, engine: dict) -> tuple[list, dict]:
    from sppd_megatron.records import Tree, read_jsonl

    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    config = {
        "input": str(prompts), "output_dir": str(tmp / "trees"), "model": str(hf_dir), "engine": engine,
        "template": {"system_prompt": "", "use_chat_template": False, "plain_format": "Q: {question}\nA: "},
        "K": 8, "C": 2, "max_depth": 4, "max_step_tokens": 12, "max_total_tokens": 48, "seed": 0,
        "questions_per_round": 4, "progress": False,
    }
    (tmp / "sample.yaml").write_text(json.dumps(config))
    cli("sample", str(tmp / "sample.yaml"))
    trees = [t for f in sorted((tmp / "trees").glob("trees-*.jsonl")) for t in read_jsonl(f, Tree)]
    manifest = json.loads((tmp / "trees" / "sample_manifest.json").read_text())
    return trees, manifest


def _teacher_forcing_gap(trees, model, cfg) -> tuple[float, float, int]:
    """(mean, max) |engine log-prob - trainer log-prob| over every sampled token, and the token count."""
    diffs = []
    for tree in trees:
        root = tree.nodes[0]
        for leaf in tree.leaves():
            path = tree.path(leaf.node_id)
            steps = [t for n in path for t in n.token_ids]
            ids = torch.tensor([root.token_ids + steps])
            ours = megatron_logprobs(model, cfg, ids)[0, len(root.token_ids) - 1:].cpu()
            stored = torch.tensor([lp for n in path for lp in n.token_logprobs])
            diffs.append((ours - stored).abs())
    gap = torch.cat(diffs)
    return gap.mean().item(), gap.max().item(), gap.numel()


def _cache_figure(manifest: dict) -> str:
    found = {k: v for k, v in _flatten(manifest).items() if "cache" in k and not k.startswith("config.")}
    return ", ".join(f"{k} {v}" for k, v in found.items()) or "no cache statistics reported"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out


ENGINES = {
    "transformers": {"name": "transformers", "device": DEVICE, "dtype": "float32"},
    "vllm": {"name": "vllm", "dtype": "float32", "mem_fraction": 0.3, "extra": {"enforce_eager": True}},
    "sglang": {"name": "sglang", "dtype": "float32", "mem_fraction": 0.3},
}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_tree_sampling_logprobs_match_the_trainer(megatron, tiny_hf, tmp_path, engine):
    from sppd_megatron.models.config import model_config_from_hf

    check, config = "tree sampling: engine vs trainer log-probs", f"{engine}, tiny llama, fp32"
    if engine != "transformers":
        err = "needs CUDA" if DEVICE != "cuda" else import_error(engine)
        if err:
            not_run(check, config, f"{engine}: {err}")
    with Timer() as t:
        trees, manifest = _sample(tmp_path, tiny_hf["llama"], ENGINES[engine])
    assert len(trees) == len(QUESTIONS)
    cfg = model_config_from_hf(tiny_hf["llama"])
    mean, worst, n = _teacher_forcing_gap(trees, build_loaded(cfg, "local", "fp32", hf_dir=tiny_hf["llama"]), cfg)
    record(check, config, f"{n} tokens: mean {mean:.1e}, max {worst:.1e}; {_cache_figure(manifest)}; {t.seconds:.0f} s",
           "max <= 1e-3", worst <= 1e-3)
    assert worst <= 1e-3


def test_sglang_weight_sync_equals_an_engine_from_the_export(megatron, train_root, repeated_batch, tmp_path):
    check, config = "SGLang in-memory weight sync", "trained local bf16 -> engine"
    err = "needs CUDA" if DEVICE != "cuda" else import_error("sglang")
    if err:
        not_run(check, config, f"sglang: {err}")
    import sglang

    from sppd_megatron.conversion.mcore_checkpoint import read_checkpoint_model_config
    from sppd_megatron.conversion.weight_sync import export_hf_state_dict, push_to_sglang
    from sppd_megatron.training.checkpoint import iter_dir

    ckpt = iter_dir(train_run("local bf16", train_root, repeated_batch) / "checkpoints", 5)
    cfg = read_checkpoint_model_config(ckpt)
    cli("convert", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "trained"))
    initial = tmp_path / "initial"
    from sppd_megatron.models.tiny import save_tiny_hf_checkpoint

    save_tiny_hf_checkpoint(initial, family="llama", seed=11)  # same architecture, other weights
    prompts = [q["question"] for q in QUESTIONS]
    greedy = {"temperature": 0.0, "max_new_tokens": 24}
    synced = sglang.Engine(model_path=str(initial), mem_fraction_static=0.3, dtype="bfloat16")
    try:
        push_to_sglang(synced, export_hf_state_dict(build_loaded(cfg, "local", "bf16", ckpt=ckpt), cfg))
        after_sync = [o["text"] for o in synced.generate(prompts, greedy)]
    finally:
        synced.shutdown()
    fresh = sglang.Engine(model_path=str(tmp_path / "trained"), mem_fraction_static=0.3, dtype="bfloat16")
    try:
        exported = [o["text"] for o in fresh.generate(prompts, greedy)]
    finally:
        fresh.shutdown()
    same = sum(a == b for a, b in zip(after_sync, exported))
    record(check, config, f"{same}/{len(prompts)} greedy generations equal", "all equal", same == len(prompts))
    assert after_sync == exported


# --- 6. the main job ------------------------------------------------------------------------------


def test_demo_quick_trains_on_the_gpu(tmp_path):
    check, config = "demo --quick (whole loop)", f"trainer on {DEVICE}"
    out = tmp_path / "demo"
    with Timer() as t:
        cli("demo", "--quick", "--out", str(out), timeout=900)
    devices = sorted({json.loads(p.read_text())["device"] for p in out.rglob("runtime.json")})
    trained = len(list(out.rglob("runtime.json")))
    rows = [l for l in (out / "report.md").read_text().splitlines() if l.startswith("| ")]
    ok = bool(devices) and all(d.startswith(DEVICE) for d in devices)
    record(check, config, f"exit 0 in {t.seconds:.0f} s; {trained} training stages on {devices}; report with "
           f"{len(rows)} table rows", f"every stage on {DEVICE}", ok)
    assert ok, devices
