"""Each loss against its formula, its special cases and numerical gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from sppd_megatron import losses


def _inputs(n=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    t = lambda scale=5.0: (torch.randn(n, generator=g, dtype=dtype) * scale - 20).requires_grad_()  # noqa: E731
    vals = lambda: torch.rand(n, generator=g, dtype=dtype)  # noqa: E731
    return t(), t(), t(), t(), vals(), vals()


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("mode", ["dynamic", "fixed", "none"])
def test_step_dpo_matches_formula_elementwise(mode):
    pc, pr, rc, rr, vc, vr = _inputs()
    beta, gamma = 0.1, 2.0
    loss, metrics = losses.step_dpo_loss(pc, pr, rc, rr, vc, vr, beta, gamma, margin_mode=mode)
    for i in range(len(pc)):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        m = {"dynamic": gamma * (vc[i].item() - vr[i].item()), "fixed": gamma, "none": 0.0}[mode]
        assert loss[i].item() == pytest.approx(-math.log(_sigmoid(beta * h - m)), rel=1e-12)
        assert metrics["accuracy"][i].item() == float(h > 0)
        assert metrics["margin"][i].item() == pytest.approx(beta * h, rel=1e-12)


def test_step_dpo_without_margin_equals_sentence_dpo_sigmoid():
    pc, pr, rc, rr, vc, vr = _inputs(seed=1)
    step, _ = losses.step_dpo_loss(pc, pr, rc, rr, vc, vr, beta=0.3, gamma=5.0, margin_mode="none")
    dpo, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.3, variant="sigmoid")
    torch.testing.assert_close(step, dpo, rtol=0, atol=0)


def test_dynamic_margin_with_gamma_zero_is_plain_step_dpo():
    pc, pr, rc, rr, vc, vr = _inputs(seed=2)
    a, _ = losses.step_dpo_loss(pc, pr, rc, rr, vc, vr, 0.1, 0.0, "dynamic")
    b, _ = losses.step_dpo_loss(pc, pr, rc, rr, None, None, 0.1, 0.0, "none")
    torch.testing.assert_close(a, b)


def test_dynamic_margin_needs_values():
    pc, pr, rc, rr, _, _ = _inputs()
    with pytest.raises(ValueError, match="needs chosen_values"):
        losses.step_dpo_loss(pc, pr, rc, rr, None, None, 0.1, 1.0, "dynamic")


def test_unknown_names_fail():
    pc, pr, rc, rr, vc, vr = _inputs()
    with pytest.raises(ValueError, match="unknown margin mode"):
        losses.step_dpo_loss(pc, pr, rc, rr, vc, vr, 0.1, 1.0, "adaptive")
    with pytest.raises(ValueError, match="unknown DPO variant"):
        losses.dpo_loss(pc, pr, rc, rr, 0.1, "kto")


@pytest.mark.parametrize("mode", ["dynamic", "fixed", "none"])
def test_step_dpo_gradcheck(mode):
    pc, pr, rc, rr, vc, vr = _inputs(n=4, seed=3)
    fn = lambda a, b: losses.step_dpo_loss(a, b, rc.detach(), rr.detach(), vc, vr, 0.1, 1.5, mode)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pc, pr))


@pytest.mark.parametrize("variant", ["sigmoid", "ipo", "conservative"])
def test_dpo_variants_formula_and_gradcheck(variant):
    pc, pr, rc, rr, _, _ = _inputs(n=6, seed=4)
    beta, eps = 0.2, 0.1
    loss, _ = losses.dpo_loss(pc, pr, rc, rr, beta, variant, label_smoothing=eps)
    h = (pc - rc) - (pr - rr)
    if variant == "sigmoid":
        expected = -F.logsigmoid(beta * h)
    elif variant == "ipo":
        expected = (h - 1 / (2 * beta)) ** 2
    else:
        expected = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    torch.testing.assert_close(loss, expected)
    fn = lambda a, b: losses.dpo_loss(a, b, rc.detach(), rr.detach(), beta, variant, eps)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pc, pr))


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_sft_loss_reductions(reduction):
    logps = -torch.rand(3, 7, dtype=torch.float64)
    mask = torch.zeros(3, 7, dtype=torch.float64)
    mask[0, 2:5] = 1
    mask[1, 0:7] = 1
    mask[2, 6] = 1
    loss, weight, _ = losses.sft_loss((logps * mask).sum(-1), mask.sum(-1), reduction)
    selected = [logps[i][mask[i] == 1] for i in range(3)]
    if reduction == "token":  # the mean over all 11 response tokens
        expected = -torch.cat(selected).mean()
    else:  # the mean of the three responses' means
        expected = -torch.stack([s.mean() for s in selected]).mean()
    assert (loss.sum() / weight.sum()).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="unknown SFT reduction"):
        losses.sft_loss(logps.sum(-1), mask.sum(-1), "batch")


def test_svpo_terms_and_gradients():
    pc, pr, rc, rr, tc, tr = _inputs(n=5, seed=5)
    g = torch.Generator().manual_seed(9)
    vwc = torch.tanh(torch.randn(5, generator=g, dtype=torch.float64)).requires_grad_()
    vwr = torch.tanh(torch.randn(5, generator=g, dtype=torch.float64)).requires_grad_()
    nll = torch.rand(5, generator=g, dtype=torch.float64).requires_grad_()
    w = losses.SVPOWeights(rank=0.25, regulariser=0.001, sft=5.0, value_mse=0.25)
    beta, delta = 0.1, 0.5
    loss, m = losses.svpo_loss(pc, pr, rc, rr, vwc, vwr, nll, beta, delta, w, tc, tr)
    lc, lr_ = pc - rc, pr - rr
    expected = (
        -F.logsigmoid(beta * (lc - lr_))
        + 0.25 * torch.relu(delta - (vwc - vwr))
        + 0.001 * 0.5 * ((beta * lc - vwc) ** 2 + (beta * lr_ - vwr) ** 2)
        + 5.0 * nll
        + 0.25 * 0.5 * ((vwc - (2 * tc - 1)) ** 2 + (vwr - (2 * tr - 1)) ** 2)
    )
    torch.testing.assert_close(loss, expected)
    # The regulariser's value target is detached: its gradient reaches the policy, not the value head.
    grad_v = torch.autograd.grad(m["value_regulariser"].sum() * 0 + loss.sum(), vwc, retain_graph=True)[0]
    no_reg = losses.svpo_loss(pc, pr, rc, rr, vwc, vwr, nll, beta, delta,
                              losses.SVPOWeights(rank=0.25, regulariser=0.0, sft=5.0, value_mse=0.25), tc, tr)[0]
    grad_v_no_reg = torch.autograd.grad(no_reg.sum(), vwc)[0]
    torch.testing.assert_close(grad_v, grad_v_no_reg)
    # Numerical gradients w.r.t. the policy log-probs (stop-gradient makes the value path non-analytic).
    fn = lambda a, b: losses.svpo_loss(a, b, rc.detach(), rr.detach(), vwc.detach(), vwr.detach(), nll.detach(), beta, delta, w, tc, tr)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pc, pr))


def test_rpo_adds_weighted_chosen_nll_and_zero_alpha_is_the_paper_loss():
    pc, pr, rc, rr, vc, vr = _inputs()
    nll = torch.rand(len(pc), dtype=torch.float64) * 3
    base, metrics = losses.step_dpo_loss(pc, pr, rc, rr, vc, vr, 0.1, 1.0)
    with_nll, m2 = losses.add_chosen_nll(base, metrics, nll, 0.5)
    assert torch.allclose(with_nll, base + 0.5 * nll)
    assert torch.equal(m2["chosen_nll"], nll)
    same, _ = losses.add_chosen_nll(base, metrics, nll, 0.0)
    assert same is base


def test_value_loss_is_the_mse_plus_the_sibling_margin_term():
    """prm: (v - (2V - 1))^2 per state + w * relu(delta - (v_w - v_l)) over siblings with V_w - V_l > tau,
    each pair charged to its chosen state; written out loop by loop here."""
    torch.manual_seed(0)
    pred = torch.tanh(torch.randn(7, dtype=torch.float64)).requires_grad_()
    target = torch.tensor([0.9, 0.1, 0.5, 1.0, 0.0, 0.3, 0.35], dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    w, delta, tau = 0.25, 0.5, 0.5
    loss, metrics = losses.value_loss(pred, target, group, rank_weight=w, rank_margin=delta, rank_threshold=tau)
    expected = []
    for i in range(7):
        term = (pred[i].item() - (2 * target[i].item() - 1)) ** 2
        for j in range(7):
            if group[i] == group[j] and target[i] - target[j] > tau:
                term += w * max(0.0, delta - (pred[i].item() - pred[j].item()))
        expected.append(term)
    assert loss.tolist() == pytest.approx(expected, abs=1e-12)
    # pairs: (0,1) in group 0 and (3,4) in group 1; group 2's labels differ by less than tau
    assert metrics["value_rank_pairs"].tolist() == [1, 0, 0, 1, 0, 0, 0]
    plain, _ = losses.value_loss(pred, target, group)
    assert plain.tolist() == pytest.approx([(p - (2 * t - 1)) ** 2 for p, t in zip(pred.tolist(), target.tolist())])
    assert torch.autograd.gradcheck(lambda p: losses.value_loss(p, target, group, w, delta, tau)[0], (pred,))
