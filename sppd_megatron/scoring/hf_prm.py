"""Process reward models run through transformers, or served by an SGLang reward endpoint.

Two ways a trained PRM reads a step's value, both computed for every step in one forward pass:

- value head (Skywork-o1-Open-PRM-Qwen-2.5-7B style): a linear layer on the backbone's hidden state
  at each step's last token, then a sigmoid;
- step tag (Math-Shepherd style): a tag token follows each step, and the value is the probability
  of the "good" token against the "bad" token in the LM's prediction at the tag.

The input is ``question_format.format(question=...)`` followed by each step (+ ``step_separator``),
each piece tokenised on its own so step boundaries are exact token positions. Batches are padded
on the right; with causal attention padding cannot change any real position, so a batch scores
exactly what the queries score one by one.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from sppd_megatron.scoring.prm import BatchedPRM, StepQuery, check_scores


@dataclass
class HFPRMConfig:
    """A PRM checkpoint on disk and how to feed it."""

    path: str = ""
    """Hugging Face model directory (nothing is downloaded)."""
    style: Literal["value_head", "step_tag"] = "value_head"
    """How step values are read: a linear value head (Skywork) or a step-tag token probability (Math-Shepherd)."""
    tokenizer: str = ""
    """Tokenizer directory or ``builtin:char``; empty means the model directory."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:1``...; ``auto`` picks CUDA when available."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype on the device (bfloat16 for 7B PRMs on GPU)."""
    batch_size: int = 8
    """Trajectories per forward pass."""
    max_length: int = 4096
    """Longest input in tokens; a longer trajectory is an error (its late steps would go unscored)."""
    question_format: str = "{question}\n"
    """Text before the first step; ``{question}`` is replaced by the question."""
    step_separator: str = ""
    """Appended to every step (tree steps already end with their delimiter; Skywork splits steps on "\\n")."""
    add_bos: bool = True
    """Start the input with the tokenizer's BOS token when it has one."""
    value_head_key: str = "v_head.summary"
    """value_head style: key prefix of the head's ``.weight``/``.bias`` in the directory's safetensors files."""
    step_tag: str = "ки"
    """step_tag style: the tag token placed after each step."""
    good_token: str = "+"
    """step_tag style: the token whose probability is the step's value."""
    bad_token: str = "-"
    """step_tag style: the competing token."""
    trust_remote_code: bool = False
    """Let transformers run the Python files shipped in ``path`` (custom model classes). Off: a PRM
    directory is data; turn it on by name only for a checkpoint whose code you have read."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError("batch_size must be >= 1 and max_length >= 2")
        if "{question}" not in self.question_format:
            raise ValueError("question_format must contain {question}")


def _resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _single_token_id(tokenizer, text: str, what: str) -> int:
    for candidate in (text, " " + text):
        ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 or (candidate != text and ids):
            return ids[-1]
    raise ValueError(f"{what} {text!r} is not a single token for this tokenizer")


def _load_pretrained(auto_cls, config: HFPRMConfig, dtype):
    """``auto_cls.from_pretrained`` of the PRM directory; a damaged one is a ValueError naming it."""
    try:
        return auto_cls.from_pretrained(str(config.path), local_files_only=True, dtype=dtype,
                                        trust_remote_code=config.trust_remote_code)
    except Exception as exc:  # transformers raises many types for damaged or foreign files
        first = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ValueError(f"{config.path}: cannot load the PRM ({type(exc).__name__}: {first})") from None


class _TransformersPRM(BatchedPRM):
    """Shared tokenisation and batching; subclasses turn hidden states/logits into step values."""

    def __init__(self, model, tokenizer, config: HFPRMConfig):
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.device = next(model.parameters()).device
        self._torch = torch

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _build(self, query: StepQuery) -> tuple[list[int], list[int]]:
        """Token ids of one query and the positions whose outputs hold the step values."""
        cfg = self.config
        ids = []
        if cfg.add_bos and self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
        ids += self._encode(cfg.question_format.format(question=query.question))
        positions = []
        for step in query.steps:
            ids += self._encode(step + cfg.step_separator) + self._step_suffix()
            positions.append(len(ids) - 1)
        if len(ids) > cfg.max_length:
            raise ValueError(
                f"PRM input of {len(ids)} tokens exceeds max_length={cfg.max_length} "
                f"(question {query.question[:60]!r}); raise max_length"
            )
        return ids, positions

    def _step_suffix(self) -> list[int]:
        return []

    def _values(self, input_ids, attention_mask, positions):
        """Step values (B, T_max) in [0, 1] at ``positions`` (B, T_max) for a padded batch."""
        raise NotImplementedError

    def score_batch(self, queries: Sequence[StepQuery]) -> list[list[float]]:
        torch = self._torch
        out: list[list[float]] = []
        for start in range(0, len(queries), self.config.batch_size):
            chunk = queries[start : start + self.config.batch_size]
            built = [self._build(q) for q in chunk]
            width = max(len(ids) for ids, _ in built)
            steps = max(1, max(len(pos) for _, pos in built))
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            positions = torch.zeros((len(chunk), steps), dtype=torch.long)
            for row, (ids, pos) in enumerate(built):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
                positions[row, : len(pos)] = torch.tensor(pos, dtype=torch.long)
            with torch.inference_mode():
                values = self._values(
                    input_ids.to(self.device), attention_mask.to(self.device), positions.to(self.device)
                )
            values = values.float().cpu().tolist()
            for q, (_, pos), row in zip(chunk, built, values):
                out.append(check_scores(self.name, q, row[: len(pos)]))
        return out


class ValueHeadPRM(_TransformersPRM):
    """Skywork-style: sigmoid(w . h_t + b) at the last token of each step."""

    name = "value_head"

    def __init__(self, backbone, head, tokenizer, config: HFPRMConfig):
        super().__init__(backbone, tokenizer, config)
        self.head = head.to(self.device, dtype=next(backbone.parameters()).dtype).eval()

    def _values(self, input_ids, attention_mask, positions):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        at_steps = hidden.gather(1, index)  # (B, T, H)
        return self._torch.sigmoid(self.head(at_steps).squeeze(-1))

    @classmethod
    def from_pretrained(cls, config: HFPRMConfig) -> "ValueHeadPRM":
        """Backbone through ``AutoModel``; the head's tensors found by key prefix in the safetensors files."""
        import torch
        from safetensors import safe_open
        from transformers import AutoModel

        from sppd_megatron.tokenization import load_tokenizer

        path = Path(config.path)
        dtype = getattr(torch, config.dtype)
        backbone = _load_pretrained(AutoModel, config, dtype)
        tensors = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    if key.startswith(config.value_head_key + "."):
                        tensors[key[len(config.value_head_key) + 1 :]] = fh.get_tensor(key)
        if "weight" not in tensors:
            raise ValueError(f"{path}: no '{config.value_head_key}.weight' in its safetensors files (value_head_key)")
        weight = tensors["weight"].reshape(1, -1)
        head = torch.nn.Linear(weight.shape[1], 1, bias="bias" in tensors)
        with torch.no_grad():
            head.weight.copy_(weight)
            if "bias" in tensors:
                head.bias.copy_(tensors["bias"].reshape(1))
        tokenizer = load_tokenizer(config.tokenizer or path)
        return cls(backbone.to(_resolve_device(config.device)), head, tokenizer, config)


