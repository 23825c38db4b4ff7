"""Tests for `sparsetrain.ops.transposable` against independent references.

References: brute force over every 0/1 4x4 tile (enumerated here with itertools), a single-tile LP
written out here and solved by SciPy, a planted unique optimum, and a loop-based validity check.
"""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from sparsetrain.ops import TRANSPOSABLE_METHODS, transposable_error, transposable_mask
from sparsetrain.ops.transposable import (
    _augment_tile,
    _greedy_round,
    _greedy_round_fast,
    _repair,
    is_transposable_nm,
)

NM = [(2, 4), (4, 8), (8, 16), (16, 32)]
SOLVERS = ["exact24", "optimal", "tsenor", "greedy", "auto"]


# ----------------------------------------------------------------------------- references


def _tile_ok(mask: torch.Tensor, n: int, m: int) -> bool:
    """Loop over tiles, rows and columns: exactly n kept in each."""
    rows, cols = mask.shape
    for r0 in range(0, rows, m):
        for c0 in range(0, cols, m):
            tile = mask[r0 : r0 + m, c0 : c0 + m].to(torch.int64)
            for k in range(m):
                if int(tile[k].sum()) != n or int(tile[:, k].sum()) != n:
                    return False
    return True


def _all_patterns(n: int, m: int = 4) -> torch.Tensor:
    """Every m x m 0/1 matrix with n ones per row and per column, by filtering all 2^(m*m)."""
    pats = []
    for bits in itertools.product((0, 1), repeat=m * m):
        a = np.array(bits).reshape(m, m)
        if (a.sum(0) == n).all() and (a.sum(1) == n).all():
            pats.append(a)
    return torch.tensor(np.stack(pats), dtype=torch.float64)  # (P, m, m)


PATTERNS_4 = {n: _all_patterns(n) for n in (1, 2, 3)}


def _brute_best(tile: torch.Tensor, n: int) -> tuple:
    """(best kept mass, best pattern) of a 4x4 tile by trying every valid pattern."""
    pats = PATTERNS_4[n]
    values = (pats * tile.to(torch.float64)).sum((-1, -2))
    best = int(values.argmax())
    return float(values[best]), pats[best] > 0


def _lp_tile(tile: np.ndarray, n: int) -> float:
    """Optimal kept mass of one tile from its LP relaxation, constraints written out densely."""
    m = tile.shape[0]
    a_eq = np.zeros((2 * m, m * m))
    for i in range(m):
        for j in range(m):
            a_eq[i, i * m + j] = 1.0  # row i
            a_eq[m + j, i * m + j] = 1.0  # column j
    res = linprog(-tile.ravel(), A_eq=a_eq, b_eq=np.full(2 * m, n), bounds=(0, 1), method="highs")
    assert res.status == 0
    return -res.fun


def _kept(score: torch.Tensor, mask: torch.Tensor) -> float:
    return float((score.to(torch.float64) * mask.to(torch.float64)).sum())


def _planted(n: int, m: int, tiles_r: int, tiles_c: int, seed: int) -> tuple:
    """A score whose every tile has a clear unique optimum: a random n-regular pattern scored ~1,
    everything else ~0.1. Returns (score, the planted mask)."""
    g = torch.Generator().manual_seed(seed)
    score = torch.empty(tiles_r * m, tiles_c * m)
    mask = torch.zeros(tiles_r * m, tiles_c * m, dtype=torch.bool)
    for r in range(tiles_r):
        for c in range(tiles_c):
            # A circulant n-regular pattern with permuted rows and columns.
            base = torch.zeros(m, m, dtype=torch.bool)
            for k in range(n):
                base |= torch.eye(m, dtype=torch.bool).roll(k, 1)
            base = base[torch.randperm(m, generator=g)][:, torch.randperm(m, generator=g)]
            noise = 0.1 * torch.rand(m, m, generator=g)
            score[r * m : (r + 1) * m, c * m : (c + 1) * m] = torch.where(base, 1.0 + noise, noise)
            mask[r * m : (r + 1) * m, c * m : (c + 1) * m] = base
    return score, mask


