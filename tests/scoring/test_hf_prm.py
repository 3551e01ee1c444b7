"""Transformers PRMs on tiny random models built in code; the SGLang client against a loopback fake."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from sppd_megatron.models.tiny import build_tiny_hf_model, save_tiny_hf_checkpoint
from sppd_megatron.scoring.hf_prm import (
    HFPRMConfig,
    SGLangPRMConfig,
    SGLangRewardPRM,
    StepTagPRM,
    ValueHeadPRM,
)
from sppd_megatron.scoring.prm import ProcessRewardModel, StepQuery
from sppd_megatron.tokenization import build_char_tokenizer

def _flat(values):
    return [x for row in values for x in row]


QUERIES = [
    StepQuery("What is 2+3?", ("2+3=5.\n", "The answer is \\boxed{5}.")),
    StepQuery("Compute 7*6.", ("7*6 = 42\n",)),
    StepQuery("A long one: 1+1+1+1?", ("1+1=2\n", "2+1=3\n", "3+1=4\n", "\\boxed{4}")),
]


@pytest.fixture(scope="module")
def value_head_prm(tmp_path_factory):
    path = tmp_path_factory.mktemp("vh")
    save_tiny_hf_checkpoint(path, family="llama", seed=1)
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1)
    from safetensors.torch import save_file

    save_file({"v_head.summary.weight": head.weight.detach().clone(), "v_head.summary.bias": head.bias.detach().clone()},
              str(path / "value_head.safetensors"))
    prm = ValueHeadPRM.from_pretrained(HFPRMConfig(path=str(path), style="value_head", batch_size=2, device="cpu"))
    return prm, head


def test_value_head_shapes_range_and_batching(value_head_prm):
    prm, _ = value_head_prm
    assert isinstance(prm, ProcessRewardModel)
    batched = prm.score_batch(QUERIES)
    assert [len(v) for v in batched] == [2, 1, 4]
    assert all(0.0 <= x <= 1.0 for v in batched for x in v)
    one_by_one = [prm.score(q.question, q.steps) for q in QUERIES]
    assert _flat(batched) == pytest.approx(_flat(one_by_one), abs=1e-5)


def test_value_head_reads_the_last_token_of_each_step(value_head_prm):
    prm, head = value_head_prm
    q = QUERIES[0]
    ids, positions = prm._build(q)
    with torch.no_grad():
        hidden = prm.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        expected = torch.sigmoid(head(hidden[positions])).squeeze(-1).tolist()
    assert prm.score(q.question, q.steps) == pytest.approx(expected, abs=1e-5)
    tok = prm.tokenizer
    assert tok.convert_ids_to_tokens(ids[positions[0]]) == "\n", (ids, positions)  # step ends with its delimiter
    # a prefix scores what the same steps score inside the longer trajectory (causal value head)
    assert prm.score(q.question, q.steps[:1]) == pytest.approx(prm.score(q.question, q.steps)[:1], abs=1e-5)


def test_value_head_missing_head_is_a_clear_error(tmp_path):
    save_tiny_hf_checkpoint(tmp_path, family="llama")
    with pytest.raises(ValueError, match="v_head.summary.weight"):
        ValueHeadPRM.from_pretrained(HFPRMConfig(path=str(tmp_path), device="cpu"))


def test_step_tag_probabilities_and_batching():
    tok = build_char_tokenizer()
    model = build_tiny_hf_model("llama", seed=3, vocab_size=len(tok))
    cfg = HFPRMConfig(style="step_tag", step_tag="@", good_token="+", bad_token="-", batch_size=3)
    prm = StepTagPRM(model, tok, cfg)
    batched = prm.score_batch(QUERIES)
    assert [len(v) for v in batched] == [2, 1, 4]
    assert all(0.0 < x < 1.0 for v in batched for x in v)
    assert _flat(batched) == pytest.approx(_flat([prm.score(q.question, q.steps) for q in QUERIES]), abs=1e-5)
    # the value is softmax over (good, bad) of the logits at each tag position
    ids, positions = prm._build(QUERIES[1])
    assert [ids[p] for p in positions] == [prm.tag_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, positions[0]]
    expected = torch.softmax(logits[[prm.good_id, prm.bad_id]], -1)[0].item()
    assert batched[1][0] == pytest.approx(expected, abs=1e-5)


def test_too_long_input_is_an_error():
    tok = build_char_tokenizer()
    model = build_tiny_hf_model("llama", vocab_size=len(tok))
    prm = StepTagPRM(model, tok, HFPRMConfig(style="step_tag", step_tag="@", max_length=20))
    with pytest.raises(ValueError, match="max_length"):
        prm.score("q" * 30, ["step\n"])


class _FakeReward(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["text"]
        body = json.dumps([{"embedding": [len(t) % 5 - 2.0]} for t in texts]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_sglang_client_against_a_loopback_fake():
    server = HTTPServer(("127.0.0.1", 0), _FakeReward)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        prm = SGLangRewardPRM(SGLangPRMConfig(url=f"http://127.0.0.1:{server.server_port}", apply_sigmoid=True))
        values = prm.score_batch(QUERIES[:2])
    finally:
        thread.join(timeout=10)
        server.server_close()
    assert [len(v) for v in values] == [2, 1]
    text = "What is 2+3?\n2+3=5.\n"
    assert values[0][0] == pytest.approx(1 / (1 + pow(2.718281828459045, -(len(text) % 5 - 2.0))))


def test_sglang_missing_endpoint_is_a_clear_error():
    server = HTTPServer(("127.0.0.1", 0), _FakeReward)
    port = server.server_port
    server.server_close()  # nothing listens there now
    prm = SGLangRewardPRM(SGLangPRMConfig(url=f"http://127.0.0.1:{port}", timeout_seconds=5))
    with pytest.raises(RuntimeError, match="not reachable.*launch_server"):
        prm.score("q", ["a\n"])


QWEN_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def qwen_prm_checkpoint(tmp_path_factory):
    """A tiny Qwen2.5-Math-PRM laid out as the real one: config naming remote classes (auto_map), the
    backbone under ``model.``, the head as ``score.0`` / ``score.2``, ``<extra_0>`` a token of its own."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2Model

    path = tmp_path_factory.mktemp("qwen_prm")
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(str(path))
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(5)
    backbone = Qwen2Model(config).eval()
    head = {"score.0.weight": torch.randn(32, 32) * 0.3, "score.0.bias": torch.randn(32) * 0.1,
            "score.2.weight": torch.randn(2, 32) * 0.3, "score.2.bias": torch.randn(2) * 0.1}
    save_file({**{f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}, **head},
              str(path / "model.safetensors"))
    cfg = config.to_dict()
    cfg.update(architectures=["Qwen2ForProcessRewardModel"],
               auto_map={"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
                         "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"})
    (path / "config.json").write_text(json.dumps(cfg))
    return path, backbone, {k: v.double().numpy() for k, v in head.items()}, tok


