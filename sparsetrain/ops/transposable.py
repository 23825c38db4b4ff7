"""Transposable N:M masks: N:M along the rows *and* the columns of every m x m tile.

A weight ``W`` (``[out, in]``) whose mask keeps exactly ``n`` entries in every row and every column
of each ``m x m`` tile stays N:M when transposed, so the backward GEMM ``dX = dY W~`` can be sparse
too. Per tile the best such mask solves

    maximise  sum(mask * score)   s.t.  every row and every column of the tile keeps exactly n,

a bipartite b-matching. Four solvers, all working on every tile at once as a ``[B, m, m]`` tensor:

* ``"exact24"``: the 90 valid 4x4 patterns of 2:4, each scored by summing its 8 kept scores;
  exact, 2:4 only.
* ``"optimal"``: the exact optimum for any N:M. The tile LP has a totally unimodular constraint
  matrix, so a vertex solution is already 0/1; SciPy's HiGHS dual simplex solves many tiles as one
  block-diagonal LP. This is the reference the others are measured against; it runs on the CPU.
* ``"tsenor"`` (Meng, Makni & Mazumder 2025): entropy-regularised optimal transport solved by
  Dykstra's algorithm, then rounded (greedy in descending order, then swap repair), then improved
  by exchange cycles that keep every row and column at ``n`` until none gains (`_improve`): that
  reaches the LP optimum up to float rounding, and returns a tile that is already a valid pattern
  (its support, or its clearly largest entries) unchanged.
* ``"greedy"`` (Hubara et al. 2021): entries in descending score while the row and column counts
  are below n, then the same repair, so the result is always a valid mask.

``"auto"`` picks ``"exact24"`` for 2:4 and ``"tsenor"`` otherwise.

The contract (`tests/test_properties.py` checks it for every method on random, tied, zero and
extreme scores, in float32, bfloat16 and float16):

1. Structure: every method returns exactly ``n`` per row and per column of every tile, whatever
   the scores (ties, all-zero tiles and huge or denormal values included).
2. Ties: ``"exact24"`` sums each pattern's kept scores in row-major order in float32 (float64 for
   float64 scores) and keeps the first best pattern in the lexicographic order of `_patterns24`;
   the Triton kernel (`kernels.transposable`) does the same, so for float32, bfloat16 and float16
   scores their masks are bit-equal (on CUDA `transposable_mask` runs the kernel for them). ``"greedy"`` visits equal scores in row-major order. The
   others are deterministic functions of the scores.
3. Non-finite scores are an error (a `ValueError` naming the count), in the op and the kernel
   alike: no mask can be "visibly NaN", and a silent choice would hide the divergence.

Everything except ``"optimal"`` is plain batched torch and runs on whatever device ``score`` is on.
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .. import kernels  # the Triton twin of exact24 (importing it imports no triton)
from .nm import check_nm, fmt_choices as _fmt

__all__ = [
    "TRANSPOSABLE_METHODS",
    "transposable_mask",
    "transposable_error",
    "is_transposable_nm",
]

TRANSPOSABLE_METHODS = ("auto", "tsenor", "exact24", "optimal", "greedy")
# Score dtypes whose exact24 mask the Triton twin reproduces bit for bit (it sums in float32; a
# float64 score is summed in float64 here, and integer scores are not its input).
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# tau and iters were tuned on |N(0, 1)| 1024x1024 matrices at 2:4, 4:8, 8:16 and 16:32 (torch 2.13,
# 1 thread of a shared 2-core CPU, an earlier capped greedy rounding, before the exchange cycles of
# `_improve` closed the remaining gap); gap = relative loss of kept |W| against the LP optimum, time
# for the whole call:
#   tau  5,  25 iters: gap 0.04% / 0.09% / 0.14% / 0.11%, 0.22-0.54 s  <- default
#   tau  5,  50 iters: gap 0.03% / 0.05% / 0.10% / 0.09%, 0.29-0.58 s
#   tau 10, 100 iters: gap 0.01% / 0.02% / 0.04% / 0.05%, 0.42-1.5 s
#   tau 40 and up (512x512): far slower to converge; at 200 iters 3-12% off, worse than greedy.
# The optimum took 4-8 s on the same matrices; the default keeps TSENOR ~20x faster with gaps far
# inside the 2% target (benchmarks/results/transposable_masks.json has the final numbers).
# tau is in units of the tile's mean score, so the solver is scale-invariant.
_TSENOR_TAU = 5.0
_TSENOR_ITERS = 25
# exp() arguments are kept above this, measured from the row maximum, so float32 never underflows.
# Entries that far below their row's best (60/tau = 12 tile means: only in tiles with big outliers)
# tie in the plan; the rounding takes them in topk's (deterministic) order and the score-based repair
# fixes what that costs.
_MIN_EXPONENT = -60.0
# Variables per block-diagonal LP: HiGHS's time grows faster than linearly with the LP's size, while
# each call has a fixed SciPy overhead. At 1024x1024 (all N:M) 2^11-2^13 variables per LP took 4-7 s,
# 2^17 8-12 s and 2^19 17-40 s.
_LP_VARS_PER_CHUNK = 1 << 13
# Tiles scored per matmul in exact24 ([chunk, 90] scores: 23 MB in float32).
_EXACT24_CHUNK = 1 << 16

_SOLVER_OPTIONS = {
    "tsenor": ("tau", "iters"),
    "exact24": (),
    "optimal": (),
    "greedy": (),
}


# --------------------------------------------------------------------------------------------------
# Input checks and tiling


def _check_score(score, m: int, name: str = "score") -> None:
    if not isinstance(score, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(score).__name__}")
    if score.is_complex() or score.dtype == torch.bool:
        raise TypeError(f"`{name}` must be a real floating or integer tensor, got dtype {score.dtype}")
    if score.dim() != 2:
        raise ValueError(f"`{name}` must be 2-D, got shape {tuple(score.shape)}")
    rows, cols = score.shape
    if rows % m or cols % m:
        raise ValueError(
            f"Both dimensions of `{name}` must be multiples of m={m}, got shape {tuple(score.shape)}"
        )
    if score.is_floating_point():
        finite = torch.isfinite(score)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(f"`{name}` holds {bad} non-finite value(s) (NaN or inf)")
    if bool((score < 0).any()):
        raise ValueError(f"`{name}` must be non-negative (e.g. |W|), got min {float(score.min())}")


def _work_dtype(score: torch.Tensor) -> torch.dtype:
    # Half precision scores are widened: sums of m*n entries and the Dykstra scalings need float32.
    return torch.float64 if score.dtype == torch.float64 else torch.float32


def _to_tiles(x: torch.Tensor, m: int) -> torch.Tensor:
    rows, cols = x.shape
    t = x.reshape(rows // m, m, cols // m, m)  # (R/m, m, C/m, m)
    return t.permute(0, 2, 1, 3).reshape(-1, m, m)  # (B, m, m), B = R/m * C/m, row-major tiles


def _from_tiles(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    m = t.shape[-1]
    x = t.reshape(rows // m, cols // m, m, m)  # (R/m, C/m, m, m)
    return x.permute(0, 2, 1, 3).reshape(rows, cols)


def is_transposable_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether every ``m x m`` tile of ``mask`` keeps exactly ``n`` per row and per column.

    Args:
        mask: 2-D boolean (or 0/1) tensor whose dimensions are multiples of ``m``.
        n, m: the N:M pattern.

    Returns:
        ``True`` when ``mask`` and ``mask.T`` are both N:M in every tile.

    Example:
        >>> is_transposable_nm(torch.eye(4, dtype=torch.bool).roll(1, 0) | torch.eye(4, dtype=torch.bool), 2, 4)
        True
    """
    check_nm(n, m)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`mask` must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"`mask` must be 2-D, got shape {tuple(mask.shape)}")
    if mask.shape[0] % m or mask.shape[1] % m:
        raise ValueError(f"Both dimensions of `mask` must be multiples of m={m}, got shape {tuple(mask.shape)}")
    t = _to_tiles(mask.to(torch.int32), m)
    if bool(((t != 0) & (t != 1)).any()):
        return False
    return bool((t.sum(-1) == n).all()) and bool((t.sum(-2) == n).all())