def _scores(kind: str, m: int, seed: int = 0) -> torch.Tensor:
    """2 x 3 tiles (non-square, so swapped dims would show) of one kind of score."""
    g = torch.Generator().manual_seed(seed)
    shape = (2 * m, 3 * m)
    if kind == "gaussian":
        return torch.randn(shape, generator=g).abs()
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "constant":
        return torch.full(shape, 0.7)
    if kind == "ties":
        return torch.randint(0, 3, shape, generator=g).float()
    if kind == "mixed":  # some all-zero tiles, one huge outlier, tiny values
        s = torch.rand(shape, generator=g) * 1e-3
        s[:m, :m] = 0.0
        s[m + 1, 2] = 1e6
        s[:m, 2 * m :] = 0.0
        return s
    raise KeyError(kind)


# ----------------------------------------------------------------------------- validity


@pytest.mark.parametrize("kind", ["gaussian", "zeros", "constant", "ties", "mixed"])
@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("method", SOLVERS)
def test_masks_are_valid(method, n, m, kind):
    if method == "exact24" and (n, m) != (2, 4):
        pytest.skip("exact24 is 2:4 only (its error is tested below)")
    score = _scores(kind, m)
    mask = transposable_mask(score, n, m, method=method)
    assert mask.dtype == torch.bool and mask.shape == score.shape
    assert _tile_ok(mask, n, m)
    assert _tile_ok(mask.T.contiguous(), n, m)


def test_pattern_count():
    assert len(PATTERNS_4[2]) == 90
    assert len(PATTERNS_4[1]) == 24 and len(PATTERNS_4[3]) == 24  # permutation matrices / complements


def test_is_transposable_nm_matches_loop():
    g = torch.Generator().manual_seed(3)
    good = transposable_mask(torch.rand(8, 16, generator=g), 2, 4, method="exact24")
    assert is_transposable_nm(good, 2, 4)
    row_nm_only = torch.zeros(4, 4, dtype=torch.bool)
    row_nm_only[:, :2] = True  # 2 per row, but columns hold 4 and 0
    assert not is_transposable_nm(row_nm_only, 2, 4) and not _tile_ok(row_nm_only, 2, 4)
    bad = good.clone()
    bad[0, 0] = ~bad[0, 0]
    assert not is_transposable_nm(bad, 2, 4) and not _tile_ok(bad, 2, 4)


# ----------------------------------------------------------------------------- exactness


def test_exact24_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    score = torch.rand(16, 24, dtype=torch.float64, generator=g)
    mask = transposable_mask(score, 2, 4, method="exact24")
    for r0 in range(0, 16, 4):
        for c0 in range(0, 24, 4):
            tile = score[r0 : r0 + 4, c0 : c0 + 4]
            best, pattern = _brute_best(tile, 2)
            got = mask[r0 : r0 + 4, c0 : c0 + 4]
            # Continuous random scores: the optimum is unique, so the mask itself must match.
            assert torch.equal(got, pattern)
            assert _kept(tile, got) == pytest.approx(best, rel=1e-12)


def test_exact24_ties_reach_the_optimum_value():
    g = torch.Generator().manual_seed(2)
    score = torch.randint(0, 3, (12, 12), generator=g).float()
    mask = transposable_mask(score, 2, 4, method="exact24")
    for r0 in range(0, 12, 4):
        for c0 in range(0, 12, 4):
            tile = score[r0 : r0 + 4, c0 : c0 + 4]
            assert _kept(tile, mask[r0 : r0 + 4, c0 : c0 + 4]) == _brute_best(tile, 2)[0]
    assert torch.equal(mask, transposable_mask(score, 2, 4, method="exact24"))  # deterministic


@pytest.mark.parametrize("n", [1, 2, 3])
def test_optimal_equals_brute_force_m4(n):
    g = torch.Generator().manual_seed(10 + n)
    score = torch.rand(12, 16, dtype=torch.float64, generator=g)
    mask = transposable_mask(score, n, 4, method="optimal")
    for r0 in range(0, 12, 4):
        for c0 in range(0, 16, 4):
            tile = score[r0 : r0 + 4, c0 : c0 + 4]
            best, pattern = _brute_best(tile, n)
            assert torch.equal(mask[r0 : r0 + 4, c0 : c0 + 4], pattern)
            assert _kept(tile, mask[r0 : r0 + 4, c0 : c0 + 4]) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("n,m", [(2, 8), (4, 8), (6, 8), (8, 16)])
