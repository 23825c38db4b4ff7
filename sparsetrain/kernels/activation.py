"""Fused N:M activation sparsification: ``X~`` and its mask in one read of ``X``.

Twin of `sparsetrain.ops.activation.sparsify_activation` (the torch reference): per token, every
group of ``m`` consecutive features keeps its ``n`` largest |x| (ties to the lowest index, NaN
ranked above +inf, the rule of ``ops.nm.nm_mask``), and

- ``mask`` is bit-equal to ``ops.activation.activation_mask(x, n, m)``,
- ``X~`` is ``where(mask, x, 0)``: kept entries bit for bit (a kept NaN or inf stays), dropped
  entries +0.

What it does not do (yet): write cuSPARSELt's compressed operand itself. cuSPARSELt's compressed
buffer (values plus 2-bit indices, tiled and interleaved for its GEMM kernels) is produced by
``cusparseLtSpMMACompress`` and its layout is not documented; matching it needs a GPU to check
against, which this project's CI does not have. So the GPU path (`backends.cusparselt_activation`)
runs this kernel and then ``torch._cslt_compress(X~)``: two passes over ``X~`` instead of one.

Memory traffic: one read of ``x``, one write of ``X~`` and one byte of mask per entry; the rank is
``m*m`` comparisons in registers per group (16 for 2:4), so the kernel is bandwidth bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import DualKernel
from ._tl_utils import load_view, store_view

__all__ = ["sparsify_activation_forward"]


def _sparsify_activation_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    n_groups,
    N: tl.constexpr,
    M: tl.constexpr,
    M_PAD: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)  # (BLOCK_G,) group ids
    col = tl.arange(0, M_PAD)  # (M_PAD,) position inside the group
    offs = g[:, None] * M + col[None, :]  # (BLOCK_G, M_PAD): groups are contiguous runs of M features
    valid = (g[:, None] < n_groups) & (col[None, :] < M)
    raw = tl.load(x_ptr + offs, mask=valid, other=0)  # bf16 comes in as its int16 bits
    if BF16:
        # |x| of a bf16 number is its bits with the sign cleared, and for non-NaN values the
        # order of those 15-bit integers is the order of the magnitudes (denormals included), so
        # ranking needs no float conversion (the interpreter would flush bf16 denormals).
        mag = (raw.to(tl.int32) & 0x7FFF).to(tl.float32)
        a = tl.where(mag > 0x7F80, float("inf"), mag)  # NaN (exponent all ones, mantissa != 0) first
    else:
        absx = tl.abs(raw)  # compared in the input's own dtype: float64 keeps all its digits
        a = tl.where(absx != absx, float("inf"), absx)  # the rank key of ops.nm: NaN as +inf
    a = tl.where(col[None, :] < M, a, -1.0)  # padding lanes (M < M_PAD) never beat a real entry
    ai = a[:, :, None]  # (BLOCK_G, M_PAD, 1): the entry being ranked
    aj = a[:, None, :]  # (BLOCK_G, 1, M_PAD): its competitors
    lower = col[None, None, :] < col[None, :, None]  # competitor j sits before i
    beats = (aj > ai) | ((aj == ai) & lower)
    rank = tl.sum(beats.to(tl.int32), axis=2)  # (BLOCK_G, M_PAD): descending rank, ties to lowest index
    keep = rank < N
    # A select on the raw values: kept entries are copied bit for bit, dropped ones are +0.
    out = tl.where(keep, raw, tl.zeros_like(raw))
    tl.store(out_ptr + offs, out, mask=valid)
    tl.store(mask_ptr + offs, keep.to(tl.uint8), mask=valid)


_sparsify_activation = DualKernel(_sparsify_activation_kernel)


def sparsify_activation_forward(x: torch.Tensor, n: int = 2, m: int = 4):
    """``(X~, mask)`` of ``x`` along its last dim, in one pass.

    Args:
        x: floating tensor (float32, float16, bfloat16, float64) whose last dim is a multiple of
            ``m``; any leading dims are tokens.
        n, m: keep ``n`` of every ``m`` consecutive features.

    Returns:
        ``(x_tilde, mask)``: ``x_tilde`` like ``x``, ``mask`` a bool tensor of the same shape.

    Example:
        >>> sparsify_activation_forward(torch.tensor([[0.0, 3.0, -1.0, 0.5]]))[0]
        tensor([[ 0.,  3., -1.,  0.]])
    """
    # Checked here, not with ops.nm.check_nm: kernels import nothing from the rest of sparsetrain.
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) or not 0 < n < m:
        raise ValueError(f"`n` and `m` must be ints with 0 < n < m, got n={n!r}, m={m!r}")
    if not x.is_floating_point():
        raise TypeError(f"`x` must be a floating tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % m != 0:
        raise ValueError(f"The last dimension of `x` (shape {tuple(x.shape)}) must be a multiple of m={m}")
    if m > 32:
        raise ValueError(f"The activation kernel supports `m` <= 32 (m*m ranks per group in registers), got m={m}")
    xc = x.detach().contiguous()
    out = torch.empty_like(xc)
    mask = torch.empty(xc.shape, dtype=torch.uint8, device=xc.device)
    n_groups = xc.numel() // m
    if n_groups:
        m_pad = triton.next_power_of_2(m)
        # ~4K entries per program: enough bytes in flight per SM to stream at full bandwidth.
        block_g = max(1, min(4096 // m_pad, triton.next_power_of_2(n_groups)))
        grid = (triton.cdiv(n_groups, block_g),)
        _sparsify_activation[grid](
            load_view(xc), store_view(out), mask, n_groups,
            N=n, M=m, M_PAD=m_pad, BF16=xc.dtype == torch.bfloat16, BLOCK_G=block_g,
        )
    return out, mask.view(torch.bool)
