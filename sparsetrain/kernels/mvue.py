"""MVUE 2:4 in Triton: unbiased 2-of-4 sparsification of a gradient in one pass.

Twin of `sparsetrain.ops.mvue24`: the same inclusion probabilities (``exact``: ``p_i = min(1,
c|g_i|)`` with systematic sampling; ``approx``: the 2by4 two-draw scheme) and the same decision
rule given the same uniforms. The uniforms come from Philox (``tl.rand``) keyed by a seed drawn
once from the caller's `torch.Generator` and by the group index, so a fixed generator state gives
a fixed output, but not the stream ``torch.rand`` would give: compare draws statistically, or
pass ``uniforms`` to reproduce the torch twin's decisions.

Groups are 4 consecutive entries along ``dim``. The tensor is viewed as ``(P, L, Q)`` with ``L``
the grouped dim; consecutive programs walk ``Q`` fastest, so for ``dY`` of shape ``(T, out)``
grouped along tokens (``dim=0``) every one of the 4 loads of a block is a contiguous run.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import DualKernel
from ._checks import check_mvue_method as _check_method
from ._tl_utils import bf16_bits_to_f32, load_view, round_to_bf16_bits, store_view

__all__ = ["mvue24_forward"]


def _mvue24_kernel(
    g_ptr,
    out_ptr,
    u_ptr,
    seed_ptr,
    n_groups,
    Q,
    K,
    s_gp,
    s_gl,
    s_gq,
    s_op,
    s_ol,
    s_oq,
    APPROX: tl.constexpr,
    HAS_U: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    gid = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) group ids, q fastest
    valid = gid < n_groups
    q = gid % Q
    k = (gid // Q) % K
    p = gid // (Q * K)
    gbase = p * s_gp + 4 * k * s_gl + q * s_gq
    obase = p * s_op + 4 * k * s_ol + q * s_oq

    if OUT_BF16:  # bf16 input read as bits (see _tl_utils.bf16_bits_to_f32)
        g0 = bf16_bits_to_f32(tl.load(g_ptr + gbase, mask=valid, other=0))
        g1 = bf16_bits_to_f32(tl.load(g_ptr + gbase + s_gl, mask=valid, other=0))
        g2 = bf16_bits_to_f32(tl.load(g_ptr + gbase + 2 * s_gl, mask=valid, other=0))
        g3 = bf16_bits_to_f32(tl.load(g_ptr + gbase + 3 * s_gl, mask=valid, other=0))
    else:
        g0 = tl.load(g_ptr + gbase, mask=valid, other=0.0).to(tl.float32)
        g1 = tl.load(g_ptr + gbase + s_gl, mask=valid, other=0.0).to(tl.float32)
        g2 = tl.load(g_ptr + gbase + 2 * s_gl, mask=valid, other=0.0).to(tl.float32)
        g3 = tl.load(g_ptr + gbase + 3 * s_gl, mask=valid, other=0.0).to(tl.float32)
    a0 = tl.abs(g0)
    a1 = tl.abs(g1)
    a2 = tl.abs(g2)
    a3 = tl.abs(g3)

    if HAS_U:
        if APPROX:
            u0 = tl.load(u_ptr + 2 * gid, mask=valid, other=0.0)
            u1 = tl.load(u_ptr + 2 * gid + 1, mask=valid, other=0.0)
        else:
            u0 = tl.load(u_ptr + gid, mask=valid, other=0.0)
    else:
        seed = tl.load(seed_ptr)
        if APPROX:
            u0 = tl.rand(seed, 2 * gid)
            u1 = tl.rand(seed, 2 * gid + 1)
        else:
            u0 = tl.rand(seed, gid)

    tiny = 1.1754943508222875e-38  # float32 tiny, ops.mvue._TINY
    if APPROX:
        # Mirrors ops.mvue.approx_probabilities term by term (1e-30 is ops.mvue.APPROX_EPS).
        e0 = a0 + 1e-30
        e1 = a1 + 1e-30
        e2 = a2 + 1e-30
        e3 = a3 + 1e-30
        s = e0 + e1 + e2 + e3
        t0 = e0 / s
        t1 = e1 / s
        t2 = e2 / s
        t3 = e3 / s
        # P(i drawn second) = a_i * sum_{j != i} t_j / (S - a_j)
        # S - a_j summed from the other three, as ops.mvue does: subtracting cancels to 0 when
        # a_j dwarfs them.
        v0 = t0 / ((e3 + e2) + e1)
        v1 = t1 / ((e0 + e3) + e2)
        v2 = t2 / ((e1 + e0) + e3)
        v3 = t3 / ((e2 + e1) + e0)
        vs = v0 + v1 + v2 + v3
        p0 = tl.minimum(t0 + e0 * (vs - v0), 1.0)
        p1 = tl.minimum(t1 + e1 * (vs - v1), 1.0)
        p2 = tl.minimum(t2 + e2 * (vs - v2), 1.0)
        p3 = tl.minimum(t3 + e3 * (vs - v3), 1.0)
        # First draw proportional to |g|: the count of cumulative sums at or below u * total.
        c0 = e0
        c1 = c0 + e1
        c2 = c1 + e2
        c3 = c2 + e3
        x = u0 * c3
        first = (c0 <= x).to(tl.int32) + (c1 <= x).to(tl.int32) + (c2 <= x).to(tl.int32) + (c3 <= x).to(tl.int32)
        first = tl.minimum(first, 3)
        r0 = tl.where(first == 0, 0.0, e0)
        r1 = tl.where(first == 1, 0.0, e1)
        r2 = tl.where(first == 2, 0.0, e2)
        r3 = tl.where(first == 3, 0.0, e3)
        d0 = r0
        d1 = d0 + r1
        d2 = d1 + r2
        d3 = d2 + r3
        y = u1 * d3
        second = (d0 <= y).to(tl.int32) + (d1 <= y).to(tl.int32) + (d2 <= y).to(tl.int32) + (d3 <= y).to(tl.int32)
        second = tl.minimum(second, 3)
        # Rounding can push the draw past the last positive weight; fall back to that entry.
        last_pos = tl.where(r3 > 0, 3, tl.where(r2 > 0, 2, tl.where(r1 > 0, 1, tl.where(r0 > 0, 0, -1))))
        r_sec = tl.where(second == 0, r0, tl.where(second == 1, r1, tl.where(second == 2, r2, r3)))
        second = tl.where(r_sec > 0, second, last_pos)
        k0 = (first == 0) | (second == 0)
        k1 = (first == 1) | (second == 1)
        k2 = (first == 2) | (second == 2)
        k3 = (first == 3) | (second == 3)
    else:
        s = a0 + a1 + a2 + a3
        amax = tl.maximum(tl.maximum(a0, a1), tl.maximum(a2, a3))
        # The other three summed directly, as ops.mvue.exact_inv_c: s - amax cancels.
        rest = tl.where(a0 == amax, a1 + a2 + a3,
                        tl.where(a1 == amax, a0 + a2 + a3, tl.where(a2 == amax, a0 + a1 + a3, a0 + a1 + a2)))
        # When the largest is at least the other three together it is kept surely (c*amax >= 1)
        # and the others share the second slot in proportion to |g|: c = 1/rest; else c = 2/S.
        inv_c = tl.where(amax > rest, rest, s * 0.5)
        # p = min(1, a / inv_c) by division, as ops.mvue._exact_p: 1 / inv_c overflows for
        # denormal groups. inv_c = 0: at most one non-zero, kept surely.
        pos = inv_c > 0
        safe = tl.where(pos, inv_c, 1.0)
        p0 = tl.minimum(tl.where(pos, a0 / safe, tl.where(a0 > 0, 1.0, 0.0)), 1.0)
        p1 = tl.minimum(tl.where(pos, a1 / safe, tl.where(a1 > 0, 1.0, 0.0)), 1.0)
        p2 = tl.minimum(tl.where(pos, a2 / safe, tl.where(a2 > 0, 1.0, 0.0)), 1.0)
        p3 = tl.minimum(tl.where(pos, a3 / safe, tl.where(a3 > 0, 1.0, 0.0)), 1.0)
        # Systematic sampling: entry i is kept when [C_{i-1}, C_i) holds u or u+1 (p_i <= 1).
        # Boundaries as in ops.mvue._exact: clamped at 2, and from the last non-zero on the
        # exact total min(2, non-zeros); points counted as (u < C) + (u < C - 1), never C - u.
        n0 = a0 > 0
        n1 = a1 > 0
        n2 = a2 > 0
        n3 = a3 > 0
        total = tl.minimum(n0.to(tl.float32) + n1.to(tl.float32) + n2.to(tl.float32) + n3.to(tl.float32), 2.0)
        c0 = p0
        c1 = tl.minimum(c0 + p1, 2.0)
        c2 = tl.minimum(c1 + p2, 2.0)
        b0 = tl.where(n1 | n2 | n3, c0, total)
        b1 = tl.where(n2 | n3, c1, total)
        b2 = tl.where(n3, c2, total)
        h0 = (u0 < b0).to(tl.int32) + (u0 < b0 - 1.0).to(tl.int32)
        h1 = (u0 < b1).to(tl.int32) + (u0 < b1 - 1.0).to(tl.int32)
        h2 = (u0 < b2).to(tl.int32) + (u0 < b2 - 1.0).to(tl.int32)
        h3 = (u0 < total).to(tl.int32) + (u0 < total - 1.0).to(tl.int32)
        # A kept entry's g/p is sign(g) * max(|g|, 1/c): p is 1 or c|g|.
        v0 = tl.maximum(a0, inv_c)
        v1 = tl.maximum(a1, inv_c)
        v2 = tl.maximum(a2, inv_c)
        v3 = tl.maximum(a3, inv_c)
        o0 = tl.where(n0 & (h0 > 0), tl.where(g0 < 0, -v0, v0), 0.0)
        o1 = tl.where(n1 & (h1 > h0), tl.where(g1 < 0, -v1, v1), 0.0)
        o2 = tl.where(n2 & (h2 > h1), tl.where(g2 < 0, -v2, v2), 0.0)
        o3 = tl.where(n3 & (h3 > h2), tl.where(g3 < 0, -v3, v3), 0.0)

    if APPROX:
        o0 = tl.where(k0, g0 / tl.maximum(p0, tiny), 0.0)
        o1 = tl.where(k1, g1 / tl.maximum(p1, tiny), 0.0)
        o2 = tl.where(k2, g2 / tl.maximum(p2, tiny), 0.0)
        o3 = tl.where(k3, g3 / tl.maximum(p3, tiny), 0.0)
    # A group holding NaN or inf (its float32 sum is then NaN or inf) comes out all NaN, as in
    # ops.mvue. Explicit, because tl.maximum/minimum drop NaN on the GPU but keep it interpreted.
    bad = ~(s <= 3.4028234663852886e38)
    o0 = tl.where(bad, float("nan"), o0)
    o1 = tl.where(bad, float("nan"), o1)
    o2 = tl.where(bad, float("nan"), o2)
    o3 = tl.where(bad, float("nan"), o3)
    if OUT_BF16:
        tl.store(out_ptr + obase, round_to_bf16_bits(o0), mask=valid)
        tl.store(out_ptr + obase + s_ol, round_to_bf16_bits(o1), mask=valid)
        tl.store(out_ptr + obase + 2 * s_ol, round_to_bf16_bits(o2), mask=valid)
        tl.store(out_ptr + obase + 3 * s_ol, round_to_bf16_bits(o3), mask=valid)
    else:
        ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + obase, o0.to(ty), mask=valid)
        tl.store(out_ptr + obase + s_ol, o1.to(ty), mask=valid)
        tl.store(out_ptr + obase + 2 * s_ol, o2.to(ty), mask=valid)
        tl.store(out_ptr + obase + 3 * s_ol, o3.to(ty), mask=valid)


_mvue24 = DualKernel(_mvue24_kernel)


def draw_seed(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """One int64 seed on ``device`` drawn from ``generator`` (or the default generator).

    The seed stays a device tensor that the kernel reads, so drawing it never synchronises the
    host with a CUDA stream.
    """
    gen_device = generator.device if generator is not None else torch.device(device)
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


def _plq_strides(t: torch.Tensor, dim: int, name: str):
    """Strides of ``t`` viewed as ``(P, L, Q)`` around ``dim``; None when no such view exists."""
    if t.is_contiguous():
        q = math.prod(t.shape[dim + 1 :])
        return t.shape[dim] * q, q, 1
    if t.dim() == 2:
        return 0, t.stride(dim), t.stride(1 - dim)
    raise ValueError(f"`{name}` must be contiguous or 2-D, got shape {tuple(t.shape)} strides {t.stride()}")


def mvue24_forward(
    g: torch.Tensor,
    dim: int = -1,
    method: str = "exact",
    generator: Optional[torch.Generator] = None,
    *,
    uniforms: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Unbiased 2:4 sparsification of ``g`` in groups of 4 along ``dim`` (Triton).

    Args:
        g: floating tensor with ``g.shape[dim] % 4 == 0``.
        dim: the grouped dimension (0, the tokens, for ``dY`` of shape ``(T, out)``).
        method: ``"exact"`` or ``"approx"``, as in `ops.mvue24`.
        generator: one seed is drawn from it per call; same state, same output.
        uniforms: instead of Philox draws, the uniforms `ops.mvue24` would draw: shape
            ``(r, P, L // 4, Q)`` with ``P``/``Q`` the products of the dims before/after ``dim``
            and ``r`` 1 (``exact``) or 2 (``approx``). For tests: the output then follows the
            torch twin's decisions.
        out: where to write, e.g. ``torch.empty(out_f, T).t()`` so that the result is already
            the transposed (row-major ``dY^T``) layout cuSPARSELt compresses; contiguous or 2-D.

    Returns:
        ``out`` (or a new tensor like ``g``) with at most 2 non-zeros per group.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> y = mvue24_forward(torch.tensor([4.0, 1.0, 0.0, 0.0]), generator=gen)
        >>> int((y != 0).sum()), y[0].item()
        (2, 4.0)
    """
    _check_method(method)
    if not g.is_floating_point():
        raise TypeError(f"`g` must be a floating tensor, got dtype {g.dtype}")
    if g.dim() == 0:
        raise ValueError("`g` must have at least one dimension, got a scalar")
    dim = dim % g.dim()
    if g.shape[dim] % 4 != 0:
        raise ValueError(f"`g.shape[{dim}]`={g.shape[dim]} is not a multiple of 4 (shape {tuple(g.shape)})")
    if out is None:
        out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    elif out.shape != g.shape or out.dtype != g.dtype or out.device != g.device:
        raise ValueError(
            f"`out` must match `g` in shape, dtype and device, got {tuple(out.shape)} {out.dtype} {out.device}"
        )
    if not g.is_contiguous() and g.dim() != 2:
        g = g.contiguous()
    big_p = math.prod(g.shape[:dim])
    big_l = g.shape[dim]
    big_q = math.prod(g.shape[dim + 1 :])
    k = big_l // 4
    n_groups = big_p * k * big_q
    approx = method == "approx"
    r = 2 if approx else 1
    if uniforms is not None:
        want = (r, big_p, k, big_q)
        if tuple(uniforms.shape) != want:
            raise ValueError(f"`uniforms` must have shape {want} (as `ops.mvue24` draws), got {tuple(uniforms.shape)}")
        # ops' layout is (r, P, K, Q); the kernel reads the r draws of a group side by side.
        u = uniforms.permute(1, 2, 3, 0).contiguous().float().to(g.device)
        seed = torch.zeros(1, dtype=torch.int64, device=g.device)  # unread
    else:
        u = torch.zeros(1, dtype=torch.float32, device=g.device)  # unread
        seed = draw_seed(generator, g.device)
    if n_groups == 0:
        return out
    s_g = _plq_strides(g, dim, "g")
    s_o = _plq_strides(out, dim, "out")
    # 1024 groups (4096 entries) per program keeps ~16 KB of bf16 loads in flight per block.
    block = min(1024, triton.next_power_of_2(n_groups))
    grid = (triton.cdiv(n_groups, block),)
    _mvue24[grid](
        load_view(g), store_view(out), u, seed, n_groups, big_q, k, *s_g, *s_o,
        APPROX=approx, HAS_U=uniforms is not None, OUT_BF16=g.dtype == torch.bfloat16, BLOCK=block,
    )
    return out