def test_optimal_matches_single_tile_lp(n, m):
    g = torch.Generator().manual_seed(20 + n)
    score = torch.randn(2 * m, 2 * m, dtype=torch.float64, generator=g).abs()
    mask = transposable_mask(score, n, m, method="optimal")
    for r0 in range(0, 2 * m, m):
        for c0 in range(0, 2 * m, m):
            tile = score[r0 : r0 + m, c0 : c0 + m]
            assert _kept(tile, mask[r0 : r0 + m, c0 : c0 + m]) == pytest.approx(_lp_tile(tile.numpy(), n), rel=1e-9)


@pytest.mark.parametrize("n,m", NM)
def test_tsenor_and_optimal_find_a_planted_unique_optimum(n, m):
    score, planted = _planted(n, m, 2, 2, seed=n)
    assert torch.equal(transposable_mask(score, n, m, method="tsenor"), planted)
    assert torch.equal(transposable_mask(score, n, m, method="optimal"), planted)


@pytest.mark.parametrize("n,m", [(4, 8), (8, 16)])
def test_tsenor_close_to_lp_and_greedy_within_half(n, m):
    g = torch.Generator().manual_seed(5)
    score = torch.randn(4 * m, 4 * m, generator=g).abs()
    best = sum(
        _lp_tile(score[r : r + m, c : c + m].double().numpy(), n)
        for r in range(0, 4 * m, m)
        for c in range(0, 4 * m, m)
    )
    tsenor = _kept(score, transposable_mask(score, n, m, method="tsenor"))
    greedy = _kept(score, transposable_mask(score, n, m, method="greedy"))
    assert tsenor >= 0.99 * best and tsenor <= best * (1 + 1e-9)
    assert greedy >= 0.5 * best  # the 2-approximation guarantee survives the repair


def test_tsenor_is_scale_invariant_and_deterministic():
    g = torch.Generator().manual_seed(7)
    score = torch.randn(32, 32, generator=g).abs()
    ref = transposable_mask(score, 4, 8, method="tsenor")
    assert torch.equal(ref, transposable_mask(score, 4, 8, method="tsenor"))
    assert torch.equal(ref, transposable_mask(score * 1e-20, 4, 8, method="tsenor"))
    assert torch.equal(ref, transposable_mask(score * 1e20, 4, 8, method="tsenor"))


@pytest.mark.parametrize("method,n,m", [("tsenor", 8, 16), ("greedy", 8, 16), ("optimal", 2, 4), ("exact24", 2, 4)])
@pytest.mark.parametrize("shape", [(16, 16), (32, 48)])
def test_score_is_not_modified(method, n, m, shape):
    score = torch.rand(shape, generator=torch.Generator().manual_seed(11))
    before = score.clone()
    transposable_mask(score, n, m, method=method)
    assert torch.equal(score, before)


def test_transpose_of_unique_optimum():
    g = torch.Generator().manual_seed(8)
    score = torch.rand(8, 16, dtype=torch.float64, generator=g)
    for method, (n, m) in (("exact24", (2, 4)), ("optimal", (3, 4)), ("optimal", (4, 8))):
        assert torch.equal(
            transposable_mask(score.T.contiguous(), n, m, method=method),
            transposable_mask(score, n, m, method=method).T,
        )


# ----------------------------------------------------------------------------- rounding and repair


def _loop_greedy(tile: torch.Tensor, n: int) -> torch.Tensor:
    """Textbook greedy: entries in descending value (ties: lower flat index), keep while open."""
    m = tile.shape[0]
    flat = tile.flatten().tolist()
    keep = torch.zeros(m, m, dtype=torch.bool)
    rows, cols = [0] * m, [0] * m
    for idx in sorted(range(m * m), key=lambda e: (-flat[e], e)):
        i, j = divmod(idx, m)
        if rows[i] < n and cols[j] < n:
            keep[i, j] = True
            rows[i] += 1
            cols[j] += 1
    return keep


