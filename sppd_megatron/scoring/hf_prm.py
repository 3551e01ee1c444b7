"""Process reward models run through transformers, or served by an SGLang reward endpoint.

Three ways a trained PRM reads a step's value, each computed for every step in one forward pass:

- value head (Skywork-o1-Open-PRM-Qwen-2.5-7B style): a linear layer on the backbone's hidden state
  at each step's last token, then a sigmoid;
- step tag (Math-Shepherd style): a tag token follows each step, and the value is the probability
  of the "good" token against the "bad" token in the LM's prediction at the tag;
- Qwen2.5-Math-PRM style (``qwen_prm``): the conversation (system prompt, the question as the user
  turn, the steps as the assistant turn, each step with its trailing blank line dropped and followed
  by ``<extra_0>``) rendered by the checkpoint's chat template; the value at each ``<extra_0>`` is the
  positive-class probability of a two-way head, Linear(H, H) -> ReLU -> Linear(H, 2) (the
  checkpoint's ``score.0`` / ``score.2`` tensors). As Qwen's model card computes it, without the
  checkpoint's remote code: the backbone loads as the transformers Qwen2 model, the head from the
  safetensors files.

For the first two the input is ``question_format.format(question=...)`` followed by each step (+
``step_separator``), each piece tokenised on its own so step boundaries are exact token positions.
Batches are padded on the right; with causal attention padding cannot change any real position, so
a batch scores exactly what the queries score one by one.
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
    style: Literal["value_head", "step_tag", "qwen_prm"] = "value_head"
    """How step values are read: a linear value head (Skywork), a step-tag token probability (Math-Shepherd),
    or Qwen2.5-Math-PRM's two-way head at each ``<extra_0>``."""
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
    value_head_key: str | None = None
    """Key prefix of the head's tensors in the directory's safetensors files: value_head style, the
    linear head's ``.weight``/``.bias`` (default ``v_head.summary``); qwen_prm, the two-layer head's
    ``.0`` / ``.2`` layers (default ``score``)."""
    step_tag: str | None = None
    """The tag token placed after each step: step_tag style (default ``ки``), qwen_prm (default ``<extra_0>``)."""
    system_prompt: str = "Please reason step by step, and put your final answer within \\boxed{}."
    """qwen_prm style: the system turn of the conversation (Qwen's model card)."""
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
        if self.value_head_key is None:
            self.value_head_key = "score" if self.style == "qwen_prm" else "v_head.summary"
        if self.step_tag is None:
            self.step_tag = "<extra_0>" if self.style == "qwen_prm" else "ки"


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

        from sppd_megatron.tokenization import load_tokenizer

        path = Path(config.path)
        backbone = _backbone(config)
        tensors = _head_tensors(path, config.value_head_key)
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


def _backbone(config: HFPRMConfig):
    """The checkpoint's transformer without its head, as the transformers class of its model type.

    With ``trust_remote_code`` off (the default), a PRM whose config names remote classes
    (Qwen2.5-Math-PRM's ``auto_map``) loads as the local architecture of its ``model_type``; its
    head is read apart.
    """
    import torch
    from transformers import AutoModel

    return _load_pretrained(AutoModel, config, getattr(torch, config.dtype))


def _head_tensors(path: Path, prefix: str) -> dict:
    """``{name after the prefix: tensor}`` for every safetensors entry under ``prefix.``."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    if key.startswith(prefix + "."):
                        tensors[key[len(prefix) + 1:]] = fh.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{file}: cannot read the PRM head ({type(exc).__name__}: {exc})") from None
    return tensors


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


class QwenMathPRM(_TransformersPRM):
    """Qwen2.5-Math-PRM style: softmax(head(h))[1] at each ``<extra_0>`` of the rendered conversation."""

    name = "qwen_prm"

    def __init__(self, backbone, head, tokenizer, config: HFPRMConfig):
        super().__init__(backbone, tokenizer, config)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{config.path}: style qwen_prm renders the conversation with the checkpoint's chat "
                             "template, and its tokenizer has none")
        self.tag_id = _single_token_id(tokenizer, config.step_tag, "step_tag")
        self.head = head.to(self.device, dtype=next(backbone.parameters()).dtype).eval()

    def _build(self, query: StepQuery) -> tuple[list[int], list[int]]:
        cfg = self.config
        # Qwen's card splits a solution at blank lines and drops them; tree steps keep theirs.
        content = "".join(step.rstrip() + cfg.step_tag for step in query.steps)
        messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": query.question},
                    {"role": "assistant", "content": content}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        ids = self.tokenizer.encode(text)
        positions = [i for i, t in enumerate(ids) if t == self.tag_id]
        if len(positions) != len(query.steps):
            raise ValueError(f"PRM input of question {query.question[:60]!r} holds {len(positions)} {cfg.step_tag!r} "
                             f"tags for {len(query.steps)} steps (a step or the question contains the tag?)")
        if len(ids) > cfg.max_length:
            raise ValueError(f"PRM input of {len(ids)} tokens exceeds max_length={cfg.max_length} "
                             f"(question {query.question[:60]!r}); raise max_length")
        return ids, positions

    def _values(self, input_ids, attention_mask, positions):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        logits = self.head(hidden.gather(1, index))  # (B, T, 2)
        return logits.float().softmax(-1)[..., 1]

    @classmethod
    def from_pretrained(cls, config: HFPRMConfig) -> "QwenMathPRM":
        import torch

        from sppd_megatron.tokenization import load_tokenizer

        path = Path(config.path)
        tensors = _head_tensors(path, config.value_head_key)
        need = ["0.weight", "0.bias", "2.weight", "2.bias"]
        missing = [f"{config.value_head_key}.{k}" for k in need if k not in tensors]
        if missing:
            raise ValueError(f"{path}: no {missing} in its safetensors files (a Qwen2.5-Math-PRM head is "
                             f"{config.value_head_key}.0 and {config.value_head_key}.2; value_head_key)")
        hidden, labels = tensors["0.weight"].shape[1], tensors["2.weight"].shape[0]
        if labels != 2:
            raise ValueError(f"{path}: {config.value_head_key}.2 has {labels} outputs; style qwen_prm reads a two-way head")
        head = torch.nn.Sequential(torch.nn.Linear(hidden, tensors["0.weight"].shape[0]), torch.nn.ReLU(),
                                   torch.nn.Linear(tensors["2.weight"].shape[1], 2))
        head.load_state_dict({k: tensors[k] for k in need})
        tokenizer = load_tokenizer(config.tokenizer or path)
        return cls(_backbone(config).to(_resolve_device(config.device)), head, tokenizer, config)


HF_PRM_STYLES = {"value_head": ValueHeadPRM, "step_tag": StepTagPRM, "qwen_prm": QwenMathPRM}


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
