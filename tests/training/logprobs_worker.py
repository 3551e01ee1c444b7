"""Prints how far ``token_logprobs`` is from a plain ``log_softmax`` (run as a subprocess by the test).

Megatron is initialised here (one process, TP=1), not in the pytest process, so its CPU
redirection never leaks into other tests. Each case reports an error string instead of stopping
the others.
"""

import json
import sys
import warnings

warnings.filterwarnings("ignore")

SEQ = 2048  # two of token_logprobs' 1024-token chunks
VOCAB = 128


def reference(logits, labels, true_vocab):
    import torch

    lp = torch.log_softmax(logits[..., :true_vocab].float(), dim=-1)
    return lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def measure(dtype, batch: int, true_vocab: int, grad: bool) -> dict:
    import torch

    from sppd_megatron.training.logprobs import token_logprobs

    g = torch.Generator().manual_seed(batch * 7 + true_vocab)
    base = (3 * torch.randn(batch, SEQ, VOCAB, generator=g)).to(dtype)
    labels = torch.randint(0, true_vocab, (batch, SEQ), generator=g)
    weights = torch.randn(batch, SEQ, generator=g)
    out = {}
    with torch.set_grad_enabled(grad):
        results = []
        for fn in (lambda x: token_logprobs(x, labels, true_vocab), lambda x: reference(x, labels, true_vocab)):
            x = base.clone().requires_grad_(grad)
            values = fn(x)
            if grad:
                (values * weights).sum().backward()
            results.append((values.detach(), x.grad, x.detach()))
    (ours, ours_grad, ours_input), (ref, ref_grad, _) = results
    out["value_max_abs_diff"] = (ours - ref).abs().max().item()
    out["input_unchanged"] = bool(torch.equal(ours_input, base))
    if grad:
        out["grad_max_abs_diff"] = (ours_grad.float() - ref_grad.float()).abs().max().item()
        out["grad_max_abs"] = ref_grad.float().abs().max().item()
    return out


def main() -> int:
    import torch

    from sppd_megatron.parallel.state import ParallelConfig, destroy, initialize

    initialize(ParallelConfig(), seed=0)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (1, 2):
            for true_vocab in (VOCAB, VOCAB - 5):  # no vocabulary padding, and padded rows masked
                for grad in (True, False):
                    name = f"{str(dtype).split('.')[-1]}-b{batch}-v{true_vocab}-{'grad' if grad else 'nograd'}"
                    try:
                        results[name] = measure(dtype, batch, true_vocab, grad)
                    except Exception as exc:  # report every case, not only the first failure
                        results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    destroy()
    print("RESULTS " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