@pytest.mark.parametrize("n,m", [(2, 4), (3, 8), (8, 16)])
def test_greedy_rounding_matches_loop(n, m):
    key = torch.rand(6, m, m, generator=torch.Generator().manual_seed(m))
    ref = torch.stack([_loop_greedy(t, n) for t in key])
    assert torch.equal(_greedy_round(key, n), ref)
    # The fast pass (safe entries first) is the same greedy when it may visit every entry.
    assert torch.equal(_greedy_round_fast(key, n, extra=m * m, slack=0), ref)
    tied = torch.randint(0, 2, (6, m, m), generator=torch.Generator().manual_seed(1)).float()
    assert torch.equal(_greedy_round(tied, n), torch.stack([_loop_greedy(t, n) for t in tied]))


# ----------------------------------------------------------------------------- repair


def test_augmenting_path_fallback_when_no_two_swap_exists():
    # 3:4 tile with rows 1, 2 and columns 1, 3 one short. For the first short row (1) and column
    # (1) every kept (i', j') has (1, j') or (i', 1) kept already, so no 2-swap exists (checked
    # below by brute force) and the repair must take a longer augmenting path.
    k = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 0], [1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    two_swaps = [
        (ip, jp)
        for ip in range(4)
        for jp in range(4)
        if k[ip, jp] and not k[1, jp] and not k[ip, 1]
    ]
    assert two_swaps == []
    s = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    step = _augment_tile(k, s, 3, 1)
    assert int(step.sum()) == int(k.sum()) + 1
    assert int(step[1].sum()) == 3 and (step.sum(0) <= 3).all() and (step.sum(1) <= 3).all()
    assert _tile_ok(_repair(k[None], s[None], 3)[0], 3, 4)


# ----------------------------------------------------------------------------- dtypes and API


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int64])
def test_dtypes(dtype):
    g = torch.Generator().manual_seed(4)
    score = (torch.rand(16, 16, generator=g) * 10).to(dtype)
    for method, (n, m) in (("tsenor", (8, 16)), ("greedy", (4, 8)), ("optimal", (4, 8)), ("exact24", (2, 4))):
        mask = transposable_mask(score, n, m, method=method)
        assert mask.dtype == torch.bool and _tile_ok(mask, n, m)
        assert torch.equal(mask, transposable_mask(score.to(torch.float64), n, m, method=method)) or method == "tsenor"


def test_auto_dispatch():
    score = torch.rand(16, 16, generator=torch.Generator().manual_seed(9))
    assert torch.equal(transposable_mask(score, 2, 4, method="auto"), transposable_mask(score, 2, 4, method="exact24"))
    assert torch.equal(transposable_mask(score, 8, 16, method="auto"), transposable_mask(score, 8, 16, method="tsenor"))
    assert set(TRANSPOSABLE_METHODS) == {"auto", "tsenor", "exact24", "optimal", "greedy"}


def test_transposable_error():
    s = torch.tensor([[4.0, 1.0], [1.0, 4.0]])
    eye = torch.eye(2, dtype=torch.bool)
    assert transposable_error(s, ~eye, eye) == pytest.approx(6.0 / 8.0)
    assert transposable_error(s, eye, eye) == 0.0
    assert transposable_error(torch.zeros(2, 2), ~eye, eye) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        transposable_error(s, eye[:1], eye)


@pytest.mark.parametrize(
    "score,n,m,method,exc,match",
    [
        (torch.tensor([[float("nan")] + [1.0] * 3] * 4), 2, 4, "tsenor", ValueError, r"`score` holds 4 non-finite"),
        (torch.full((4, 4), float("inf")), 2, 4, "optimal", ValueError, r"`score` holds 16 non-finite"),
        (torch.ones(4, 6), 2, 4, "tsenor", ValueError, r"Both dimensions of `score` must be multiples of m=4"),
        (torch.ones(6, 8), 4, 8, "greedy", ValueError, r"multiples of m=8, got shape \(6, 8\)"),
        (-torch.ones(4, 4), 2, 4, "exact24", ValueError, r"`score` must be non-negative"),
        (torch.ones(4), 2, 4, "tsenor", ValueError, r"`score` must be 2-D"),
        (torch.ones(4, 4), 2, 4, "hungarian", ValueError, r"Unknown `method`='hungarian'; valid choices: 'auto'"),
        (torch.ones(8, 8), 4, 8, "exact24", ValueError, r"'exact24' solves 2:4 only"),
        (torch.ones(4, 4), 4, 4, "tsenor", ValueError, r"`n` must satisfy 0 < n < m"),
        (np.ones((4, 4)), 2, 4, "tsenor", TypeError, r"`score` must be a torch.Tensor"),
        (torch.ones(4, 4, dtype=torch.bool), 2, 4, "tsenor", TypeError, r"`score` must be a real"),
    ],
)
def test_input_errors(score, n, m, method, exc, match):
    with pytest.raises(exc, match=match):
        transposable_mask(score, n, m, method=method)


