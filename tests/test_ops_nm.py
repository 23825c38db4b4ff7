"""N:M masks, projection, soft threshold and beta against plain-Python loops over groups."""

import random

import pytest
import torch

from reference import loop_mask, loop_soft
from sparsetrain.ops import nm_mask, project_nm, soft_threshold, sste_scale

NM = [(2, 4), (4, 8), (1, 4), (3, 4), (2, 8)]


def sample(rows, cols, seed, with_ties=True):
    rnd = random.Random(seed)
    vals = [[rnd.gauss(0, 1) for _ in range(cols)] for _ in range(rows)]
    if with_ties:
        for r in range(rows):
            for c in range(cols):
                u = rnd.random()
                if u < 0.15:
                    vals[r][c] = 0.0
                elif u < 0.3:
                    vals[r][c] = rnd.choice([-1.0, 1.0, 0.5, -0.5])  # many exact ties, both signs
    return vals


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("seed", [0, 1])
def test_mask_and_projection_match_loop(n, m, seed):
    vals = sample(6, 4 * m, seed)
    w = torch.tensor(vals, dtype=torch.float64)
    expect = torch.tensor(loop_mask(vals, n, m))
    assert torch.equal(nm_mask(w, n, m), expect)
    assert torch.equal(project_nm(w, n, m), w * expect)


def test_mask_ties_lowest_index():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [2.0, 3.0, 3.0, -3.0]])
    assert nm_mask(w).tolist() == [[True, True, False, False], [True, True, False, False], [False, True, True, False]]


def test_mask_leading_dims_and_dtypes():
    w = torch.randn(2, 3, 16)
    flat = nm_mask(w.reshape(6, 16))
    assert torch.equal(nm_mask(w), flat.reshape(2, 3, 16))
    for dt in (torch.bfloat16, torch.float16):
        wl = w.to(dt)
        expect = torch.tensor(loop_mask(wl.float().reshape(6, 16).tolist(), 2, 4)).reshape(2, 3, 16)
        assert torch.equal(nm_mask(wl), expect)


def test_large_m_uses_same_rule():
    vals = sample(4, 64, 3)
    w = torch.tensor(vals)
    assert torch.equal(nm_mask(w, 16, 32), torch.tensor(loop_mask(vals, 16, 32)))


@pytest.mark.parametrize("n,m", NM)
def test_soft_threshold_matches_loop(n, m):
    vals = sample(5, 3 * m, 7)
    w = torch.tensor(vals, dtype=torch.float64)
    s = soft_threshold(w, n, m)
    assert torch.allclose(s, torch.tensor(loop_soft(vals, n, m), dtype=torch.float64), atol=0, rtol=0)
    # at most n non-zeros per group
    assert ((s != 0).reshape(5, 3, m).sum(-1) <= n).all()


@pytest.mark.parametrize("n,m", NM)
def test_beta_matches_closed_form(n, m):
    vals = sample(5, 3 * m, 11)
    s = loop_soft(vals, n, m)
    num = sum(a * b for ra, rb in zip(vals, s) for a, b in zip(ra, rb))
    den = sum(b * b for rb in s for b in rb)
    beta = sste_scale(torch.tensor(vals), n, m)
    assert beta.dim() == 0 and beta.dtype == torch.float32
    assert beta.item() == pytest.approx(num / den, rel=1e-5)
    assert beta.item() >= 1.0  # <w,S> >= <S,S> since |w_i| >= |S_i| with the same sign


def test_beta_of_zero_weight_is_one():
    assert sste_scale(torch.zeros(2, 8)).item() == 1.0


def test_soft_threshold_continuous_projection_not():
    torch.manual_seed(0)
    # Two entries nearly tied for the 2nd place: a tiny perturbation flips the hard mask.
    w = torch.tensor([[1.0, 0.5, 0.5 + 1e-6, 0.1]], dtype=torch.float64)
    w2 = w.clone()
    w2[0, 1] += 2e-6
    eps = (w2 - w).abs().max()
    assert (soft_threshold(w2) - soft_threshold(w)).abs().max() <= 2 * eps + 1e-15
    assert (project_nm(w2) - project_nm(w)).abs().max() > 0.4
    # And over random perturbations, S is 2-Lipschitz in the max norm (|t| moves by at most eps).
    for _ in range(50):
        a = torch.randn(8, 32, dtype=torch.float64)
        d = torch.randn_like(a) * 1e-7
        assert (soft_threshold(a + d) - soft_threshold(a)).abs().max() <= 2 * d.abs().max() + 1e-15


@pytest.mark.parametrize("fn", [nm_mask, project_nm, soft_threshold, sste_scale])
def test_bad_nm_errors(fn):
    w = torch.randn(2, 8)
    with pytest.raises(ValueError, match="0 < n < m"):
        fn(w, 0, 4)
    with pytest.raises(ValueError, match="0 < n < m"):
        fn(w, 4, 4)
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        fn(torch.randn(2, 6), 2, 4)