def _qwen_card_rewards(backbone, head, tok, system, query):
    """Qwen2.5-Math-PRM's model card, step for step, with the head in numpy: the reference values."""
    import numpy as np

    steps = [s.rstrip() for s in query.steps]  # the card's steps carry no trailing blank line
    messages = [{"role": "system", "content": system}, {"role": "user", "content": query.question},
                {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
    conversation = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    input_ids = tok.encode(conversation)
    step_sep_id = tok.encode("<extra_0>", add_special_tokens=False)[0]
    with torch.no_grad():
        hidden = backbone(input_ids=torch.tensor([input_ids])).last_hidden_state[0].double().numpy()
    at = hidden[[i for i, t in enumerate(input_ids) if t == step_sep_id]]
    logits = np.maximum(at @ head["score.0.weight"].T + head["score.0.bias"], 0) @ head["score.2.weight"].T \
        + head["score.2.bias"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True))[:, 1].tolist()


def test_qwen_prm_style_equals_the_model_card_computation(qwen_prm_checkpoint):
    from sppd_megatron.scoring.hf_prm import QwenMathPRM

    path, backbone, head, tok = qwen_prm_checkpoint
    cfg = HFPRMConfig(path=str(path), style="qwen_prm", batch_size=2, device="cpu")
    assert cfg.step_tag == "<extra_0>" and cfg.value_head_key == "score"
    prm = QwenMathPRM.from_pretrained(cfg)  # no trust_remote_code: the config's auto_map is not followed
    queries = [StepQuery(q.question, tuple(s if s.endswith("\n") else s + "\n\n" for s in q.steps)) for q in QUERIES]
    batched = prm.score_batch(queries)
    expected = [_qwen_card_rewards(backbone, head, tok, cfg.system_prompt, q) for q in queries]
    assert [len(v) for v in batched] == [2, 1, 4]
    diff = max(abs(a - b) for a, b in zip(_flat(batched), _flat(expected)))
    print(f"\nqwen_prm style vs Qwen2.5-Math-PRM's model card computation (numpy head), 7 steps of 3 queries "
          f"in batches of 2: max abs difference {diff:.1e}")
    assert _flat(batched) == pytest.approx(_flat(expected), abs=1e-6)
    assert max(_flat(batched)) - min(_flat(batched)) > 1e-3  # the head is not constant


def test_qwen_prm_style_errors(qwen_prm_checkpoint, tmp_path):
    from sppd_megatron.scoring.hf_prm import QwenMathPRM

    path, *_ = qwen_prm_checkpoint
    prm = QwenMathPRM.from_pretrained(HFPRMConfig(path=str(path), style="qwen_prm", device="cpu"))
    with pytest.raises(ValueError, match="tags for 1 steps"):
        prm.score("q", ["a step naming <extra_0> itself\n\n"])
    with pytest.raises(ValueError, match="v_head.0.weight"):
        QwenMathPRM.from_pretrained(HFPRMConfig(path=str(path), style="qwen_prm", value_head_key="v_head", device="cpu"))
