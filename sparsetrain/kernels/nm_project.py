"""Fused N:M projection: the effective weight and its mask in one read of the weight.

Twin of `sparsetrain.ops.nm` (``nm_mask``, ``project_nm``, ``soft_threshold``): for every group of
``m`` consecutive entries along the last dim,

- ``mask`` = ``ops.nm_mask(w, n, m)`` (the ``n`` largest |w|, ties to the lowest index, NaN
  ranked above +inf), bit-equal,
- ``"hard"`` (STE, SR-STE): ``w_eff = ops.project_nm(w, n, m)``,
- ``"soft"`` (S-STE): ``w_eff = (beta * ops.soft_threshold(w.float(), n, m)).to(w.dtype)``: the
  threshold, subtraction and scale run in float32 and round once to the weight dtype.

For S-STE the soft-thresholded entries are a subset of the mask (an entry above the (m-n)-th
smallest |w| beats at least m-n others), so ``w_eff`` is zero off the mask for every method and
can be compressed to the 2:4 format directly. A group holding NaN or inf gives an all-NaN
``w_eff`` group, as in ``ops.nm``.

Memory traffic is one read of ``w`` plus one write of ``w_eff`` and one byte of mask per entry
(5 bytes per bf16 entry), so the kernel is bandwidth bound; the per-group rank is ``m*m``
comparisons held in registers (16 for 2:4).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import PROJECTION_MODES as MODES, check_nm
from ._launch import DualKernel
from ._tl_utils import bf16_bits_to_f32, load_view, round_to_bf16_bits, store_view

__all__ = ["nm_project_forward"]



def _nm_project_kernel(
    w_ptr,
    out_ptr,
    mask_ptr,
    beta_ptr,
    n_groups,
    N: tl.constexpr,
    M: tl.constexpr,
    M_PAD: tl.constexpr,
    SOFT: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)  # (BLOCK_G,) group ids
    col = tl.arange(0, M_PAD)  # (M_PAD,) position inside the group
    offs = g[:, None] * M + col[None, :]  # (BLOCK_G, M_PAD): groups are contiguous runs of M
    valid = (g[:, None] < n_groups) & (col[None, :] < M)
    if OUT_BF16:  # bf16 input read as bits (see _tl_utils.bf16_bits_to_f32)
        w32 = bf16_bits_to_f32(tl.load(w_ptr + offs, mask=valid, other=0))
    else:
        w32 = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    # The rank key of ops.nm: |w| with NaN as +inf. Padding lanes (M < M_PAD, e.g. m=6) get -1:
    # they never beat a real entry.
    absw = tl.abs(w32)
    a = tl.where(col[None, :] < M, tl.where(absw != absw, float("inf"), absw), -1.0)
    ai = a[:, :, None]  # (BLOCK_G, M_PAD, 1): the entry being ranked
    aj = a[:, None, :]  # (BLOCK_G, 1, M_PAD): its competitors
    lower = col[None, None, :] < col[None, :, None]  # competitor j sits before i
    beats = (aj > ai) | ((aj == ai) & lower)
    rank = tl.sum(beats.to(tl.int32), axis=2)  # (BLOCK_G, M_PAD): descending rank, ties to lowest index
    keep = rank < N
    if SOFT:
        # The (m-n)-th smallest |w| is the entry of descending rank n; ranks are a permutation.
        t = tl.sum(tl.where(rank == N, a, 0.0), axis=1)  # (BLOCK_G,)
        d = tl.maximum(absw - t[:, None], 0.0)
        beta = tl.load(beta_ptr).to(tl.float32)
        out = tl.where(w32 < 0, -d, d) * beta
    else:
        out = tl.where(keep, w32, 0.0)
    # A group holding NaN or inf comes out all NaN, as in ops.nm.
    bad = tl.max(tl.where(a == float("inf"), 1, 0), axis=1)  # (BLOCK_G,)
    out = tl.where(bad[:, None] > 0, float("nan"), out)
    if OUT_BF16:
        tl.store(out_ptr + offs, round_to_bf16_bits(out), mask=valid)
    else:
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=valid)
    tl.store(mask_ptr + offs, keep.to(tl.uint8), mask=valid)


_nm_project = DualKernel(_nm_project_kernel)


def nm_project_forward(weight: torch.Tensor, n: int, m: int, mode: str, beta=None):
    """Effective weight and N:M mask of ``weight`` in one pass.

    Args:
        weight: floating tensor whose last dim is a multiple of ``m``.
        n, m: keep ``n`` of every ``m`` consecutive entries along the last dim.
        mode: ``"hard"`` (the N:M projection) or ``"soft"`` (the scaled soft threshold).
        beta: S-STE's per-tensor scale (a float or 0-dim tensor); required for ``"soft"``, ignored
            otherwise. A tensor is read on the device, so no host synchronisation happens.

    Returns:
        ``(w_eff, mask)``: ``w_eff`` like ``weight``, ``mask`` a bool tensor of the same shape.

    Example:
        >>> w = torch.tensor([[0.1, -3.0, 2.0, 0.5]])
        >>> nm_project_forward(w, 2, 4, "hard")[1]
        tensor([[False,  True,  True, False]])
    """
    check_nm(n, m)
    if mode not in MODES:
        valid = ", ".join(repr(x) for x in MODES)
        raise ValueError(f"Unknown `mode`={mode!r} for the projection kernel; valid choices: {valid}")
    if not weight.is_floating_point():
        raise TypeError(f"`weight` must be a floating tensor, got dtype {weight.dtype}")
    if weight.dim() == 0 or weight.shape[-1] % m != 0:
        raise ValueError(
            f"The last dimension of `weight` (shape {tuple(weight.shape)}) must be a multiple of m={m}"
        )
    if m > 32:
        raise ValueError(f"The projection kernel supports `m` <= 32 (m*m ranks per group in registers), got m={m}")
    soft = mode == "soft"
    if soft:
        if beta is None:
            raise ValueError("`beta` is required for mode='soft' (see `ops.sste_scale`)")
        beta_t = torch.as_tensor(beta, dtype=torch.float32, device=weight.device).reshape(1)
    else:
        beta_t = torch.ones(1, dtype=torch.float32, device=weight.device)  # unread placeholder

    w = weight.detach().contiguous()
    out = torch.empty_like(w)
    mask = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    n_groups = w.numel() // m
    if n_groups:
        m_pad = triton.next_power_of_2(m)
        # ~4K entries per program: enough bytes in flight per SM to saturate HBM for a stream.
        block_g = max(1, min(4096 // m_pad, triton.next_power_of_2(n_groups)))
        grid = (triton.cdiv(n_groups, block_g),)
        _nm_project[grid](
            load_view(w), store_view(out), mask, beta_t, n_groups,
            N=n, M=m, M_PAD=m_pad, SOFT=soft, OUT_BF16=w.dtype == torch.bfloat16, BLOCK_G=block_g,
        )
    return out, mask.view(torch.bool)
