"""MVUE 2:4: sparsity pattern, unbiasedness (Monte Carlo within a variance bound), variance order,
inclusion probabilities against closed forms written out here, reproducibility."""

import itertools

import pytest
import torch

from reference import exact_mvue_probabilities
from sparsetrain.ops import mvue24, mvue24_probabilities


exact_probs = exact_mvue_probabilities  # the plain water-filling loop of tests/reference.py


def approx_probs(a, eps=1e-30):
    """P(i is one of two sequential draws, first by a_i/S, second among the rest by a), by enumeration."""
    a = [x + eps for x in a]
    s = sum(a)
    p = [0.0] * 4
    for i, j in itertools.permutations(range(4), 2):
        pr = a[i] / s * a[j] / sum(a[k] for k in range(4) if k != i)
        p[i] += pr
        p[j] += pr
    return p


def groups_for_test():
    torch.manual_seed(0)
    g = torch.randn(64, 4)
    g[0] = torch.tensor([5.0, 1.0, 0.5, 0.25])  # largest dominates: kept surely
    g[1] = torch.tensor([0.0, 0.0, 0.0, 0.0])
    g[2] = torch.tensor([0.0, 3.0, 0.0, 0.0])  # a single non-zero
    g[3] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # ties
    g[4] = torch.tensor([0.0, 2.0, -1.0, 0.0])  # exactly two non-zeros
    g[5] = torch.tensor([2.0, 1.0, 1.0, 0.0])  # largest equals the sum of the rest
    return g


@pytest.mark.parametrize("method,ref", [("exact", exact_probs), ("approx", approx_probs)])
def test_probabilities_match_closed_form(method, ref):
    g = groups_for_test()
    p = mvue24_probabilities(g.abs(), method)
    expect = torch.tensor([ref(row.abs().tolist()) for row in g])
    assert torch.allclose(p, expect, atol=1e-6)
    if method == "exact":
        nz = (g != 0).sum(-1)
        assert torch.allclose(p.sum(-1)[nz >= 2], torch.full_like(p.sum(-1)[nz >= 2], 2.0), atol=1e-6)


@pytest.mark.parametrize("method", ["exact", "approx"])
def test_pattern_and_values(method):
    gen = torch.Generator().manual_seed(1)
    g = groups_for_test().reshape(8, 32)
    for _ in range(20):
        out = mvue24(g, method=method, generator=gen)
        grp_out, grp_g = out.reshape(-1, 4), g.reshape(-1, 4)
        assert ((grp_out != 0).sum(-1) <= 2).all()
        if method == "exact":
            # exactly min(2, non-zeros) kept per group
            assert torch.equal((grp_out != 0).sum(-1), (grp_g != 0).sum(-1).clamp(max=2))
        # kept entries keep their sign, never shrink, and zeros stay zero
        kept = grp_out != 0
        assert (torch.sign(grp_out[kept]) == torch.sign(grp_g[kept])).all()
        assert (grp_out[kept].abs() >= grp_g[kept].abs() - 1e-6).all()
    assert torch.equal(mvue24(torch.zeros(3, 8), method=method), torch.zeros(3, 8))


@pytest.mark.parametrize("method", ["exact", "approx"])
def test_unbiased_monte_carlo(method):
    g = groups_for_test().reshape(4, 64)
    gen = torch.Generator().manual_seed(2)
    draws = 6000
    stack = torch.stack([mvue24(g, method=method, generator=gen) for _ in range(draws)]).double()
    mean, std = stack.mean(0), stack.std(0)
    # each entry's sample mean is within 5 standard errors (plus float noise) of the input
    bound = 5 * std / draws**0.5 + 1e-5
    assert ((mean - g.double()).abs() <= bound).all()


