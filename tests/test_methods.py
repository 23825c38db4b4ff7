"""The method registry and the built-in methods as objects (issue 19 item 1), each against a plain loop."""

import pytest
import torch

from sparsetrain import methods
from sparsetrain.config import SparsityConfig
from sparsetrain.methods import Method, register, unregister


def _keep_loop(w, n, m):
    """Plain-Python top-n |w| per group of m along the last dim (ties: lowest index)."""
    keep = torch.zeros_like(w, dtype=torch.bool)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], m):
            vals = [abs(float(w[r, g + j])) for j in range(m)]
            order = sorted(range(m), key=lambda j: (-vals[j], j))
            for j in order[:n]:
                keep[r, g + j] = True
    return keep


def _soft_loop(w, n, m):
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], m):
            t = sorted(abs(float(w[r, g + j])) for j in range(m))[m - n - 1]
            for j in range(m):
                x = float(w[r, g + j])
                out[r, g + j] = (1 if x > 0 else -1) * max(abs(x) - t, 0.0)
    return out


def test_builtins_are_registered_in_order():
    assert methods.names()[:4] == ("dense", "ste", "sr-ste", "s-ste")
    assert all(isinstance(methods.get(n), Method) for n in methods.names())
    with pytest.raises(ValueError, match=r"Unknown `method`='sste'; valid choices: 'dense', 'ste', 'sr-ste', 's-ste'"):
        methods.get("sste")


def test_projections_match_plain_loops():
    torch.manual_seed(0)
    w = torch.randn(6, 16, dtype=torch.float64)
    keep = _keep_loop(w, 2, 4)
    w_eff, mask = methods.get("ste").project(w, 2, 4)
    assert torch.equal(mask, keep) and torch.equal(w_eff, w * keep)
    beta = methods.get("s-ste").scale(w, 2, 4)
    s = _soft_loop(w, 2, 4)
    assert torch.allclose(beta.double(), (w * s).sum() / (s * s).sum(), rtol=1e-6)
    w_eff, mask = methods.get("s-ste").project(w, 2, 4, beta)
    assert torch.allclose(w_eff, beta.double() * s, atol=1e-6) and torch.equal(mask, keep)
    assert methods.get("dense").project(w, 2, 4) == (w, None)


def test_sr_ste_step_term_is_the_decay_formula():
    torch.manual_seed(1)
    w, g = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    keep = _keep_loop(w, 2, 4)
    cfg = SparsityConfig(method="sr-ste", srste_decay=0.3)
    grad = g.clone()
    methods.get("sr-ste").add_step_term_(grad, w, keep, cfg, factor=0.5)
    expect = g.clone()
    for i in range(4):
        for j in range(8):
            if not keep[i, j]:
                expect[i, j] += 0.3 * 0.5 * w[i, j]
    assert torch.allclose(grad, expect, atol=1e-15)
    for name in ("dense", "ste", "s-ste"):
        assert not methods.get(name).has_step_term(SparsityConfig(method=name))


def test_scale_stats_add_up_over_row_shards():
    # FSDP2 shards dim 0: the scale from summed per-shard stats equals the whole weight's.
    torch.manual_seed(2)
    w = torch.randn(8, 16)
    sste = methods.get("s-ste")
    parts = sum(sste.scale_stats(part, 2, 4) for part in w.chunk(2, 0))
    assert torch.allclose(sste.scale_from_stats(parts), sste.scale(w, 2, 4), rtol=1e-6)


class _Half(Method):
    """A toy method: W~ = W / 2 (no projection), to show that the config and the layer read the registry."""

    name = "toy-half"
    summary = "W~ = W / 2 (a test method)"
    mode = None
    options = {"k": 1}

    def project(self, w, n, m, scale=None, ramp=1.0, need_mask=True):
        return w / 2, torch.ones_like(w, dtype=torch.bool)

    def backward(self, grad):
        return grad / 2


def test_a_registered_method_is_a_config_choice_and_runs_in_a_layer():
    register(_Half)
    try:
        cfg = SparsityConfig(method="toy-half", method_options={"k": 3})
        assert cfg.rule.resolved_options(cfg) == {"k": 3}
        w = torch.randn(3, 4, requires_grad=True)
        out = methods.effective_weight(w, "toy-half")
        assert torch.equal(out, w.detach() / 2)
        out.sum().backward()
        assert torch.equal(w.grad, torch.full_like(w, 0.5))  # the method's backward rule, not straight-through
        with pytest.raises(ValueError, match="registered already"):
            register(type("Other", (Method,), {"name": "toy-half"}))
    finally:
        unregister("toy-half")
    with pytest.raises(ValueError, match="Unknown `method`='toy-half'"):
        SparsityConfig(method="toy-half")