def test_solver_option_errors():
    score = torch.ones(8, 8)
    with pytest.raises(TypeError, match=r"unknown solver option\(s\) \['tau'\]; it takes: none"):
        transposable_mask(score, 4, 8, method="greedy", tau=3.0)
    with pytest.raises(ValueError, match=r"`tau` must be a finite number > 0"):
        transposable_mask(score, 4, 8, method="tsenor", tau=0)
    with pytest.raises(ValueError, match=r"`iters` must be an int >= 0"):
        transposable_mask(score, 4, 8, method="tsenor", iters=2.5)
    assert _tile_ok(transposable_mask(score, 4, 8, method="tsenor", tau=2.0, iters=0), 4, 8)


# ----------------------------------------------------------------------------- tsenor's exchanges


def _feasible_score(n: int, m: int, size: int, seed: int, off: float):
    """A score whose support is a transposable n:m pattern (``off + |N(0, 1)|`` on it) with values
    in [0, off) elsewhere. Every other valid mask swaps kept entries (> off) for dropped ones
    (< off), so the pattern is each tile's unique optimum."""
    score, mask = _planted(n, m, size // m, size // m, seed)
    g = torch.Generator().manual_seed(seed + 100)
    on = off + torch.randn(size, size, generator=g).abs().clamp_min(1e-3)
    return torch.where(mask, on, off * torch.rand(size, size, generator=g)), mask


@pytest.mark.parametrize("off", [0.0, 1e-3, 0.5])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (8, 16)])
def test_tsenor_returns_a_transposable_input_unchanged(n, m, off):
    score, mask = _feasible_score(n, m, 64, seed=n, off=off)
    assert _tile_ok(mask, n, m)
    out = transposable_mask(score, n, m, method="tsenor")
    assert torch.equal(out, mask)
    if off == 0.0:  # the weights as SR-STE's decay leaves them: zero off the pattern
        assert torch.equal(transposable_mask(score, n, m, method="auto"), mask)


def _rounding_only(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """TSENOR's rounding without the exchanges, as `_tsenor` did before them."""
    from sparsetrain.ops.transposable import _TSENOR_ITERS, _TSENOR_TAU, _dykstra, _from_tiles, _to_tiles

    tiles = _to_tiles(score.float(), m)
    plan = _dykstra(tiles, n, _TSENOR_TAU, _TSENOR_ITERS)
    keep = _repair(_greedy_round_fast(plan, n, extra=4 * m, slack=m // 2), tiles, n)
    return _from_tiles(keep, *score.shape)


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("kind", ["gaussian", "ties", "heavy"])
def test_tsenor_reaches_the_lp_optimum_and_never_loses_to_its_rounding(n, m, kind):
    g = torch.Generator().manual_seed(30 + m)
    size = 4 * m
    score = torch.randn(size, size, generator=g).abs()
    if kind == "ties":
        score = torch.randint(0, 4, (size, size), generator=g).float()
    if kind == "heavy":  # a few large outliers per tile, float32 rounding of big sums
        score = score ** 4 * 1e3
    from sparsetrain.ops.transposable import _IMPROVE_STATS

    broken = _IMPROVE_STATS["broken"]
    out = transposable_mask(score, n, m, method="tsenor")
    assert _tile_ok(out, n, m)
    assert _IMPROVE_STATS["broken"] == broken  # no exchange had to be undone
    got = _kept(score, out)
    assert got >= _kept(score, _rounding_only(score, n, m)) * (1 - 1e-7)
    best = sum(
        _lp_tile(score[r : r + m, c : c + m].double().numpy(), n)
        for r in range(0, size, m)
        for c in range(0, size, m)
    )
    assert got == pytest.approx(best, rel=1e-5)
