"""The embedded engine: a transformers causal LM, with a shared context prefilled once per round.

Requests with the same context (the C siblings of an expansion) share one prefill: the context
minus its last token goes through the model once, its KV cache is copied to every branch, and all
branches of all contexts decode together in one batch. Contexts of different lengths are
left-padded in the cache with zeros that the attention mask hides, so no padding is ever run
through the model, and no branch repeats its siblings' prefill.
Across calls, a token trie of KV segments (:mod:`.prefix_cache`) keeps every context and step the
engine computed, so expanding a tree node prefills nothing its parent's request already ran.

The decode loop is written here rather than using ``model.generate`` because each request needs
its own seed, its own stop strings and the raw (temperature-1) log-prob of every sampled token;
sampling is by inverse CDF with per-request uniforms drawn up front, so a request's tokens depend
only on its seed and the model's probabilities, never on the rest of the batch.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from sppd_megatron.sampling.engines.base import Generation, GenerationRequest
from sppd_megatron.sampling.engines.prefix_cache import KV, PrefixKVCache, _Node


def load_causal_lm(spec: str, tokenizer, device: str = "cpu", dtype: str = "float32"):
    """``tiny:llama[:SEED]`` / ``tiny:qwen2[:SEED]`` built in code, or a local Hugging Face directory."""
    torch_dtype = getattr(torch, dtype)
    if spec.startswith("tiny:"):
        from sppd_megatron.models.tiny import build_tiny_hf_model

        parts = spec.split(":")
        family = parts[1] if len(parts) > 1 and parts[1] else "llama"
        seed = int(parts[2]) if len(parts) > 2 else 0
        model = build_tiny_hf_model(family, seed=seed, vocab_size=len(tokenizer))
    else:
        from transformers import AutoModelForCausalLM

        if not Path(spec).is_dir():
            raise FileNotFoundError(f"model {spec!r}: not 'tiny:<family>' and not a local directory")
        model = load_hf_causal_lm(spec, torch_dtype)
    return model.to(device=device, dtype=torch_dtype).eval()


def load_hf_causal_lm(path: str, torch_dtype):
    """A local HF causal LM, refused (ConversionError naming the file) unless its files make exactly the
    model config.json describes: no tensor missing or of another shape is silently initialised at
    random, and no code shipped with the files runs (``trust_remote_code`` stays off)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from sppd_megatron.conversion.errors import ConversionError
    from sppd_megatron.conversion.hf_io import check_hf_weights, read_hf_config

    _, model_cfg = read_hf_config(path)  # Llama / Qwen2 (what this project trains and converts)
    check_hf_weights(path, model_cfg)
    hf_logging.disable_progress_bar()  # the stages show their own progress; this one would interleave with it
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True,
                                                           trust_remote_code=False, output_loading_info=True)
    except Exception as exc:  # transformers raises many types for damaged files
        first = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ConversionError(f"{path}: cannot load the model ({type(exc).__name__}: {first})") from None
    missing = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if missing:
        raise ConversionError(f"{path}: the weights do not make the model config.json describes (missing or "
                              f"mismatched: {missing[:3]})")
    return model


