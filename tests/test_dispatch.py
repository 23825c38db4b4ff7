"""Each `ops` function with a Triton twin picks it itself: the kernel when `kernels.available`
says so, the torch reference otherwise. The kernels are replaced by recording stand-ins here (their
results are checked against the references in test_kernels.py); the reference results are checked
against plain loops and brute force."""

import itertools

import pytest
import torch

from reference import loop_mask
from sparsetrain import kernels, ops


class _Spy:
    """Stands in for a kernel: records its arguments and returns a marker value."""

    def __init__(self, result):
        self.calls, self.result = [], result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


@pytest.fixture
def spies(monkeypatch):
    made = {}
    for name in ("project_weight", "mvue24", "transposable24"):
        made[name] = _Spy(object())
        monkeypatch.setattr(kernels, name, made[name])
    return made


def _set_available(monkeypatch, value):
    monkeypatch.setattr(kernels, "available", lambda t: value and isinstance(t, torch.Tensor))


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_project_routes(monkeypatch, spies, mode):
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    beta = 1.5 if mode == "soft" else None
    _set_available(monkeypatch, True)
    assert ops.nm.project(w, 2, 4, mode, beta) is spies["project_weight"].result
    assert spies["project_weight"].calls == [((w, 2, 4, mode, beta), {})]
    _set_available(monkeypatch, False)
    w_eff, mask = ops.nm.project(w, 2, 4, mode, beta)
    assert len(spies["project_weight"].calls) == 1
    want = torch.tensor(loop_mask(w.tolist(), 2, 4))
    assert torch.equal(mask, want)
    if mode == "hard":
        assert torch.equal(w_eff, w * want)
    else:  # beta * (|w| - t) * sign(w) on the kept entries, t the 2nd smallest |w| of the group
        t = w.abs().view(4, 2, 4).sort(-1).values[..., 1:2].expand(4, 2, 4).reshape(4, 8)
        torch.testing.assert_close(w_eff, 1.5 * torch.sign(w) * (w.abs() - t).clamp_min(0), rtol=0, atol=1e-6)


def test_mvue_routes(monkeypatch, spies):
    g = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    out = torch.empty(12, 8).t()
    _set_available(monkeypatch, True)
    assert ops.mvue24(g, 0, "approx", gen, out=out) is spies["mvue24"].result
    ((args, kwargs),) = spies["mvue24"].calls
    assert args == (g, 0, "approx", gen) and kwargs["out"] is out and kwargs["uniforms"] is None
    # Bad arguments are refused by ops before any kernel runs.
    with pytest.raises(ValueError, match="not a multiple of 4"):
        ops.mvue24(torch.zeros(6))
    with pytest.raises(ValueError, match="`out` must match"):
        ops.mvue24(g, 0, out=torch.empty(8, 8))
    assert len(spies["mvue24"].calls) == 1

    _set_available(monkeypatch, False)
    res = ops.mvue24(g, 0, "exact", gen, out=out)
    assert res is out and len(spies["mvue24"].calls) == 1
    groups = res.t().reshape(12, 2, 4)  # groups of 4 along dim 0
    gg = g.t().reshape(12, 2, 4)
    assert bool(((groups != 0).sum(-1) == 2).all())  # no zero in g: exactly two kept per group
    kept = groups != 0
    # a kept entry is g_i / p_i: the same sign, never smaller in magnitude
    assert bool((torch.sign(groups[kept]) == torch.sign(gg[kept])).all())
    assert bool((groups[kept].abs() >= gg[kept].abs() * (1 - 1e-6)).all())


def _brute_force_kept(score):
    """The best kept score of every 4x4 tile over all tiles with two ones per row and column."""
    rows = [r for r in itertools.product([0, 1], repeat=4) if sum(r) == 2]
    pats = torch.stack([torch.tensor(t, dtype=torch.float64) for t in itertools.product(rows, repeat=4)])
    pats = pats[(pats.sum(1) == 2).all(-1)]  # (90, 4, 4)
    r, c = score.shape
    tiles = score.double().view(r // 4, 4, c // 4, 4).permute(0, 2, 1, 3)
    return torch.einsum("abij,kij->abk", tiles, pats).max(-1).values


@pytest.mark.parametrize("method", ["auto", "exact24"])
def test_transposable_routes(monkeypatch, spies, method):
    score = torch.rand(8, 12, generator=torch.Generator().manual_seed(3))
    _set_available(monkeypatch, True)
    assert ops.transposable_mask(score, 2, 4, method=method) is spies["transposable24"].result
    assert spies["transposable24"].calls == [((score,), {})]
    # Not the kernel's problem: another N:M, another solver, a float64 score (the kernel sums in
    # float32, so its ties could differ) and an integer score stay on the reference.
    ops.transposable_mask(torch.rand(8, 8), 4, 8, method="auto")
    ops.transposable_mask(score, 2, 4, method="tsenor")
    ops.transposable_mask(score.double(), 2, 4, method=method)
    ops.transposable_mask((score * 100).int(), 2, 4, method=method)
    with pytest.raises(ValueError, match="non-negative"):  # checked by ops before the kernel
        ops.transposable_mask(-score, 2, 4, method=method)
    assert len(spies["transposable24"].calls) == 1

    _set_available(monkeypatch, False)
    mask = ops.transposable_mask(score, 2, 4, method=method)
    assert len(spies["transposable24"].calls) == 1
    tiles = mask.view(2, 4, 3, 4)
    assert bool((tiles.sum(1) == 2).all()) and bool((tiles.sum(3) == 2).all())
    kept = (score.double() * mask).view(2, 4, 3, 4).sum((1, 3))
    torch.testing.assert_close(kept, _brute_force_kept(score), rtol=1e-6, atol=0)


def test_backends_call_ops_only(monkeypatch, spies):
    """The backends' MVUE goes through `ops.mvue24`, so the kernel is picked there."""
    from sparsetrain.backends import _common

    dy = torch.randn(6, 8)
    x = torch.randn(6, 5)
    _set_available(monkeypatch, True)
    g, xp = _common.mvue_tokens(dy, x, "exact", None)
    assert g is spies["mvue24"].result and xp.shape == (8, 5)
    ((args, _),) = spies["mvue24"].calls
    assert args[0].shape == (8, 8) and torch.equal(args[0][:6], dy) and args[1] == 0

    from sparsetrain.backends import cusparselt

    dy8 = torch.randn(8, 12)  # tokens already padded, as the backend pads them
    g_t = cusparselt._mvue_tokens_t(dy8, "approx", None)
    (_, (args, kwargs)) = spies["mvue24"].calls
    assert args[0] is dy8 and kwargs["out"].data_ptr() == g_t.data_ptr()
    assert g_t.shape == (12, 8) and kwargs["out"].shape == (8, 12)  # written as the transpose