def test_exact_variance_not_larger_than_approx():
    torch.manual_seed(3)
    g = torch.randn(16, 64) * torch.rand(16, 64) ** 2  # uneven magnitudes make the gap visible
    gen = torch.Generator().manual_seed(4)
    draws = 3000
    var = {}
    for method in ("exact", "approx"):
        stack = torch.stack([mvue24(g, method=method, generator=gen) for _ in range(draws)]).double()
        var[method] = stack.var(0).sum().item()
    # The theoretical minimum: sum g^2 (1/p - 1) with the exact probabilities.
    p = torch.tensor([exact_probs(r) for r in g.abs().reshape(-1, 4).tolist()], dtype=torch.float64)
    gg = g.double().reshape(-1, 4) ** 2
    theory = torch.where(p > 0, gg * (1 / p.clamp_min(1e-300) - 1), torch.zeros_like(gg)).sum().item()
    assert var["exact"] == pytest.approx(theory, rel=0.1)
    assert var["exact"] <= var["approx"]


@pytest.mark.parametrize("method", ["exact", "approx"])
def test_generator_reproducible_and_dim(method):
    g = torch.randn(12, 10)
    a = mvue24(g, dim=0, method=method, generator=torch.Generator().manual_seed(5))
    b = mvue24(g, dim=0, method=method, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert ((a.t().reshape(10, 3, 4) != 0).sum(-1) <= 2).all()  # groups run along dim 0
    assert a.dtype == g.dtype
    h = mvue24(g.to(torch.bfloat16), dim=0, method=method)
    assert h.dtype == torch.bfloat16


def test_mvue_errors():
    with pytest.raises(ValueError, match="valid choices: 'exact', 'approx'"):
        mvue24(torch.randn(4, 4), method="fast")
    with pytest.raises(ValueError, match="not a multiple of 4"):
        mvue24(torch.randn(4, 6))
    with pytest.raises(TypeError, match="floating"):
        mvue24(torch.ones(4, 4, dtype=torch.long))


@pytest.mark.parametrize("method", ["exact", "approx"])
def test_compiled_cpu_path_matches_eager(method, monkeypatch):
    """Large CPU gradients go through an inductor-compiled copy of the same estimator."""
    import sparsetrain.ops.mvue as mv

    g = torch.randn(1024, 1024)  # 2^20 entries: at the compile threshold
    assert g.numel() >= mv._COMPILE_MIN_NUMEL
    monkeypatch.setattr(mv._COMPILED, "disabled", False)
    fast = mvue24(g, dim=0, method=method, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(mv._COMPILED, "disabled", True)
    eager = mvue24(g, dim=0, method=method, generator=torch.Generator().manual_seed(3))
    if method == "exact":
        assert torch.equal(fast, eager)
    else:  # same draws; the fused loop may round 1/p in the last bit
        assert torch.equal(fast != 0, eager != 0)
        assert torch.allclose(fast, eager, rtol=1e-6, atol=0)


def test_compile_failure_falls_back_to_eager_once(monkeypatch):
    import sparsetrain.ops.mvue as mv

    def broken(*args):
        raise OSError("no C++ compiler")

    monkeypatch.setattr(mv._COMPILED, "disabled", False)
    monkeypatch.setattr(mv._COMPILED, "fn", broken)
    g = torch.randn(1024, 1024)
    with pytest.warns(UserWarning, match="torch.compile failed here.*SPARSETRAIN_COMPILE=0"):
        out = mvue24(g, dim=0, generator=torch.Generator().manual_seed(1))
    assert mv._COMPILED.disabled
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither retries nor warns again
        again = mvue24(g, dim=0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_compile_bug_is_not_swallowed(monkeypatch):
    """An error that is not about the environment (a bug) propagates instead of turning compilation off."""
    import sparsetrain.ops.mvue as mv

    def buggy(*args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(mv._COMPILED, "disabled", False)
    monkeypatch.setattr(mv._COMPILED, "fn", buggy)
    with pytest.raises(ZeroDivisionError):
        mvue24(torch.randn(1024, 1024), dim=0)
    assert not mv._COMPILED.disabled