def _sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                 uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(logits / T) restricted to the top-p nucleus, by inverse CDF.

    Rows with T == 0 take the argmax. Ties in the sort are broken by token id (stable sort), so
    the draw is a pure function of (logits, T, top_p, u).
    """
    greedy = logits.argmax(dim=-1)
    safe_t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits / safe_t[:, None], dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = torch.where(before < top_p[:, None], sorted_probs, torch.zeros_like(sorted_probs))
    cdf = torch.cumsum(sorted_probs, dim=-1)
    target = (uniforms * cdf[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)
    sampled = order.gather(-1, pick).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)


class TransformersEngine:
    """RolloutEngine over an in-process transformers model (CPU here; one GPU works the same)."""

    name = "transformers"

    def __init__(self, model, tokenizer, reuse_prefix: bool = True, seed: int = 0,
                 prefix_cache_tokens: int = 1_000_000):
        self.model = model
        self.tokenizer = tokenizer
        self.reuse_prefix = reuse_prefix
        # Across calls: every computed context and generated step, so a later expansion of a
        # node prefills only what it has not seen (None without prefix reuse).
        self.prefix_cache = PrefixKVCache(prefix_cache_tokens) if reuse_prefix else None
        self.eos_ids = self._eos_ids(model, tokenizer)
        self._fallback_rng = random.Random(seed)  # for requests without their own seed

    @staticmethod
    def _eos_ids(model, tokenizer) -> set[int]:
        ids = model.generation_config.eos_token_id if model.generation_config is not None else None
        if ids is None:
            ids = model.config.eos_token_id
        out = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if tokenizer.eos_token_id is not None:
            out.add(tokenizer.eos_token_id)
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- RolloutEngine ----------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        if not requests:
            return []
        for r in requests:
            if not r.context_ids:
                raise ValueError("a GenerationRequest needs at least one context token")
        with torch.inference_mode():
            return self._generate(requests)

    def update_weights_from_hf(self, hf_dir: str) -> None:
        from transformers import AutoModelForCausalLM

        new = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=self.model.dtype, local_files_only=True)
        self.model.load_state_dict(new.state_dict())
        self.reset_prefix_cache()  # KV computed by the old weights is stale

    def reset_prefix_cache(self) -> None:
        """Forget all cached KV (the tree sampler calls this so a batch never depends on earlier ones)."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def close(self) -> None:
        self.reset_prefix_cache()

    # --- internals --------------------------------------------------------------------------
    def _groups(self, requests: list[GenerationRequest]) -> tuple[list[list[int]], list[int]]:
        """Distinct contexts (first-seen order) and each request's group; one group per request without reuse."""
        if not self.reuse_prefix:
            return [r.context_ids for r in requests], list(range(len(requests)))
        index: dict[tuple[int, ...], int] = {}
        contexts: list[list[int]] = []
        group_of = []
        for r in requests:
            key = tuple(r.context_ids)
            if key not in index:
                index[key] = len(contexts)
                contexts.append(r.context_ids)
            group_of.append(index[key])
        return contexts, group_of

    def _prefill(self, contexts: list[list[int]]) -> tuple[list[KV | None], list[_Node], list[int]]:
        """Per context: the KV of all tokens but the last, its trie node, and how many were cached.

        Only the part not in the prefix cache runs through the model, one forward per context,
        so no padding is ever computed.
        """
        kvs, nodes, cached = [], [], []
        for ctx in contexts:
            need = ctx[:-1]
            hit, node = self.prefix_cache.lookup(need) if self.prefix_cache else (0, None)
            past = self.prefix_cache.kv(node) if hit else None
            if hit < len(need):
                from transformers import DynamicCache

                cache = DynamicCache(ddp_cache_data=past, config=self.model.config) if past else None
                out = self.model(input_ids=torch.tensor([need[hit:]], device=self.device),
                                 past_key_values=cache, use_cache=True)
                past = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
                if self.prefix_cache is not None:
                    fresh = [(k[:, :, hit:].clone(), v[:, :, hit:].clone()) for k, v in past]
                    node = self.prefix_cache.insert(node, need[hit:], fresh)
            kvs.append(past)
            nodes.append(node)
            cached.append(hit)
        return kvs, nodes, cached

    def _batched_cache(self, kvs: list[KV | None], lengths: list[int], rows: list[int]):
        """One DynamicCache for ``rows`` (group per row), each context right-aligned to the longest.

        The zero columns on the left are hidden by the attention mask.
        """
        from transformers import DynamicCache

        width = max(lengths)
        layers = []
        for layer in range(len(next(kv for kv in kvs if kv is not None))):
            padded = []
            for kv in kvs:
                if kv is None:
                    padded.append(None)
                    continue
                k, v = kv[layer]
                pad = (0, 0, width - k.shape[2], 0)  # left-pad the sequence dimension
                padded.append((torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)))
            template = next(p for p in padded if p is not None)
            padded = [p if p is not None else (torch.zeros_like(template[0]), torch.zeros_like(template[1]))
                      for p in padded]
            idx = torch.tensor(rows, device=self.device)
            layers.append((torch.cat([p[0] for p in padded])[idx], torch.cat([p[1] for p in padded])[idx]))
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _uniforms(self, req: GenerationRequest) -> torch.Tensor:
        seed = req.seed if req.seed is not None else self._fallback_rng.getrandbits(63)
        # Drawn on the CPU, so a seed gives the same draws on any device.
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(req.max_new_tokens, generator=gen, dtype=torch.float64).to(torch.float32)

    def _generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        contexts, group_of = self._groups(requests)
        prefix_lengths = [len(c) - 1 for c in contexts]
        kvs, nodes, hits = self._prefill(contexts)
        width = max(prefix_lengths)

        n = len(requests)
        dev = self.device
        cache = self._batched_cache(kvs, prefix_lengths, group_of) if width else None
        # Mask over cache columns: a row sees only the last prefix_length columns of the padded prefix.
        mask = torch.zeros(n, width, dtype=torch.long, device=dev)
        for i, g in enumerate(group_of):
            mask[i, width - prefix_lengths[g]:] = 1
        next_input = torch.tensor([r.context_ids[-1] for r in requests], device=dev)
        positions = torch.tensor([len(r.context_ids) - 1 for r in requests], device=dev)
        temperature = torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=dev)
        top_p = torch.tensor([r.top_p for r in requests], dtype=torch.float32, device=dev)
        uniforms = torch.nn.utils.rnn.pad_sequence([self._uniforms(r) for r in requests], batch_first=True).to(dev)

        out_ids: list[list[int]] = [[] for _ in range(n)]
        out_lps: list[list[float]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        active = list(range(n))  # request index of each live row
        step = 0
        while active:
            mask = torch.cat([mask, torch.ones(len(active), 1, dtype=torch.long, device=dev)], dim=1)
            out = self.model(input_ids=next_input[:, None], attention_mask=mask,
                             position_ids=positions[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()
            tokens = _sample_rows(logits, temperature, top_p, uniforms[:, step])
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
            keep_rows = []
            # One device-to-host copy per step, not one per row.
            token_list, logprob_list = tokens.tolist(), logprobs.tolist()
            for row, i in enumerate(active):
                tok = token_list[row]
                out_ids[i].append(tok)
                out_lps[i].append(logprob_list[row])
                finish[i] = self._finished(requests[i], out_ids[i], tok)
                if finish[i] is None:
                    keep_rows.append(row)
                elif self.prefix_cache is not None:
                    self._remember(cache, row, width, requests[i], out_ids[i], nodes[group_of[i]])
            step += 1
            if len(keep_rows) != len(active):
                # Drop finished rows from every per-row tensor and from the KV cache.
                sel = torch.tensor(keep_rows, dtype=torch.long, device=dev)
                active = [active[r] for r in keep_rows]
                if not active:
                    break
                cache.batch_select_indices(sel)
                mask, tokens, positions = mask[sel], tokens[sel], positions[sel]
                temperature, top_p, uniforms = temperature[sel], top_p[sel], uniforms[sel]
            next_input = tokens
            positions = positions + 1

        # The first branch of a context paid for the uncached part of its prefill; the others reused it.
        cached = [0] * n
        seen_groups: set[int] = set()
        for i, g in enumerate(group_of):
            cached[i] = prefix_lengths[g] if g in seen_groups else hits[g]
            seen_groups.add(g)
        return [
            Generation(token_ids=out_ids[i], token_logprobs=out_lps[i],
                       text=self.tokenizer.decode(out_ids[i], skip_special_tokens=True),
                       finish_reason=finish[i], cached_prefix_tokens=cached[i])
            for i in range(n)
        ]

    def _remember(self, cache, row: int, width: int, req: GenerationRequest, ids: list[int], node) -> None:
        """Cache a finished row's new KV: its last context token and all generated tokens but the last.

        Those are the cache columns after the padded prefix; cloned, so the batch tensor can go.
        """
        cols = slice(width, width + len(ids))
        kv = [(layer.keys[row:row + 1, :, cols].clone(), layer.values[row:row + 1, :, cols].clone())
              for layer in cache.layers]
        self.prefix_cache.insert(node, [req.context_ids[-1]] + ids[:-1], kv)

    def _finished(self, req: GenerationRequest, ids: list[int], last: int) -> str | None:
        if last in self.eos_ids:
            return "eos"
        if req.stop:
            # Decoding the whole step each token is quadratic in its length, but steps are short
            # and this sees exactly the text the caller will see.
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if any(s in text for s in req.stop):
                return "stop"
        if len(ids) >= req.max_new_tokens:
            return "length"
        return None
