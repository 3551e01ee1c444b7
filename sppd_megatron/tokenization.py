"""Tokenizers: Hugging Face tokenizers from a directory, or the tiny character tokenizer built in code.

The character tokenizer exists so the CPU demo, the fixtures and the tests need nothing downloaded:
every printable ASCII character is one token, so a step never merges with its prefix and the
tiny model's outputs stay readable. It is a real ``PreTrainedTokenizerFast`` (saved with
``save_pretrained``) so the sampling engines and the HF export treat it like any other.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sppd_megatron.records import RecordError

CHAR_TOKENIZER_SPEC = "builtin:char"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
GENERIC_FAST_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be loaded; the message names the directory or file."""


def build_char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character becomes its own "word"; WordLevel then maps it to one id.
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _check_json(file: Path) -> None:
    """TokenizerError naming ``file`` (and line) unless it is absent or a JSON object."""
    import json

    if not file.is_file():
        return
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{file}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{file}: not a JSON object")


def load_tokenizer(spec: str | Path):
    """``builtin:char`` or a directory with Hugging Face tokenizer files (no download is attempted)."""
    if str(spec) == CHAR_TOKENIZER_SPEC:
        return build_char_tokenizer()
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer {spec!r}: not '{CHAR_TOKENIZER_SPEC}' and not a directory with tokenizer files"
        )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        _check_json(path / name)
    cfg_path = path / "tokenizer_config.json"
    cls = None
    if cfg_path.is_file():
        try:
            cls = json.loads(cfg_path.read_bytes().decode("utf-8")).get("tokenizer_class")
        except (ValueError, AttributeError) as exc:
            raise TokenizerError(f"{cfg_path}: not a JSON object ({exc})") from None
    try:
        if cls in GENERIC_FAST_CLASSES and (path / "tokenizer.json").is_file():
            # AutoTokenizer would pick the class from config.json's model type (Qwen2Tokenizer for a
            # Qwen2 config), which re-splits a tokenizer.json built in code; load it as saved instead.
            return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        # Never code shipped with the files (an auto_map naming a tokenizer class in a .py file).
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers and tokenizers raise many types for damaged files
        first = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise TokenizerError(f"{path}: cannot load the tokenizer ({type(exc).__name__}: {first})") from None


@lru_cache(maxsize=16)
def _leading_special_ids(tokenizer) -> tuple[int, ...]:
    """The special tokens the tokenizer puts before a text (a Llama base model's BOS), if any."""
    probe = "a"
    full = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return tuple(full[:i])
    return ()


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a text that starts a sequence: a prompt, or a prompt followed by steps.

    The one tokenisation used by sampling, rollouts and training, so the policy is conditioned on
    the same ids in each. The tokenizer's leading special tokens (BOS for a Llama base model) are
    added once: not again when the text already writes them, as a chat template does, and no
    trailing ones (an EOS some tokenizers append), because the sequence goes on.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    lead = list(_leading_special_ids(tokenizer))
    if lead and ids[: len(lead)] != lead:
        ids = lead + ids
    return list(ids)


class BoundaryMergeError(RecordError):
    """A continuation re-tokenises differently when joined to its context (a token merges across the boundary).

    ``context_ids`` and ``full_ids`` are the two tokenisations that disagree."""

    def __init__(self, reason: str, context_ids: list[int] = (), full_ids: list[int] = ()):
        super().__init__(reason)
        self.context_ids, self.full_ids = context_ids, full_ids


def encode_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """``(ids, context_len)``: ``encode(context + continuation)``, whose first ``context_len`` ids are
    ``encode(context)``. How training tokenises a prompt + prefix and the step that follows.

    With a BPE tokenizer a step's first characters can merge with its context's last ones ("...the
    answ" + "er is" -> "answer"), so no id sequence is the context alone: that raises
    BoundaryMergeError, and the step cannot be trained on as a continuation of its context.
    """
    ctx_ids = encode(tokenizer, context)
    full_ids = encode(tokenizer, context + continuation)
    if full_ids[: len(ctx_ids)] != ctx_ids or len(full_ids) == len(ctx_ids):
        raise BoundaryMergeError(
            "the continuation re-tokenises differently when joined to its context (a token merges across "
            "the boundary); end steps with the delimiter or use a tokenizer whose boundary is stable",
            ctx_ids, full_ids,
        )
    return full_ids, len(ctx_ids)