# --------------------------------------------------------------------------------------------------
# exact24: the 90 patterns


_PATTERN_CACHE: Dict[Tuple[str, torch.dtype], torch.Tensor] = {}


def _patterns24(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 90 4x4 0/1 matrices with two ones per row and column, as ``[90, 16]`` (lexicographic)."""
    key = (str(device), dtype)
    if key not in _PATTERN_CACHE:
        rows = [tuple(1 if j in c else 0 for j in range(4)) for c in itertools.combinations(range(4), 2)]
        pats = [p for p in itertools.product(rows, repeat=4) if all(sum(col) == 2 for col in zip(*p))]
        _PATTERN_CACHE[key] = torch.tensor(pats, dtype=dtype, device=device).reshape(len(pats), 16)
    return _PATTERN_CACHE[key]


_KEPT_CACHE: Dict[str, torch.Tensor] = {}


def _kept24(device: torch.device) -> torch.Tensor:
    """``[90, 8]``: the tile elements (row-major index) each pattern keeps, in ascending order."""
    key = str(device)
    if key not in _KEPT_CACHE:
        pats = _patterns24(torch.device("cpu"), torch.float32)
        _KEPT_CACHE[key] = torch.stack([torch.nonzero(p).flatten() for p in pats]).to(device)
    return _KEPT_CACHE[key]


def _exact24(tiles: torch.Tensor) -> torch.Tensor:
    pats = _patterns24(tiles.device, tiles.dtype)  # (90, 16)
    kept = _kept24(tiles.device)  # (90, 8)
    flat = tiles.reshape(-1, 16)  # (B, 16)
    best = torch.empty(flat.shape[0], dtype=torch.long, device=tiles.device)
    for lo in range(0, flat.shape[0], _EXACT24_CHUNK):
        chunk = flat[lo : lo + _EXACT24_CHUNK]
        # Each pattern's score summed over its kept elements in row-major order, one rounding per
        # addition: the order the Triton kernel accumulates in, so near-ties resolve identically
        # there and here (a matmul may sum in any order). argmax returns the first maximum, so
        # exact ties go to the lexicographically first pattern, as in the kernel.
        score = chunk[:, kept[:, 0]]  # (b, 90)
        for j in range(1, 8):
            score = score + chunk[:, kept[:, j]]
        best[lo : lo + _EXACT24_CHUNK] = score.argmax(-1)
    return pats[best].reshape(-1, 4, 4) > 0


# --------------------------------------------------------------------------------------------------
# optimal: block-diagonal LP solved by HiGHS


def _lp_chunk(tiles: np.ndarray, n: int) -> np.ndarray:
    """Exact masks for ``tiles`` (``[b, m, m]`` float64) from one block-diagonal LP."""
    try:
        from scipy.optimize import linprog
        from scipy.sparse import csr_matrix
    except ModuleNotFoundError as err:  # SciPy is not a base dependency (it comes with the app extra)
        raise ModuleNotFoundError("`method`='optimal' needs SciPy, which is not installed: pip install scipy "
                                  "(or 'sparsetrain[app]'); 'tsenor' and 'exact24' need only torch",
                                  name="scipy") from err

    b, m, _ = tiles.shape
    nv = b * m * m
    var = np.arange(nv).reshape(b, m, m)
    # Constraint t*2m + i sums row i of tile t; t*2m + m + j sums column j of tile t.
    tile_base = (np.arange(b) * 2 * m)[:, None, None]
    row_con = tile_base + np.arange(m)[None, :, None] + np.zeros((1, 1, m), dtype=np.int64)
    col_con = tile_base + m + np.arange(m)[None, None, :] + np.zeros((1, m, 1), dtype=np.int64)
    a_eq = csr_matrix(
        (np.ones(2 * nv), (np.concatenate([row_con.ravel(), col_con.ravel()]), np.tile(var.ravel(), 2))),
        shape=(2 * m * b, nv),
    )
    # Each tile's scores are shifted by their mean and divided by their largest deviation: every
    # feasible mask keeps m*n entries and tiles are independent, so neither changes the argmax, but
    # HiGHS's absolute tolerances (~1e-7) then apply relative to each tile's spread of scores.
    c = tiles - tiles.mean(axis=(1, 2), keepdims=True)
    spread = np.abs(c).max(axis=(1, 2), keepdims=True)
    c = -(c / np.where(spread > 0, spread, 1.0)).ravel()
    # Dual simplex returns a vertex; the constraint matrix is totally unimodular, so vertices are 0/1.
    res = linprog(c, A_eq=a_eq, b_eq=np.full(2 * m * b, float(n)), bounds=(0.0, 1.0), method="highs-ds")
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on a transposable-mask LP: {res.message}")
    return res.x.reshape(b, m, m) > 0.5


def _optimal(tiles: torch.Tensor, n: int) -> torch.Tensor:
    b, m, _ = tiles.shape
    t64 = tiles.detach().to("cpu", torch.float64).numpy()
    per_chunk = max(1, _LP_VARS_PER_CHUNK // (m * m))
    out = np.empty(t64.shape, dtype=bool)
    for lo in range(0, b, per_chunk):
        out[lo : lo + per_chunk] = _lp_chunk(t64[lo : lo + per_chunk], n)
    mask = torch.from_numpy(out).to(tiles.device)
    # Rounding x > 0.5 of a vertex is exact; should HiGHS ever stop at a tolerance-level non-vertex,
    # the repair makes the tile valid again (it only ever adds the best-gain swap).
    return _repair(mask, tiles, n)


# --------------------------------------------------------------------------------------------------
# Rounding shared by tsenor and greedy


def _greedy_round(key: torch.Tensor, n: int, steps: Optional[int] = None, slack: int = 0) -> torch.Tensor:
    """Visit every tile's entries in descending ``key`` (ties to the lower index) and keep one while
    its row and its column hold fewer than ``n``. Rows and columns may be left short.

    With ``steps``, stop after the first ``steps`` entries once no tile misses more than ``slack``
    entries (checked every m steps), leaving those to `_repair`."""
    b, m, _ = key.shape
    dev = key.device
    steps = m * m if steps is None else min(steps, m * m)
    # Stable: ties (constant or all-zero tiles) go in row-major order, which fills such tiles.
    order = torch.sort(key.reshape(b, m * m), dim=-1, descending=True, stable=True).indices  # (B, m*m)
    # Step-major flat indices, so step t reads contiguous slices: into keep (B*m*m), and into one
    # counter tensor holding every tile's row counts (first B*m) then its column counts (next B*m).
    # int32 halves the memory traffic of building these (B*m*m entries each); int64 where it overflows.
    itype = torch.int32 if 2 * b * m * m < 2**31 else torch.int64
    order = order.to(itype)
    base = torch.arange(b, device=dev, dtype=itype)[:, None]  # (B, 1)
    keep_idx = (base * (m * m) + order).T.contiguous()  # (m*m, B)
    row = base * m + torch.div(order, m, rounding_mode="floor")  # (B, m*m): counter of the entry's row
    col = (b * m) + base * m + order % m  # (B, m*m): counter of its column
    cnt_idx = torch.cat([row, col]).T.contiguous()  # (m*m, 2B)
    keep = torch.zeros(b * m * m, dtype=torch.bool, device=dev)
    cnt = torch.zeros(2 * b * m, dtype=torch.int32, device=dev)
    row_cnt = cnt[: b * m].view(b, m)  # (B, m) view
    full = b * m * n
    for t in range(m * m):
        idx = cnt_idx[t]  # (2B,): the entry's row counter, then its column counter
        ok = (cnt[idx] < n).view(2, b).all(0)  # (B,): both row and column still open
        keep[keep_idx[t]] = ok
        # Within one step every tile touches one row and one column, so the indices are distinct.
        cnt.index_add_(0, idx, ok.to(torch.int32).repeat(2))
        # Checks cost a sync, so only every m steps. Once every tile is full nothing else fits.
        if t % m == m - 1:
            if int(row_cnt.sum()) == full:
                break
            # Past `steps`, stop when every tile's deficit is small enough for cheap swap repair;
            # tied keys (constant tiles) leave large deficits that the greedy pass fills faster.
            if t + 1 >= steps and int((n * m - row_cnt.sum(-1)).max()) <= slack:
                break
    return keep.reshape(b, m, m)


def _greedy_round_fast(key: torch.Tensor, n: int, extra: int, slack: int) -> torch.Tensor:
    """`_greedy_round` for a near-0/1 key, without sorting whole tiles.

    An entry among the top n of its row *and* of its column is always kept by the greedy pass:
    when its turn comes only larger entries of its row (fewer than n) and column were kept. Those
    "safe" entries are kept at once; the greedy pass then visits only the ``extra`` largest other
    entries of each tile, and that gives the same result as the full pass over them (the safe
    entries are in the final mask either way, so counting them early blocks nothing greedy keeps).
    Tiles still missing more than ``slack`` entries (ties, flat plans) get the full pass instead.
    Exactly tied keys are taken in topk's order, which is deterministic but not by index.
    """
    b, m, _ = key.shape
    dev = key.device
    safe = torch.zeros_like(key, dtype=torch.bool)
    safe.scatter_(-1, key.topk(n, dim=-1).indices, True)  # (B, m, m): top n of its row
    col_top = torch.zeros_like(safe).scatter_(-2, key.topk(n, dim=-2).indices, True)
    safe &= col_top  # at most n per row and per column
    k_extra = min(extra, m * m)
    rest = torch.where(safe, torch.full_like(key, -math.inf), key).reshape(b, m * m)  # (B, m*m)
    order = rest.topk(k_extra, dim=-1, sorted=True).indices  # (B, K)
    valid = ~safe.reshape(b, m * m).gather(-1, order)  # (B, K): False where only safe ones were left
    base = torch.arange(b, device=dev)[:, None]  # (B, 1)
    keep_idx = (base * (m * m) + order).T.contiguous()  # (K, B)
    cnt_idx = torch.cat([base * m + order // m, b * m + base * m + order % m]).T.contiguous()  # (K, 2B)
    valid = valid.T.contiguous()  # (K, B)
    keep = safe.reshape(b * m * m).clone()
    cnt = torch.cat([safe.sum(-1).reshape(-1), safe.sum(-2).reshape(-1)]).to(torch.int32)  # (2*B*m,)
    for t in range(k_extra):
        idx = cnt_idx[t]  # (2B,)
        ok = (cnt[idx] < n).view(2, b).all(0) & valid[t]  # (B,)
        keep[keep_idx[t]] |= ok
        cnt.index_add_(0, idx, ok.to(torch.int32).repeat(2))
    keep = keep.reshape(b, m, m)
    redo = torch.nonzero((n * m - cnt[: b * m].view(b, m).sum(-1)) > slack).flatten()
    if redo.numel() > 0:
        keep[redo] = _greedy_round(key[redo], n)
    return keep


def _repair(keep: torch.Tensor, score: torch.Tensor, n: int) -> torch.Tensor:
    """Fill rows/columns that have fewer than ``n`` (and trim any with more) so every tile is valid.

    For the first short row i and short column j of each tile, either (i, j) is added (if free) or
    the swap add (i, j'), add (i', j), drop (i', j') with the largest gain
    ``s[i, j'] + s[i', j] - s[i', j']`` is made, whichever gains more; each lowers the deficit by one.
    If a tile has neither move, it falls back to an augmenting path (`_augment_tile`).
    """
    keep = keep.clone()
    b, m, _ = keep.shape
    # Over-full rows or columns only come from a non-vertex LP answer: drop their weakest entries
    # first (column by column, then row by row) so that only deficits are left.
    if bool((keep.sum(-1) > n).any()) or bool((keep.sum(-2) > n).any()):
        keep = _trim(keep, score, n)
    neg = torch.finfo(score.dtype).min
    idx = torch.nonzero((keep.sum(-1) < n).any(-1)).flatten()  # tiles with a deficit
    if idx.numel() == 0:
        return keep
    k_all = keep[idx]  # (b', m, m), worked on in place and written back once
    s_all = score[idx]
    # Row and column counts are kept up to date move by move: recounting b' x m x m booleans every
    # round was a third of the repair's time at 4096x4096.
    row_cnt = k_all.sum(-1)  # (b', m)
    col_cnt = k_all.sum(-2)  # (b', m)
    active = torch.arange(idx.numel(), device=keep.device)
    while True:
        row_short = row_cnt[active] < n  # (a, m)
        still = row_short.any(-1)
        if not bool(still.all()):
            active, row_short = active[still], row_short[still]
            if active.numel() == 0:
                break
        col_short = col_cnt[active] < n  # (a, m)
        k = k_all[active]  # (a, m, m) copy
        s = s_all[active]
        a_n = active.numel()
        i = row_short.to(torch.int8).argmax(-1)  # first short row per tile
        j = col_short.to(torch.int8).argmax(-1)  # first short column per tile
        bi = torch.arange(a_n, device=keep.device)
        gain = s[bi, i][:, None, :] + s[bi, :, j][:, :, None] - s  # (a, i', j'): s[i,j'] + s[i',j] - s[i',j']
        ok = k & ~k[bi, i][:, None, :] & ~k[bi, :, j][:, :, None]
        gain = torch.where(ok, gain, torch.full_like(gain, neg))
        best_gain, best = gain.reshape(a_n, m * m).max(-1)
        has = ok.reshape(a_n, m * m).any(-1)
        # When (i, j) itself is free (a capped greedy pass may not have reached it), adding it is
        # the other move that lowers the deficit by one; take whichever gains more.
        direct = ~k[bi, i, j] & (~has | (s[bi, i, j] >= best_gain))
        swap = has & ~direct
        ta, ti, tj = active[direct], i[direct], j[direct]
        k_all[ta, ti, tj] = True
        ip, jp = best // m, best % m
        ta, ti, tj, tip, tjp = active[swap], i[swap], j[swap], ip[swap], jp[swap]
        k_all[ta, ti, tjp] = True
        k_all[ta, tip, tj] = True
        k_all[ta, tip, tjp] = False
        # Both moves add one to row i and to column j and leave every other count as it was.
        row_cnt[active, i] += 1
        col_cnt[active, j] += 1
        for t in bi[~has & ~direct].tolist():
            tile = int(active[t])
            k_all[tile] = _augment_tile(k_all[tile], s[t], n, int(i[t]))
            # An augmenting path ends at some short column, not necessarily j: recount this tile.
            row_cnt[tile] = k_all[tile].sum(-1)
            col_cnt[tile] = k_all[tile].sum(-2)
    keep[idx] = k_all
    return keep


def _trim(keep: torch.Tensor, score: torch.Tensor, n: int) -> torch.Tensor:
    neg = torch.finfo(score.dtype).min
    for dim in (-2, -1):
        masked = torch.where(keep, score, torch.full_like(score, neg))
        order = torch.sort(masked, dim=dim, descending=True, stable=True).indices
        rank = order.argsort(dim=dim)  # rank of each entry among its column (row), kept ones first
        keep = keep & (rank < n)
    return keep


def _augment_tile(k: torch.Tensor, s: torch.Tensor, n: int, i0: int) -> torch.Tensor:
    """One augmenting path (BFS) from short row ``i0`` to a short column: alternately add an unkept
    and drop a kept entry. It always exists while a row is short, since a valid mask exists."""
    kk = k.cpu().numpy().copy()
    col_short = kk.sum(0) < n
    s_np = s.detach().cpu().numpy()
    # BFS over rows: from row r go to any column c with (r, c) unkept; from column c go back to any
    # row r' with (r', c) kept. Stop at a short column.
    prev_col = {}
    prev_row = {i0: None}
    frontier = [i0]
    end = None
    while frontier and end is None:
        nxt = []
        for r in frontier:
            for c in np.argsort(-s_np[r], kind="stable"):
                c = int(c)
                if kk[r, c] or c in prev_col:
                    continue
                prev_col[c] = r
                if col_short[c]:
                    end = c
                    break
                for r2 in np.nonzero(kk[:, c])[0]:
                    r2 = int(r2)
                    if r2 not in prev_row:
                        prev_row[r2] = c
                        nxt.append(r2)
            if end is not None:
                break
        frontier = nxt
    if end is None:
        raise RuntimeError("no augmenting path in a transposable-mask tile (please report this)")
    c = end
    while True:
        r = prev_col[c]
        kk[r, c] = True
        back = prev_row[r]
        if back is None:
            break
        kk[r, back] = False
        c = back
    return torch.from_numpy(kk).to(k.device)


# --------------------------------------------------------------------------------------------------
# tsenor


def _dykstra(tiles: torch.Tensor, n: int, tau: float, iters: int) -> torch.Tensor:
    """Entropy-regularised transport plan ``S`` of every tile: ``[B, m, m]`` with rows and columns
    summing to ~n and ``0 <= S <= 1``, concentrated on the high-score entries for large ``tau``."""
    # Batch-last layout: the row and column sums become sums of m contiguous [B] slices, which torch
    # vectorises well; with batch first, summing 4-element rows was 4-5x slower (2:4, B = 65536).
    b, m, _ = tiles.shape
    # Always a fresh buffer: everything below is in place, and a permuted view of `tiles` can be
    # contiguous already (B = 1) and so share memory with the caller's score.
    z = torch.empty((m, m, b), dtype=torch.float32, device=tiles.device)  # (m, m, B): [row, col, tile]
    z.copy_(tiles.permute(1, 2, 0))
    scale = z.mean(dim=(0, 1), keepdim=True)  # (1, 1, B)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    z.mul_(tau / scale)
    # Subtracting the row maximum is a row scaling, which the first row projection absorbs anyway;
    # it keeps exp() in [e^-60, 1] so float32 neither overflows nor underflows.
    z.sub_(z.amax(1, keepdim=True)).clamp_(min=_MIN_EXPONENT)
    s = z.exp_()
    q = torch.ones_like(s)
    sq = torch.empty_like(s)
    for _ in range(iters):
        s.mul_(n / s.sum(1, keepdim=True))  # rows sum to n (KL projection onto an affine set)
        s.mul_(n / s.sum(0, keepdim=True))  # columns sum to n
        # The box S <= 1 needs Dykstra's correction q: S+ = min(S q, 1), q+ = S q / S+ = max(S q, 1).
        torch.mul(s, q, out=sq)
        torch.clamp(sq, max=1.0, out=s)
        torch.clamp(sq, min=1.0, out=q)
    # (B, m, m), contiguous: the rounding's top-k passes over a strided plan ran ~1.5x slower
    # (118 ms vs 79 ms at 1024x1024 16:32).
    return s.permute(2, 0, 1).contiguous()


def _tsenor(tiles: torch.Tensor, n: int, tau: float, iters: int) -> torch.Tensor:
    plan = _dykstra(tiles, n, tau, iters)
    m = tiles.shape[-1]
    # The greedy pass visits the safe entries plus the 4m next largest of each tile only: what is left
    # short is filled by the best-gain swaps of `_repair`, which use the scores instead of the
    # near-zero tail of the plan. On |N(0,1)| 1024x1024 16:32 this cut the gap to the optimum from
    # 0.12% (full greedy pass) to 0.07% and the rounding time from ~0.3 s to ~0.2 s.
    # slack m/2: tiles the capped pass leaves at most m/2 short are repaired by swaps; only worse
    # ones (ties, flat plans) get the full greedy pass. At 1024x1024 16:32, m/4 sent a few tiles
    # to the full pass (~24 ms of ~190 ms); m/2 sends none, at 159 ms and the same gap (0.067%).
    rounded = _repair(_greedy_round_fast(plan, n, extra=4 * m, slack=m // 2), tiles, n)
    # The rounding alone loses 0.05-0.23% to the optimum on random scores, and on a tile that is
    # already a transposable pattern (SR-STE's decay makes such tiles) it often picks another one.
    return _improve(rounded, tiles, n)


# --------------------------------------------------------------------------------------------------
# Local improvement: exchange cycles


# The exchanges close the rounding's gap to the LP optimum (|N(0,1)| 512x512, 1 thread of a 2-core
# CPU under load ~14: 2:4 / 4:8 / 8:16 / 16:32 from 0.071% / 0.234% / 0.111% / 0.070% to 0) and
# cost 0.8x / 1.7x / 3.7x / 4.5x the time of Dykstra plus rounding (0.31 / 0.53 / 0.89 / 1.56 s on
# top of 0.39 / 0.32 / 0.24 / 0.35 s there; the LP took 8-15 s). Most tiles need ~m/3 exchanges,
# one or a few per round, so m sets the cost.
# Rounds of `_improve` (each applies at least one exchange per tile still improving), per m: it
# stops earlier once no tile improves (12 rounds at 1024x1024 16:32); the cap only bounds the work
# should float rounding ever make gains look positive forever.
_IMPROVE_MAX_ROUNDS_PER_M = 4
# Elements of the [tiles, m, m, m] buffer of `_maxplus` per chunk: small enough to stay in cache
# (chunked, into a reused buffer and without argmax, it ran ~10x faster than one broadcast max).
_MAXPLUS_CHUNK = 1 << 18
# Tiles whose exchanges were undone because they broke a count (tests assert it stays 0).
_IMPROVE_STATS = {"broken": 0}


def _maxplus(x: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """Max-plus product ``out[t, u, v] = max_j x[t, u, j] + y_t[t, v, j]`` (``[a, m, m]``)."""
    a, m, _ = x.shape
    out = torch.empty((a, m, m), dtype=x.dtype, device=x.device)
    step = max(1, _MAXPLUS_CHUNK // (m * m * m))
    buf = torch.empty((min(step, a), m, m, m), dtype=x.dtype, device=x.device)
    for lo in range(0, a, step):
        hi = min(lo + step, a)
        b = buf[: hi - lo]
        torch.add(x[lo:hi, :, None, :], y_t[lo:hi, None, :, :], out=b)
        torch.amax(b, dim=-1, out=out[lo:hi])
    return out


def _move(k: torch.Tensor, add: torch.Tensor, drop: torch.Tensor, t, u, v) -> None:
    """Edge ``u -> v`` in tiles ``t``: move a kept entry of row ``v`` to row ``u``, in the column
    where that gains most (the column behind ``G[t, u, v]``)."""
    j = (add[t, u] - drop[t, v]).argmax(-1)
    k[t, u, j] = True
    k[t, v, j] = False


def _bellman_ford_cycles(g: torch.Tensor, tol: float):
    """A positive cycle of every tile's graph ``g`` (``[r, m, m]``) that has one, by longest-path
    Bellman-Ford from a virtual source linked to every row: a row still improving after m rounds
    lies behind a cycle of the parent pointers, and such a cycle has positive weight.

    Returns ``(ok, edges)``: ``ok[r]`` where a positive cycle was found, and its edges as a list of
    ``(u, v, on)`` (``on[r]``: this step is an edge of tile r's cycle)."""
    r_n, m, _ = g.shape
    dev = g.device
    ri = torch.arange(r_n, device=dev)
    g_in = g.transpose(1, 2).contiguous()  # [t, v, u]: a row's incoming edges, contiguous
    dist = torch.zeros((r_n, m), dtype=g.dtype, device=dev)
    parent = torch.full((r_n, m), -1, dtype=torch.long, device=dev)
    has = torch.zeros(r_n, dtype=torch.bool, device=dev)
    for it in range(m):
        cand, arg = (dist[:, None, :] + g_in).max(-1)  # best predecessor u of each v
        changed = cand > dist + tol
        if not bool(changed.any()):
            return has, []  # converged: no positive cycle in any of these tiles
        dist = torch.where(changed, cand, dist)
        parent = torch.where(changed, arg, parent)
    has = changed.any(-1)
    x = changed.to(torch.int8).argmax(-1)
    for _ in range(m):  # m steps back from a changed row end on the cycle
        x = parent[ri, x].clamp_min(0)
    # Walk the cycle once, summing its weight; it must close (back at x) and gain.
    cur, live = x, has & (parent[ri, x] >= 0)
    gain = torch.zeros(r_n, dtype=g.dtype, device=dev)
    edges = []
    for _ in range(m):
        u = parent[ri, cur].clamp_min(0)
        gain = gain + torch.where(live, g[ri, u, cur], torch.zeros_like(gain))
        edges.append((u, cur, live))
        cur = torch.where(live, u, cur)
        live = live & (cur != x)
    return has & ~live & (gain > tol), edges


def _improve(keep: torch.Tensor, score: torch.Tensor, n: int) -> torch.Tensor:
    """Exchange kept entries, never changing a row or column count, while the kept score grows.

    Per tile, ``G[u, v] = max_j s[u, j] - s[v, j]`` over the columns ``j`` where ``(u, j)`` is free
    and ``(v, j)`` kept is the weight of the edge ``u -> v`` of a graph on the rows: moving that
    entry from row ``v`` to row ``u``. A cycle of such edges moves one entry into and one out of
    every row on it and of every column it uses, so the mask stays valid, and its weight is the
    change of the kept score. This graph is the residual graph of the tile's transport problem
    with the columns contracted, so a mask without a positive cycle is optimal (the cycle condition
    of min-cost flow): the result is the LP optimum up to the tolerance, and a tile whose support
    is already a valid pattern comes back unchanged.

    Each round, per tile: positive 2-cycles (pairwise swaps) on disjoint row pairs, which do not
    interact; where there is none, the best 3- or 4-cycles (from the max-plus square of ``G``).
    Tiles with neither are set aside; once no tile has a short cycle left, Bellman-Ford looks for
    any positive cycle in the set-aside tiles (one pass for all, instead of one per round): tiles
    with one apply it and go back to the rounds, the others are optimal. Gains are in units of the tile's largest score and must exceed a few float roundings per
    edge, so float noise never triggers a move and every move increases the kept score.
    """
    b, m, _ = keep.shape
    if b == 0:
        return keep
    dev = keep.device
    keep = keep.clone()
    dt = score.dtype
    top = score.amax(dim=(1, 2), keepdim=True)
    s_all = score / torch.where(top > 0, top, torch.ones_like(top))  # in [0, 1]
    tol = 4 * m * torch.finfo(dt).eps
    rows = torch.arange(m, device=dev)
    active = torch.arange(b, device=dev)
    parked = []  # tiles without a short positive cycle, for `_long_cycles`
    for _ in range(_IMPROVE_MAX_ROUNDS_PER_M * m):
        k, s = keep[active], s_all[active]
        a = active.numel()
        add = s.masked_fill(k, -math.inf)  # score of the free entries
        drop = s.masked_fill(~k, math.inf)  # score of the kept entries
        g = _maxplus(add, -drop)  # (a, m, m), -inf where no column links u and v (u == v too)

        # Pairwise swaps: mutual best partners form disjoint pairs; a few passes pick up more.
        # `add`/`drop` describe the mask before this round, which is what each disjoint pair sees.
        c2 = g + g.transpose(1, 2)
        swapped = torch.zeros(a, dtype=torch.bool, device=dev)
        for _ in range(3):
            best, partner = c2.max(-1)  # (a, m)
            pick = (partner.gather(-1, partner) == rows) & (best > tol) & (rows < partner)
            t, u = pick.nonzero(as_tuple=True)
            if t.numel() == 0:
                break
            v = partner[t, u]
            _move(k, add, drop, t, u, v)
            _move(k, add, drop, t, v, u)
            swapped[t] = True
            for r in (u, v):
                c2[t, r, :] = -math.inf
                c2[t, :, r] = -math.inf

        # 3- and 4-cycles where no swap gains, several per tile on disjoint rows (which do not
        # interact, as for swaps). c3/c4 rank the candidates; each pick's middle rows are then
        # chosen among the rows still unused, and its gain recomputed with them.
        cycled = torch.zeros(a, dtype=torch.bool, device=dev)
        rest = torch.nonzero(~swapped).flatten()
        if rest.numel() > 0:
            gr = g[rest]
            r_n = rest.numel()
            g2 = _maxplus(gr, gr.transpose(1, 2).contiguous())  # (r, u, w): best u -> v -> w
            cand = {3: g2 + gr.transpose(1, 2), 4: g2 + g2.transpose(1, 2)}  # u->v->w(->v')->u
            # u -> v -> u -> v' -> u is two 2-cycles, not a 4-cycle (each may gain just under tol).
            cand[4].diagonal(dim1=1, dim2=2).fill_(-math.inf)
            used = torch.zeros((r_n, m), dtype=torch.bool, device=dev)
            for _ in range(3):
                best3, at3 = cand[3].reshape(r_n, -1).max(-1)
                best4, at4 = cand[4].reshape(r_n, -1).max(-1)
                use3 = (best3 > tol) & (best3 >= best4)
                use4 = (best4 > tol) & ~use3
                if not bool((use3 | use4).any()):
                    break
                for length, sel, at in ((3, use3, at3), (4, use4, at4)):
                    ti_ = torch.nonzero(sel).flatten()
                    if ti_.numel() == 0:
                        continue
                    t = rest[ti_]
                    u, w = at[ti_] // m, at[ti_] % m
                    free = used[ti_]
                    v = (gr[ti_, u] + gr[ti_, :, w]).masked_fill(free, -math.inf).argmax(-1)
                    path = [(u, v), (v, w)]
                    if length == 3:
                        path.append((w, u))
                    else:
                        free = free.clone()
                        free[torch.arange(len(ti_), device=dev), v] = True
                        v2 = (gr[ti_, w] + gr[ti_, :, u]).masked_fill(free, -math.inf).argmax(-1)
                        path += [(w, v2), (v2, u)]
                    gain = sum(gr[ti_, x, y] for x, y in path)
                    ok = gain > tol
                    # A pick whose gain vanished with the unused middle rows is not tried again.
                    cand[length][ti_[~ok], u[~ok], w[~ok]] = -math.inf
                    for x, y in path:
                        _move(k, add, drop, t[ok], x[ok], y[ok])
                        used[ti_[ok], x[ok]] = True
                        for c in cand.values():  # a used row starts or ends no later pick
                            c[ti_[ok], x[ok], :] = -math.inf
                            c[ti_[ok], :, x[ok]] = -math.inf
                    cycled[t[ok]] = True

        moved = swapped | cycled
        # Every move above keeps the counts by construction; should one ever not (a case missed),
        # the tile keeps its last valid mask rather than leave this function invalid.
        broken = (k.sum(-1) != n).any(-1) | (k.sum(-2) != n).any(-1)
        _IMPROVE_STATS["broken"] += int(broken.sum())
        moved &= ~broken
        keep[active[moved]] = k[moved]
        parked.append(active[~moved & ~broken])
        active = active[moved]
        if active.numel() == 0:
            # No short cycle left anywhere: longer ones, by Bellman-Ford, in the set-aside tiles.
            active = _long_cycles(keep, s_all, torch.cat(parked), n, tol)
            parked = []
            if active.numel() == 0:
                break
    return keep


def _long_cycles(keep: torch.Tensor, s_all: torch.Tensor, tiles: torch.Tensor, n: int, tol: float) -> torch.Tensor:
    """Apply one positive cycle (Bellman-Ford) in each of ``tiles`` that has one; return those."""
    if tiles.numel() == 0:
        return tiles
    k, s = keep[tiles], s_all[tiles]
    add = s.masked_fill(k, -math.inf)
    drop = s.masked_fill(~k, math.inf)
    ok, edges = _bellman_ford_cycles(_maxplus(add, -drop), tol)
    for u, v, on in edges:
        sel = on & ok
        _move(k, add, drop, torch.nonzero(sel).flatten(), u[sel], v[sel])
    valid = ~((k.sum(-1) != n).any(-1) | (k.sum(-2) != n).any(-1))
    _IMPROVE_STATS["broken"] += int((ok & ~valid).sum())
    ok &= valid
    keep[tiles[ok]] = k[ok]
    return tiles[ok]


# --------------------------------------------------------------------------------------------------
# Public API


def transposable_mask(score: torch.Tensor, n: int = 2, m: int = 4, method: str = "tsenor", **solver_options):
    """Boolean mask keeping exactly ``n`` per row and per column of every ``m x m`` tile of ``score``.

    Tiles are aligned at multiples of ``m``; each is solved independently to (approximately)
    maximise the kept score. The result and its transpose are both N:M along their last dim.

    Args:
        score: 2-D non-negative tensor, e.g. ``W.abs()`` or a Wanda score; both dims multiples of ``m``.
            Any float dtype (half precisions are computed in float32) or integer dtype.
        n, m: keep ``n`` of ``m`` in every tile row and column (``0 < n < m``).
        method: ``"tsenor"`` (fast, near-optimal, any N:M), ``"exact24"`` (exact, 2:4 only),
            ``"optimal"`` (exact LP optimum, any N:M, CPU/SciPy, slow), ``"greedy"`` (the
            2-approximation plus repair) or ``"auto"`` (``"exact24"`` for 2:4, else ``"tsenor"``).
        **solver_options: for ``"tsenor"``: ``tau`` (inverse entropy weight in units of the tile's
            mean score, default 5; larger is closer to the optimum but needs more iterations) and
            ``iters`` (Dykstra iterations, default 25).

    Returns:
        A ``torch.bool`` tensor shaped and placed like ``score``.

    Raises:
        ValueError: bad shape, non-finite or negative scores, bad ``n``/``m``, unknown ``method``
            or ``n``/``m`` other than 2:4 for ``"exact24"``.
        TypeError: ``score`` is not a real tensor, or an option the method does not take.

    Example:
        >>> w = torch.randn(8, 8)
        >>> mask = transposable_mask(w.abs(), 2, 4, method="exact24")
        >>> bool((mask.reshape(2, 4, 2, 4).sum(1) == 2).all() and (mask.reshape(2, 4, 2, 4).sum(3) == 2).all())
        True
    """
    check_nm(n, m)
    if method not in TRANSPOSABLE_METHODS:
        raise ValueError(f"Unknown `method`={method!r}; valid choices: {_fmt(TRANSPOSABLE_METHODS)}")
    if method == "auto":
        method = "exact24" if (n, m) == (2, 4) else "tsenor"
    unknown = sorted(set(solver_options) - set(_SOLVER_OPTIONS[method]))
    if unknown:
        takes = _fmt(_SOLVER_OPTIONS[method]) or "none"
        raise TypeError(f"`method`={method!r} got unknown solver option(s) {unknown}; it takes: {takes}")
    if method == "exact24" and (n, m) != (2, 4):
        raise ValueError(f"`method`='exact24' solves 2:4 only, got n={n}, m={m}; use 'tsenor' or 'optimal'")
    _check_score(score, m)

    if method == "exact24" and score.dtype in _KERNEL_DTYPES and kernels.available(score):
        return kernels.transposable24(score)  # the Triton twin: the same sums, so the same mask
    rows, cols = score.shape
    tiles = _to_tiles(score.detach().to(_work_dtype(score)), m)  # (B, m, m)
    if tiles.shape[0] == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if method == "exact24":
        keep = _exact24(tiles)
    elif method == "optimal":
        keep = _optimal(tiles, n)
    elif method == "greedy":
        keep = _repair(_greedy_round(tiles, n), tiles, n)
    else:
        tau = solver_options.get("tau", _TSENOR_TAU)
        iters = solver_options.get("iters", _TSENOR_ITERS)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"`tau` must be a finite number > 0, got {tau!r}")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"`iters` must be an int >= 0, got {iters!r}")
        keep = _tsenor(tiles, n, float(tau), iters)
    return _from_tiles(keep, rows, cols)


def transposable_error(score: torch.Tensor, mask: torch.Tensor, optimal_mask: torch.Tensor) -> float:
    """Relative gap of the score kept by ``mask`` to that kept by ``optimal_mask``.

    ``(sum(score * optimal_mask) - sum(score * mask)) / sum(score * optimal_mask)``; 0 when the
    optimum keeps nothing. Computed in float64.

    Example:
        >>> s = torch.tensor([[4.0, 1.0], [1.0, 4.0]])
        >>> transposable_error(s, torch.tensor([[False, True], [True, False]]), torch.eye(2, dtype=torch.bool))
        0.75
    """
    for name, t in (("score", score), ("mask", mask), ("optimal_mask", optimal_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if mask.shape != score.shape or optimal_mask.shape != score.shape:
        raise ValueError(
            f"`score`, `mask` and `optimal_mask` must have one shape, got {tuple(score.shape)}, "
            f"{tuple(mask.shape)} and {tuple(optimal_mask.shape)}"
        )
    s = score.detach().to(torch.float64)
    best = float((s * optimal_mask.to(torch.float64)).sum())
    got = float((s * mask.to(torch.float64)).sum())
    return 0.0 if best == 0 else (best - got) / best
