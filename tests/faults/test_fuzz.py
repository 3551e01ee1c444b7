"""Bad input, seeded: every file the tools read, damaged every way the fuzzer knows, handed to the tool.

Each case must end as a clean error (exit status 2, one line naming the file, and the line where the
file has lines) or, where a tool is built to go on past a bad record, as a recovery that accounts
for it (``score`` and ``pairs`` list it in rejects.jsonl with file and line; a resumed appender cuts
a half-written last line; a damaged reference log-prob cache is recomputed from the initial policy).
Never a traceback, a hang (every case runs under pytest's timeout) or silent acceptance.

Verbs without Megatron run in this process (``main(argv)``); ``train`` and ``convert`` cases run
together in one worker process (tests/faults/cli_worker.py).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from faultlib import clean_error, run_in_one_process
from fuzz import LINE_CORRUPTIONS, TEN_MB, Fields, corrupt_binary, corrupt_json_object, corrupt_jsonl

ROOT = Path(__file__).resolve().parents[2]
SEED = 16
TREE = Fields(required=["id", "question", "nodes", "template", "prompt"], strings=["question", "prompt", "policy"],
              numbers=[], lists=["nodes"])
PAIR = Fields(required=["prompt", "chosen", "rejected"], strings=["prompt", "chosen", "rejected"],
              numbers=["chosen_value", "rejected_value", "depth"], lists=[])
PREDICTION = Fields(required=["id", "benchmark", "generations", "answers", "correct"], strings=["id", "benchmark"],
                    numbers=[], lists=["generations", "correct"])
PROMPT = Fields(required=["question", "answer"], strings=["question"], numbers=["answer"], extra_ok=True)


def _cases(fields: Fields, exclude: tuple[str, ...] = ()) -> list[str]:
    return [c for c in LINE_CORRUPTIONS if c not in exclude and not (c == "extra_field" and fields.extra_ok)
            and not (c in ("nan", "huge") and not fields.numbers)]


def _one_line(capsys, rc: int, prog: str, *needles: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    clean_error(err, prog, *needles)


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}:" if line else str(path)


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i}+1?", "answer": str(i + 1)}) + "\n" for i in range(4)))
    return path


# --- configs and overrides (sample) ----------------------------------------------------------------


def test_configs_and_overrides(tmp_path, capsys, tally):
    from sppd_megatron.sampling.cli import main as sample

    rng = random.Random(SEED)
    good = {"model": "tiny:llama", "tokenizer": "builtin:char", "K": 4, "C": 2, "temperature": 1.0,
            "engine": {"name": "transformers", "num_threads": 1}, "progress": False,
            "input": str(_prompts(tmp_path)), "output_dir": str(tmp_path / "never")}
    fields = Fields(required=["input", "output_dir"], strings=["model", "tokenizer"], numbers=["K", "temperature"],
                    lists=[])
    for how in LINE_CORRUPTIONS:
        path = tmp_path / f"{how}.yaml"
        text = "\n".join(f"{k}: {json.dumps(v)}" for k, v in good.items()).encode()
        if how == "truncate":  # output_dir (required) is the last line: a cut anywhere before it loses it
            damaged = text[: rng.randrange(1, text.rindex(b"\noutput_dir"))]
        elif how in ("wrong_type", "missing_field", "extra_field", "nan", "huge"):
            damaged = corrupt_json_object(json.dumps(good).encode(), how, fields, rng)
        else:
            damaged = corrupt_json_object(text, how, fields, rng) if how != "long_line" else text + b"\n" + b"x" * TEN_MB
        path.write_bytes(damaged)
        _one_line(capsys, sample([str(path)]), "sppd-megatron sample", str(path))
        tally.corruption("config (YAML)", "clean error")
    assert not (tmp_path / "never").exists()

    config = tmp_path / "good.yaml"
    config.write_text(json.dumps(good))
    for override, needle in [("K", "expected dotted.key=value"), ("=4", "empty key"), ("K=[1,", "not a YAML value"),
                             ("temperature=.nan", "not a finite number"), ("temperature=1e999", "not a finite"),
                             ("K=99999999999999999999999", "out of range"), ("engine=5", "expected a mapping"),
                             ("template.zz=1", "unknown key"), ("a..b=1", "empty key"),
                             ("K=!!python/object/apply:os.system [echo]", "not a YAML value"),
                             (f"model={'y' * TEN_MB}", "characters)")]:
        rc = sample([str(config), override])
        _one_line(capsys, rc, "sppd-megatron sample", needle)
        tally.corruption("overrides", "clean error")


# --- prompts (sample) -------------------------------------------------------------------------------


def test_prompts(tmp_path, capsys, tally):
    from sppd_megatron.sampling.cli import main as sample

    rng = random.Random(SEED + 1)
    rows = [{"question": f"What is {i} + {i}?", "answer": 2 * i, "id": f"q{i}"} for i in range(4)]
    data = "\n".join(json.dumps(r) for r in rows).encode() + b"\n"
    for how in _cases(PROMPT):
        path = tmp_path / f"{how}.jsonl"
        damaged, line = corrupt_jsonl(data, how, PROMPT, rng)
        path.write_bytes(damaged)
        rc = sample([str(ROOT / "configs/tiny-cpu/sample.yaml"), f"input={path}", f"output_dir={tmp_path / how}",
                     "progress=false"])
        _one_line(capsys, rc, "sppd-megatron sample", _where(path, line))
        tally.corruption("prompts", "clean error")


# --- trees (score) and scored trees (pairs): bad records go to rejects.jsonl ------------------------


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, Path]:
    """A few sampled trees of the tiny random model and the same trees scored."""
    from sppd_megatron.sampling.cli import main as sample
    from sppd_megatron.scoring.cli import main as score

    root = tmp_path_factory.mktemp("fuzz-trees")
    prompts = _prompts(root)
    assert sample([str(ROOT / "configs/tiny-cpu/sample.yaml"), f"input={prompts}", f"output_dir={root / 'trees'}",
                   "K=3", "max_depth=3", "num_questions=4", "progress=false"]) == 0
    assert score([str(ROOT / "configs/tiny-cpu/score.yaml"), f"input_dir={root / 'trees'}",
                  f"output_dir={root / 'scored'}", "scorers=[tree]", "progress=false"]) == 0
    return root / "trees" / "trees-00000.jsonl", root / "scored" / "trees-00000.jsonl"


def _rejected(rejects: Path, path: Path, line: int) -> bool:
    rows = [json.loads(r) for r in rejects.read_text().splitlines()]
    return any(r["file"] == str(path) and r["line"] == line for r in rows)


@pytest.mark.parametrize("verb", ["score", "pairs"])
def test_trees_and_scored_trees(trees, verb, tmp_path, capsys, tally):
    from sppd_megatron.pairs.cli import main as pairs
    from sppd_megatron.scoring.cli import main as score

    rng = random.Random(SEED + (2 if verb == "score" else 3))
    source = trees[0] if verb == "score" else trees[1]
    for how in LINE_CORRUPTIONS:
        data = source.read_bytes()
        if how in ("nan", "huge"):  # inside a node: a step's mean log-prob, or for pairs its value
            lines = data.split(b"\n")
            line = rng.randrange(len([x for x in lines if x.strip()])) + 1
            record = json.loads(lines[line - 1])
            bad = float("nan") if how == "nan" else float("inf")
            if verb == "pairs":
                record["nodes"][-1]["values"] = {"tree": bad}
            else:
                record["nodes"][-1]["mean_logprob"] = bad
            lines[line - 1] = json.dumps(record, allow_nan=True).replace("Infinity", "1e999").encode()
            damaged = b"\n".join(lines)
        else:
            damaged, line = corrupt_jsonl(data, how, TREE, rng)
        shards = tmp_path / how
        shards.mkdir()
        path = shards / "trees-00000.jsonl"
        path.write_bytes(damaged)
        out = tmp_path / f"{how}-out"
        if verb == "score":
            rc = score([str(ROOT / "configs/tiny-cpu/score.yaml"), f"input_dir={shards}", f"output_dir={out}",
                        "scorers=[tree]", "progress=false"])
        else:
            rc = pairs([str(ROOT / "configs/tiny-cpu/pairs.yaml"), f"input_dir={shards}", f"output_dir={out}",
                        "progress=false"])
        if line is None:  # an empty input is an error, not zero results
            _one_line(capsys, rc, f"sppd-megatron {verb}", str(shards))
            tally.corruption("trees" if verb == "score" else "scored trees", "clean error")
            continue
        err = capsys.readouterr().err
        assert rc == 0 and "Traceback" not in err, err[-2000:]
        assert _rejected(out / "rejects.jsonl", path, line), (how, (out / "rejects.jsonl").read_text()[:2000])
        tally.corruption("trees" if verb == "score" else "scored trees", "recovered")


# --- predictions (eval resuming) and an output shard (sample resuming) -----------------------------


@pytest.fixture(scope="module")
def finished_eval(tmp_path_factory) -> tuple[Path, list[str]]:
    from sppd_megatron.evaluation.cli import main as evaluate

    root = tmp_path_factory.mktemp("fuzz-eval")
    bench = _prompts(root)
    args = ["--model", "tiny:llama", "--bench", f"toy={bench}", "--modes", "greedy,maj@2", "--max-new-tokens", "8",
            "--no-progress", "questions_per_batch=2"]
    assert evaluate([*args, "--out", str(root / "eval")]) == 0
    return root / "eval", args


def test_predictions(finished_eval, tmp_path, capsys, tally):
    from sppd_megatron.evaluation.cli import main as evaluate

    rng = random.Random(SEED + 4)
    done, args = finished_eval
    reference = (done / "summary.json").read_text()
    for how in _cases(PREDICTION):
        out = tmp_path / how
        shutil.copytree(done, out)
        path = out / "predictions.jsonl"
        damaged, line = corrupt_jsonl(path.read_bytes(), how, PREDICTION, rng)
        path.write_bytes(damaged)
        rc = evaluate([*args, "--out", str(out)])
        if how in ("truncate", "empty"):  # a half-written last line is cut, an empty file restarts: redone
            err = capsys.readouterr().err
            assert rc == 0 and "Traceback" not in err, err[-2000:]
            assert (out / "summary.json").read_text() == reference
            tally.corruption("predictions", "recovered")
            continue
        _one_line(capsys, rc, "sppd-megatron eval", _where(path, line))
        tally.corruption("predictions", "clean error")
    capsys.readouterr()


# --- tokenizers and HF model directories (sample loads both) ----------------------------------------


def test_tokenizers(tmp_path, capsys, tally):
    from sppd_megatron.sampling.cli import main as sample
    from sppd_megatron.tokenization import build_char_tokenizer

    rng = random.Random(SEED + 5)
    good = tmp_path / "good"
    build_char_tokenizer().save_pretrained(good)
    prompts = _prompts(tmp_path)
    files = {"tokenizer.json": Fields(required=["model", "pre_tokenizer"], strings=["version"], lists=["added_tokens"]),
             "tokenizer_config.json": Fields(required=[], strings=["eos_token", "tokenizer_class"], lists=[])}
    for name, fields in files.items():
        for how in ("truncate", "byte_flip", "invalid_utf8", "empty", "long_line", "wrong_type",
                    *(("missing_field",) if fields.required else ())):
            tok = tmp_path / f"{name}-{how}"
            shutil.copytree(good, tok)
            (tok / name).write_bytes(corrupt_json_object((good / name).read_bytes(), how, fields, rng))
            rc = sample([str(ROOT / "configs/tiny-cpu/sample.yaml"), f"input={prompts}", f"tokenizer={tok}",
                         f"output_dir={tmp_path / 'out' / name / how}", "progress=false"])
            _one_line(capsys, rc, "sppd-megatron sample", str(tok))
            tally.corruption("tokenizers", "clean error")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    from sppd_megatron.models.tiny import save_tiny_hf_checkpoint

    return Path(save_tiny_hf_checkpoint(tmp_path_factory.mktemp("fuzz-hf") / "hf", family="llama", seed=1))


def hf_corruptions(good: Path, root: Path, rng: random.Random) -> list[tuple[str, Path, str]]:
    """Damaged copies of an HF directory: ``(what, directory, file the error must name)``."""
    import torch
    from safetensors.torch import load_file, save_file

    out = []
    config_fields = Fields(required=["hidden_size", "num_hidden_layers", "vocab_size"], strings=["model_type"],
                           numbers=["hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"])
    for how in LINE_CORRUPTIONS:
        d = root / f"config-{how}"
        shutil.copytree(good, d)
        (d / "config.json").write_bytes(corrupt_json_object((good / "config.json").read_bytes(), how, config_fields, rng))
        if how == "extra_field":  # config.json takes any extra keys (every model's has its own): not a corruption
            continue
        out.append((f"config.json {how}", d, str(d / "config.json") if how != "missing_field" else str(d)))
    tensors = load_file(str(good / "model.safetensors"))
    for how in ("truncate", "byte_flip", "empty", "wrong_shape", "missing_tensor"):
        d = root / f"weights-{how}"
        shutil.copytree(good, d)
        target = d / "model.safetensors"
        if how in ("wrong_shape", "missing_tensor"):
            name = rng.choice(sorted(tensors))
            changed = dict(tensors)
            if how == "wrong_shape":
                changed[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
            else:
                del changed[name]
            save_file(changed, str(target), metadata={"format": "pt"})
        else:
            target.write_bytes(corrupt_binary(target.read_bytes(), how, rng, header=8))
        out.append((f"model.safetensors {how}", d, str(d) if how == "missing_tensor" else str(target)))
    return out


def test_hf_model_directories_for_the_rollout_engine(tiny_hf, tmp_path, capsys, tally):
    from sppd_megatron.sampling.cli import main as sample

    prompts = _prompts(tmp_path)
    for what, model, names in hf_corruptions(tiny_hf, tmp_path, random.Random(SEED + 6)):
        rc = sample([str(ROOT / "configs/tiny-cpu/sample.yaml"), f"input={prompts}", f"model={model}",
                     "tokenizer=builtin:char", f"output_dir={tmp_path / 'out' / what.replace(' ', '-')}",
                     "progress=false"])
        _one_line(capsys, rc, "sppd-megatron sample", names)
        tally.corruption("HF model directories", "clean error")


# --- training data, reference caches, checkpoints, HF directories (train, convert: one worker) ------

STEP_DPO = ["configs/tiny-cpu/step_dpo.yaml", "schedule.train_steps=1", "logging.progress=false",
            "logging.tensorboard=false"]
REFERENCE_ROW = Fields(required=["index", "ref_logps"], strings=["where"], numbers=["index"], lists=["ref_logps"])
TRAINER_STATE = Fields(required=["step", "scheduler"], strings=[], numbers=["step"], lists=[])
META = Fields(required=["format_version", "model"], strings=["dtype", "source"], numbers=["format_version"])
DIST_META = Fields(required=["sharded_backend"], strings=["sharded_backend"], numbers=["sharded_backend_version"])


@pytest.fixture(scope="module")
def megatron_base(tiny_hf, tmp_path_factory) -> tuple[Path, Path]:
    """A step-DPO run of one step (checkpoint, reference cache) and an hf-to-mcore checkpoint of tiny_hf."""
    root = tmp_path_factory.mktemp("fuzz-megatron")
    results = run_in_one_process([
        {"verb": "train", "argv": [*STEP_DPO, f"output_dir={root / 'trained'}"], "fault": None},
        {"verb": "convert", "argv": ["hf-to-mcore", "--hf", str(tiny_hf), "--out", str(root / "mcore")], "fault": None},
    ], root / "worker")
    assert all(r["rc"] == 0 for r in results), [r["stderr"][-2000:] for r in results]
    return root / "trained", root / "mcore"


def test_training_data_checkpoints_and_hf_directories(megatron_base, tiny_hf, tmp_path, tally):
    trained, mcore = megatron_base
    rng = random.Random(SEED + 7)
    cases: list[tuple[str, dict, str, Path | None]] = []  # (input kind, worker case, needle, file to watch)

    def train_case(kind: str, out: Path, needle: str, argv_extra=(), watch: Path | None = None) -> None:
        cases.append((kind, {"verb": "train", "argv": [*STEP_DPO, f"output_dir={out}", *argv_extra], "fault": None},
                      needle, watch))

    pairs = ROOT / "configs/tiny-cpu/data/step_pairs.jsonl"
    for how in _cases(PAIR):
        path = tmp_path / "pairs" / f"{how}.jsonl"
        path.parent.mkdir(exist_ok=True)
        damaged, line = corrupt_jsonl(pairs.read_bytes(), how, PAIR, rng)
        path.write_bytes(damaged)
        train_case("pair files", tmp_path / "pairs-out" / how, _where(path, line), [f"data.train_file={path}"])

    for how in LINE_CORRUPTIONS:  # the stored reference log-probs (a resumed run reads them)
        out = tmp_path / "reference" / how
        shutil.copytree(trained, out)
        cache = out / "reference_logps.jsonl"
        head, *rows = cache.read_bytes().splitlines()
        if how == "empty":
            damaged = b""
        else:
            broken, line = corrupt_jsonl(b"\n".join(rows) + b"\n", how, REFERENCE_ROW, rng)
            damaged = head + b"\n" + broken
        cache.write_bytes(damaged)
        train_case("reference log-prob caches", out, str(cache), watch=cache)

    def damaged_copy(base: Path, rel: str, how: str, kind: str) -> tuple[Path, Path]:
        copy = tmp_path / kind.replace(" ", "-") / f"{rel.replace('/', '-')}-{how}"
        shutil.copytree(base, copy)
        target = copy / rel
        data = target.read_bytes()
        if rel.endswith(".json"):
            fields = {"trainer_state.json": TRAINER_STATE, "sppd_model.json": META, "metadata.json": DIST_META}
            target.write_bytes(corrupt_json_object(data, how, fields[Path(rel).name], rng))
        elif rel.endswith("latest"):
            target.write_bytes({"truncate": b"", "byte_flip": b"1x", "huge": b"99999999999999", "empty": b""}[how])
        else:  # a flip where the format checks itself (zip and pickle magic); payload flips go unseen (no checksums)
            target.write_bytes(corrupt_binary(data, how, rng, header=4))
        return copy, target

    json_hows = [h for h in LINE_CORRUPTIONS if h not in ("extra_field",)]
    iteration = "checkpoints/iter_0000001"
    for rel, hows in [("checkpoints/latest", ("byte_flip", "huge", "empty")),
                      (f"{iteration}/trainer_state.json", json_hows),
                      (f"{iteration}/optimizer/.metadata", ("truncate", "byte_flip", "empty")),
                      (f"{iteration}/optimizer/common.pt", ("truncate", "byte_flip", "empty"))]:
        for how in hows:  # (SGD without momentum keeps its state in common.pt; its .distcp is empty)
            copy, target = damaged_copy(trained, rel, how, "trainer checkpoints")
            train_case("trainer checkpoints", copy, str(target))

    for rel, hows in [("sppd_model.json", json_hows), ("model/metadata.json", json_hows),
                      ("model/.metadata", ("truncate", "byte_flip", "empty")),
                      ("model/__0_0.distcp", ("truncate", "byte_flip", "empty")),
                      ("model/common.pt", ("truncate", "byte_flip", "empty"))]:
        for how in hows:
            copy, target = damaged_copy(mcore, rel, how, "Megatron checkpoints")
            needle = str(target.parent) if rel.endswith(".distcp") else str(target)
            cases.append(("Megatron checkpoints", {"verb": "convert", "argv": ["mcore-to-hf", "--ckpt", str(copy), "--out",
                          str(copy) + "-hf"], "fault": None}, needle, None))

    for what, directory, needle in hf_corruptions(tiny_hf, tmp_path / "hf", rng):
        cases.append(("HF model directories", {"verb": "convert", "argv": ["hf-to-mcore", "--hf", str(directory),
                      "--out", str(directory) + "-mcore"], "fault": None}, needle, None))

    before = {i: watch.read_bytes() for i, (_, _, _, watch) in enumerate(cases) if watch is not None}
    results = run_in_one_process([case for _, case, _, _ in cases], tmp_path / "worker")
    for i, ((kind, case, needle, watch), result) in enumerate(zip(cases, results)):
        prog = f"sppd-megatron {case['verb']}"
        if watch is not None and result["rc"] == 0:
            # A damaged cache may only be recomputed (from the initial policy, before any checkpoint loads).
            assert watch.read_bytes() != before[i] and "Traceback" not in result["stderr"], (case, result)
            tally.corruption(kind, "recovered")
            continue
        assert result["rc"] == 2, (case["argv"], result["stderr"][-3000:])
        clean_error(result["stderr"], prog, needle, alone=False)
        tally.corruption(kind, "clean error")
