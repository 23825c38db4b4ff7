"""Fused N:M activation sparsification: ``X~`` and its mask in one read of ``X``.

Twin of `sparsetrain.ops.activation.sparsify_activation` (the torch reference): per token, every
group of ``m`` consecutive features keeps its ``n`` largest |x| (ties to the lowest index, NaN
ranked above +inf, the rule of ``ops.nm.nm_mask``), and

- ``mask`` is bit-equal to ``ops.activation.activation_mask(x, n, m)``,
- ``X~`` is ``where(mask, x, 0)``: kept entries bit for bit (a kept NaN or inf stays), dropped
  entries +0.

`sparsify_pack24_forward` does the same for 2:4 and also writes cuSPARSELt's compressed operand
(values and metadata, the layout `sparsetrain.ops.cslt_layout` documents and is the torch twin of),
so the GPU path (`backends.cusparselt_activation`) hands it to ``torch._cslt_sparse_mm`` without a
second pass through ``torch._cslt_compress``. That layout is NVIDIA's undocumented one as PyTorch's
own packer writes it; the backend checks it once per device and dtype against
``torch._cslt_compress`` before trusting it, and uses the two-pass path when they differ.

Memory traffic: one read of ``x``, one write of ``X~`` and one byte of mask per entry; the rank is
``m*m`` comparisons in registers per group (16 for 2:4), so the kernel is bandwidth bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import DualKernel
from ._tl_utils import load_view, store_view

__all__ = ["sparsify_activation_forward", "sparsify_pack24_forward"]


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


# ------------------------------------------------------------------------------------------------
# 2:4 with cuSPARSELt's packed operand: X~, the mask and the compressed buffer in one read of X.


def _sparsify_pack24_kernel(
    x_ptr,  # (rows, cols) int16 bits of an fp16/bf16 matrix, row-major
    xt_ptr,  # (rows, cols) int16: X~
    mask_ptr,  # (rows, cols) uint8
    buf_ptr,  # (rows*cols/2 + rows*cols/16,) int16: packed values, then metadata words
    rows,
    cols,
    NAN_ABOVE: tl.constexpr,  # |bits| above this is a NaN: 0x7C00 (fp16), 0x7F80 (bf16)
    BLOCK_R: tl.constexpr,
):
    # One program: BLOCK_R rows x 16 columns, i.e. one metadata word per row (4 groups of 4).
    pid_r = tl.program_id(0)
    c0 = tl.program_id(1) * 16
    r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    g = tl.arange(0, 4)  # (4,) the groups of this word
    base = r[:, None] * cols + c0 + 4 * g[None, :]  # (BLOCK_R, 4): column 0 of each group
    b0 = tl.load(x_ptr + base + 0).to(tl.int32)
    b1 = tl.load(x_ptr + base + 1).to(tl.int32)
    b2 = tl.load(x_ptr + base + 2).to(tl.int32)
    b3 = tl.load(x_ptr + base + 3).to(tl.int32)
    # Rank key: |x| of a 16-bit float is its bits without the sign, ordered like the magnitudes for
    # non-NaN values; NaN goes above +inf (ops.nm's rule). Ties go to the lower position.
    k0 = b0 & 0x7FFF
    k1 = b1 & 0x7FFF
    k2 = b2 & 0x7FFF
    k3 = b3 & 0x7FFF
    k0 = tl.where(k0 > NAN_ABOVE, 0x8000, k0)
    k1 = tl.where(k1 > NAN_ABOVE, 0x8000, k1)
    k2 = tl.where(k2 > NAN_ABOVE, 0x8000, k2)
    k3 = tl.where(k3 > NAN_ABOVE, 0x8000, k3)
    # rank of p = how many of the others beat it (strictly larger, or equal and earlier)
    rank0 = (k1 > k0).to(tl.int32) + (k2 > k0).to(tl.int32) + (k3 > k0).to(tl.int32)
    rank1 = (k0 >= k1).to(tl.int32) + (k2 > k1).to(tl.int32) + (k3 > k1).to(tl.int32)
    rank2 = (k0 >= k2).to(tl.int32) + (k1 >= k2).to(tl.int32) + (k3 > k2).to(tl.int32)
    rank3 = (k0 >= k3).to(tl.int32) + (k1 >= k3).to(tl.int32) + (k2 >= k3).to(tl.int32)
    keep0 = rank0 < 2
    keep1 = rank1 < 2
    keep2 = rank2 < 2
    keep3 = rank3 < 2
    first = tl.where(keep0, 0, tl.where(keep1, 1, 2))  # the lower kept position
    second = tl.where(keep3, 3, tl.where(keep2, 2, 1))  # the higher one
    v0 = tl.where(first == 0, b0, tl.where(first == 1, b1, b2))
    v1 = tl.where(second == 3, b3, tl.where(second == 2, b2, b1))
    zero = tl.zeros_like(b0)
    tl.store(xt_ptr + base + 0, tl.where(keep0, b0, zero).to(tl.int16))
    tl.store(xt_ptr + base + 1, tl.where(keep1, b1, zero).to(tl.int16))
    tl.store(xt_ptr + base + 2, tl.where(keep2, b2, zero).to(tl.int16))
    tl.store(xt_ptr + base + 3, tl.where(keep3, b3, zero).to(tl.int16))
    tl.store(mask_ptr + base + 0, keep0.to(tl.uint8))
    tl.store(mask_ptr + base + 1, keep1.to(tl.uint8))
    tl.store(mask_ptr + base + 2, keep2.to(tl.uint8))
    tl.store(mask_ptr + base + 3, keep3.to(tl.uint8))
    # Values: row r holds cols/2 kept entries; this word's 4 groups own 8 of them, 2 per group.
    vbase = r[:, None] * (cols // 2) + c0 // 2 + 2 * g[None, :]
    tl.store(buf_ptr + vbase, v0.to(tl.int16))
    tl.store(buf_ptr + vbase + 1, v1.to(tl.int16))
    # Metadata word: group g's nibble (first | second << 2) at bits 4g; where it goes: ops.cslt_layout.
    word = tl.sum((first | (second << 2)) << (4 * g[None, :]), axis=1)  # (BLOCK_R,) in 0..0xFFFF
    r32 = r % 32
    pos = (r // 128) * 512 + (c0 // 64) * (512 * (rows // 128))
    pos += ((r % 128) // 32) * 64 + ((c0 % 64) // 32) * 256
    pos += 8 * (r32 % 8) + 4 * (r32 // 16) + 2 * ((c0 % 32) // 16) + (r32 // 8) % 2
    word16 = tl.where(word >= 0x8000, word - 0x10000, word).to(tl.int16)  # the same 16 bits
    tl.store(buf_ptr + (rows * cols) // 2 + pos, word16)


_sparsify_pack24 = DualKernel(_sparsify_pack24_kernel)
_NAN_ABOVE = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}  # largest non-NaN |bits|: +inf


def sparsify_pack24_forward(x: torch.Tensor):
    """``(X~, mask, buffer)`` of a ``(rows, cols)`` fp16/bf16 matrix in one pass.

    ``mask`` is the 2:4 mask along the rows (bit-equal to ``ops.nm_mask(x, 2, 4)``), ``X~`` keeps
    the kept entries bit for bit, and ``buffer`` is ``ops.cslt_layout.pack24(X~, mask)``:
    cuSPARSELt's compressed operand. ``rows`` and ``cols`` must be multiples of 128.

    Example:
        >>> x = torch.randn(128, 128).to(torch.bfloat16)
        >>> xt, mask, buf = sparsify_pack24_forward(x)
        >>> buf.shape
        torch.Size([9216])
    """
    # Checked here, not with ops.cslt_layout: kernels import nothing from the rest of sparsetrain.
    if x.dim() != 2 or x.dtype not in _NAN_ABOVE:
        raise ValueError(f"`x` must be a 2-D float16/bfloat16 matrix, got {x.dtype} of shape {tuple(x.shape)}")
    rows, cols = x.shape
    if rows % 128 or cols % 128 or rows == 0 or cols == 0:
        raise ValueError(f"cuSPARSELt's packed 2:4 layout needs rows and cols that are positive multiples of 128, got {tuple(x.shape)}")
    xc = x.detach().contiguous()
    xt = torch.empty_like(xc)
    mask = torch.empty(xc.shape, dtype=torch.uint8, device=xc.device)
    buf = torch.empty(rows * cols // 2 + rows * cols // 16, dtype=xc.dtype, device=xc.device)
    block_r = 128
    grid = (rows // block_r, cols // 16)
    _sparsify_pack24[grid](
        xc.view(torch.int16), xt.view(torch.int16), mask, buf.view(torch.int16), rows, cols,
        NAN_ABOVE=_NAN_ABOVE[xc.dtype], BLOCK_R=block_r,
    )
    return xt, mask.view(torch.bool), buf
