"""Exact transposable 2:4 masks in Triton: the best of the 90 patterns for every 4x4 tile.

A 4x4 0/1 tile with exactly two ones in every row and every column keeps ``W`` 2:4 along rows
and ``W^T`` 2:4 along rows too (so the input-gradient GEMM can be sparse). There are 90 such
tiles; for each tile of ``score`` (usually ``|W|``) the kernel sums the score under every
pattern and keeps the argmax, ties going to the pattern listed first in `PATTERNS`.

Work per tile: 16 loads, 16 x 128 fused multiply-adds in float32 (90 patterns padded to 128) and
16 one-byte stores. Scores are summed in row-major order in float32, as ``ops.transposable`` sums
them, so the two masks are bit-equal (ties included). Non-finite scores are a `ValueError`, as there.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._launch import DualKernel

__all__ = ["transposable24_forward", "PATTERNS"]

_PAIRS = list(itertools.combinations(range(4), 2))  # the 6 ways to keep 2 of a row of 4


def _enumerate_patterns():
    """The 90 transposable 2:4 tiles as 16-bit masks (bit ``4*r + c``), in lexicographic order of
    the rows' pair choices (row 0's pair varies slowest)."""
    pats = []
    for rows in itertools.product(_PAIRS, repeat=4):
        cols = [0, 0, 0, 0]
        for pair in rows:
            for c in pair:
                cols[c] += 1
        if cols == [2, 2, 2, 2]:
            pats.append(sum(1 << (4 * r + c) for r, pair in enumerate(rows) for c in pair))
    return pats


PATTERNS = tuple(_enumerate_patterns())
_N_PAD = 128  # 90 patterns padded to a power of two for tl.arange
_TABLES = {}


def _tables(device: torch.device):
    """``(weights, bits)``: ``weights[e, k]`` = 1.0 when pattern k keeps tile element e (float32,
    shape (16, 128)); ``bits[k]`` the pattern's bit mask, -1 for padding (never chosen)."""
    key = str(device)
    if key not in _TABLES:
        bits = torch.full((_N_PAD,), -1, dtype=torch.int32)
        bits[: len(PATTERNS)] = torch.tensor(PATTERNS, dtype=torch.int32)
        e = torch.arange(16, dtype=torch.int32)[:, None]
        weights = ((bits[None, :] >> e) & 1).float() * (bits[None, :] >= 0)
        _TABLES[key] = (weights.contiguous().to(device), bits.to(device))
    return _TABLES[key]


def _transposable24_kernel(
    s_ptr,
    mask_ptr,
    w_ptr,
    bits_ptr,
    n_tiles,
    tiles_per_row,
    n_cols,
    N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    valid = tile < n_tiles
    ti = tile // tiles_per_row
    tj = tile % tiles_per_row
    base = (4 * ti) * n_cols + 4 * tj  # top-left corner of each tile
    k = tl.arange(0, N_PAD)
    bits = tl.load(bits_ptr + k)  # (N_PAD,)
    obj = tl.zeros((BLOCK_T, N_PAD), dtype=tl.float32)
    for e in tl.static_range(16):
        x = tl.load(s_ptr + base + (e // 4) * n_cols + (e % 4), mask=valid, other=0.0).to(tl.float32)
        we = tl.load(w_ptr + e * N_PAD + k)  # (N_PAD,) 1.0 where pattern k keeps element e
        obj += x[:, None] * we[None, :]
    # Padding patterns can never win, whatever the scores (even all -inf).
    obj = tl.where(bits[None, :] >= 0, obj, float("-inf"))
    best_val = tl.max(obj, axis=1)
    # First pattern reaching the maximum: ties go to the lowest index, as documented.
    cand = tl.where((obj == best_val[:, None]) & (bits[None, :] >= 0), k[None, :], N_PAD)
    best = tl.min(cand, axis=1)
    best = tl.where(best == N_PAD, 0, best)  # all-NaN tile: fall back to pattern 0
    chosen = tl.sum(tl.where(k[None, :] == best[:, None], bits[None, :], 0), axis=1)  # (BLOCK_T,)
    for e in tl.static_range(16):
        keep = ((chosen >> e) & 1).to(tl.uint8)
        tl.store(mask_ptr + base + (e // 4) * n_cols + (e % 4), keep, mask=valid)


_transposable24 = DualKernel(_transposable24_kernel)


def transposable24_forward(score: torch.Tensor) -> torch.Tensor:
    """Boolean transposable 2:4 mask maximising the kept ``score`` in every 4x4 tile.

    Args:
        score: 2-D floating tensor whose dims are both multiples of 4 (e.g. ``weight.abs()``).

    Returns:
        A bool tensor like ``score`` with exactly 2 True in every row and column of each 4x4 tile.

    Example:
        >>> m = transposable24_forward(torch.rand(8, 8))
        >>> bool((m.view(2, 4, 2, 4).sum(1) == 2).all()), bool((m.view(2, 4, 2, 4).sum(3) == 2).all())
        (True, True)
    """
    if not score.is_floating_point():
        raise TypeError(f"`score` must be a floating tensor, got dtype {score.dtype}")
    if score.dim() != 2 or score.shape[0] % 4 or score.shape[1] % 4:
        raise ValueError(f"`score` must be 2-D with both dims multiples of 4, got shape {tuple(score.shape)}")
    finite = torch.isfinite(score)
    if not bool(finite.all()):  # as ops.transposable_mask: a NaN or inf has no best pattern
        raise ValueError(f"`score` holds {int((~finite).sum())} non-finite value(s) (NaN or inf)")
    s = score.detach().contiguous()
    rows, cols = s.shape
    mask = torch.empty(s.shape, dtype=torch.uint8, device=s.device)
    n_tiles = (rows // 4) * (cols // 4)
    if n_tiles:
        weights, bits = _tables(s.device)
        # 32 tiles x 128 patterns = 4K float32 accumulators per program: fits registers at 4 warps.
        block_t = min(32, triton.next_power_of_2(n_tiles))
        grid = (triton.cdiv(n_tiles, block_t),)
        _transposable24[grid](s, mask, weights, bits, n_tiles, cols // 4, cols, N_PAD=_N_PAD, BLOCK_T=block_t)
    return mask.view(torch.bool)