class StepTagPRM(_TransformersPRM):
    """Math-Shepherd-style: P(good | ..., step_t, tag) renormalised over {good, bad}."""

    name = "step_tag"

    def __init__(self, model, tokenizer, config: HFPRMConfig):
        super().__init__(model, tokenizer, config)
        self.tag_id = _single_token_id(tokenizer, config.step_tag, "step_tag")
        self.good_id = _single_token_id(tokenizer, config.good_token, "good_token")
        self.bad_id = _single_token_id(tokenizer, config.bad_token, "bad_token")

    def _step_suffix(self) -> list[int]:
        return [self.tag_id]

    def _values(self, input_ids, attention_mask, positions):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        pair = logits[..., [self.good_id, self.bad_id]]  # (B, L, 2): only two vocab columns kept
        index = positions.unsqueeze(-1).expand(-1, -1, 2)
        return pair.gather(1, index).float().softmax(-1)[..., 0]

    @classmethod
    def from_pretrained(cls, config: HFPRMConfig) -> "StepTagPRM":
        import torch
        from transformers import AutoModelForCausalLM

        from sppd_megatron.tokenization import load_tokenizer

        model = _load_pretrained(AutoModelForCausalLM, config, getattr(torch, config.dtype))
        tokenizer = load_tokenizer(config.tokenizer or config.path)
        return cls(model.to(_resolve_device(config.device)), tokenizer, config)


@dataclass
class SGLangPRMConfig:
    """A PRM served by ``python -m sglang.launch_server --model-path PRM --is-embedding``."""

    url: str = "http://127.0.0.1:30000"
    """Base URL of the server; requests go to ``{url}/classify``."""
    question_format: str = "{question}\n"
    """Text before the first step; ``{question}`` is replaced by the question."""
    step_separator: str = ""
    """Appended to every step, as for the transformers PRMs."""
    apply_sigmoid: bool = False
    """Whether the server returns logits (True: squash them) or probabilities already (False)."""
    timeout_seconds: float = 600.0
    """HTTP timeout of one batched request."""


class SGLangRewardPRM(BatchedPRM):
    """Scores each state s_t = question + steps[:t] as its own sequence on a reward server.

    A causal value head reads the same number at the last token of s_t whether or not later steps
    follow, so scoring every prefix equals scoring the whole trajectory once; the server's radix
    cache shares the prefixes, so the extra sequences cost little.
    """

    name = "sglang"

    def __init__(self, config: SGLangPRMConfig):
        self.config = config

    def _post(self, texts: list[str]) -> list:
        url = self.config.url.rstrip("/") + "/classify"
        body = json.dumps({"text": texts}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_seconds) as response:
                reply = json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RuntimeError(
                f"SGLang reward endpoint {url} is not reachable ({reason}). Start one with "
                "`python -m sglang.launch_server --model-path PRM_DIR --is-embedding --port 30000` "
                "(GPU machines, extra 'gpu'), or score with scorer: hf, mc or tree."
            ) from None
        if isinstance(reply, dict):
            reply = [reply]
        if not isinstance(reply, list) or len(reply) != len(texts):
            raise RuntimeError(f"SGLang reward endpoint {url}: expected {len(texts)} results, got {str(reply)[:200]}")
        return reply

    def score_batch(self, queries: Sequence[StepQuery]) -> list[list[float]]:
        cfg = self.config
        texts, counts = [], []
        for q in queries:
            head = cfg.question_format.format(question=q.question)
            for t in range(1, len(q.steps) + 1):
                texts.append(head + "".join(s + cfg.step_separator for s in q.steps[:t]))
            counts.append(len(q.steps))
        raw = self._post(texts) if texts else []
        numbers = []
        for item in raw:
            value = item.get("embedding", item.get("score")) if isinstance(item, dict) else item
            value = value[-1] if isinstance(value, list) else value
            value = float(value)
            numbers.append(1.0 / (1.0 + math.exp(-value)) if cfg.apply_sigmoid else value)
        out, start = [], 0
        for q, n in zip(queries, counts):
            out.append(check_scores(self.name, q, numbers[start : start + n]))
            start += n
        return out
