"""CAST (sparsetrain/methods/cast.py) against a plain hand-written loop of its update rule."""

import math

import pytest
import torch
import torch.nn as nn

import sparsetrain as st
from sparsetrain import methods
from sparsetrain.config import SparsityConfig


def _top2_of_4(w):
    """Plain-Python N:M mask (2 of every 4 along rows, ties to the lowest index)."""
    keep = torch.zeros_like(w, dtype=torch.bool)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], 4):
            vals = [abs(float(w[r, g + j])) for j in range(4)]
            for j in sorted(range(4), key=lambda j: (-vals[j], j))[:2]:
                keep[r, g + j] = True
    return keep


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8, dtype=torch.float64)

    def forward(self, x):
        return self.fc(x)


def _reference(w0, b0, x, y, steps, lr, decay, ramp, betas=(0.9, 0.999), eps=1e-8):
    """CAST by hand: W~ = s * (W * M), straight-through, grad += decay_t * sign(W) * (1 - M), Adam."""
    w, b = w0.clone(), b0.clone()
    keep0 = _top2_of_4(w)
    s = math.sqrt(float((w * w).sum()) / float(((w * keep0) ** 2).sum()))
    s = float(torch.tensor(s, dtype=torch.float32))  # the layer keeps its scale in a float32 buffer, as S-STE's beta
    state = {k: [torch.zeros_like(t), torch.zeros_like(t)] for k, t in (("w", w), ("b", b))}
    for t in range(steps):
        keep = _top2_of_4(w)
        w_eff = (s * w * keep).requires_grad_(True)
        bb = b.clone().requires_grad_(True)
        loss = ((x @ w_eff.t() + bb - y) ** 2).mean()
        g_weff, g_b = torch.autograd.grad(loss, (w_eff, bb))
        factor = min(1.0, t / ramp)
        g_w = g_weff.clone()  # straight-through: dL/dW = dL/dW~
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                if not keep[i, j]:
                    g_w[i, j] += decay * factor * (1.0 if w[i, j] > 0 else -1.0 if w[i, j] < 0 else 0.0)
        for key, p, g in (("w", w, g_w), ("b", b, g_b)):
            m, v = state[key]
            m.mul_(betas[0]).add_((1 - betas[0]) * g)
            v.mul_(betas[1]).add_((1 - betas[1]) * g * g)
            m_hat, v_hat = m / (1 - betas[0] ** (t + 1)), v / (1 - betas[1] ** (t + 1))
            p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    return w, b, s


def test_cast_trains_as_its_hand_written_update_rule():
    torch.manual_seed(0)
    net = _Net()
    x, y = torch.randn(32, 16, dtype=torch.float64), torch.randn(32, 8, dtype=torch.float64)
    w0, b0 = net.fc.weight.detach().clone(), net.fc.bias.detach().clone()
    steps, lr, decay, ramp = 6, 1e-2, 0.05, 3
    cfg = SparsityConfig(method="cast", targets="fc", decay_ramp=ramp, method_options={"decay": decay})
    sparsity = st.Sparsifier(net, cfg)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sparsity.attach(opt, max_steps=steps)
    for _ in range(steps):
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    w_ref, b_ref, s = _reference(w0, b0, x, y, steps, lr, decay, ramp)
    layer = net.fc
    assert float(layer.beta) == pytest.approx(s, rel=1e-6)  # the frozen scale
    assert torch.allclose(layer.weight.detach(), w_ref, atol=1e-10, rtol=0)
    assert torch.allclose(layer.bias.detach(), b_ref, atol=1e-10, rtol=0)
    w_eff = layer.effective_weight()
    assert torch.allclose(w_eff, float(layer.beta) * w_ref * _top2_of_4(w_ref), atol=1e-6)
    assert sparsity.metrics["sparsity/beta_mean"] == pytest.approx(float(layer.beta))


def test_cast_decay_pulls_pruned_weights_down_and_leaves_kept_ones():
    # With no loss gradient, the decay alone moves pruned weights toward zero by ~lr per Adam step
    # (the adaptive part: Adam divides the term by its own size) and kept weights not at all.
    torch.manual_seed(1)
    net = _Net()
    sparsity = st.Sparsifier(net, SparsityConfig(method="cast", targets="fc", method_options={"decay": 1e-3}))
    opt = torch.optim.Adam([net.fc.weight], lr=1e-3)
    sparsity.attach(opt)
    w0 = net.fc.weight.detach().clone()
    keep = _top2_of_4(w0)
    net.fc.weight.grad = torch.zeros_like(w0)
    opt.step()
    moved = net.fc.weight.detach() - w0
    assert torch.equal(moved[keep], torch.zeros_like(moved[keep]))
    assert torch.allclose(moved[~keep], -1e-3 * torch.sign(w0[~keep]), rtol=1e-4, atol=0)


def test_cast_options_and_scale():
    with pytest.raises(ValueError, match=r"`method_options\['decay'\]` for method='cast' must be a finite number >= 0"):
        SparsityConfig(method="cast", method_options={"decay": -1.0})
    with pytest.raises(ValueError, match=r"Unknown `method_options` key 'lambda' for method='cast'; valid keys: 'decay'"):
        SparsityConfig(method="cast", method_options={"lambda": 1.0})
    with pytest.raises(ValueError, match=r"`transposable=True` is supported for method 'ste', 'sr-ste'"):
        SparsityConfig(method="cast", transposable=True)
    assert SparsityConfig(method="cast", decay_ramp=4).decay_ramp == 4  # CAST's decay can ramp
    cast = methods.get("cast")
    w = torch.randn(4, 8, dtype=torch.float64)
    keep = _top2_of_4(w)
    assert float(cast.scale(w, 2, 4)) == pytest.approx(float(w.norm() / (w * keep).norm()), rel=1e-6)
    parts = sum(cast.scale_stats(p, 2, 4) for p in w.chunk(2, 0))  # FSDP2 row shards add up
    assert float(cast.scale_from_stats(parts)) == pytest.approx(float(cast.scale(w, 2, 4)), rel=1e-6)
    assert "cast" in st.SparsityConfig.__doc__  # the config's docs and the CLI help list it
