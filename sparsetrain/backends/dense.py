"""The dense backend: the sparse layer's matmuls as ordinary dense GEMMs on the masked weight.

It runs on every device and dtype. MVUE changes what is multiplied, not how; FP8 runs the three
products as real FP8 GEMMs on sm89+ and as the per-tensor cast round-trip simulation elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import fp8 as _fp8
from . import _common


class DenseSparseLinearFunction(torch.autograd.Function):
    """``y = x @ w_eff^T + b`` with an MVUE weight gradient and optional FP8 GEMMs.

    Backward: ``dX = dY @ w_eff`` (exact), ``dW~ = MVUE(dY^T) @ X`` (2:4 along tokens) or
    ``dY^T @ X`` when ``mvue`` is None, ``db = sum(dY)`` (exact).

    With ``fp8`` all three products go through `ops.fp8.scaled_mm` (real FP8 GEMMs on sm89+, the
    cast round-trip simulation elsewhere): ``y`` from e4m3 ``x`` and ``w_eff``; ``dX`` from e5m2
    ``dY`` and e4m3 ``w_eff``; ``dW`` from e5m2 ``G^T`` and e4m3 ``X``, where ``G`` is ``dY`` or,
    with ``mvue``, the MVUE of the e5m2-rounded ``dY`` (rounded to e5m2 again as the GEMM operand:
    MVUE's rescaled values are not e5m2 numbers). ``db`` is the exact sum of the un-quantised
    ``dY`` in its dtype, as a bias-gradient epilogue on the high-precision gradient would give.
    Backward re-quantises the saved ``x`` and ``w_eff`` (the same scales, so the same FP8 values
    as in forward) rather than keeping quantised copies alive between the passes.
    """

    @staticmethod
    def forward(ctx, x, w_eff, bias, mvue: str | None, generator, fp8: bool):
        x2 = x.reshape(-1, x.shape[-1])  # (T, in): all leading batch dims are tokens
        if fp8:
            e4m3 = _fp8.FORWARD_DTYPE
            y = _fp8.scaled_mm(x2, w_eff.t(), e4m3, e4m3, out_dtype=x.dtype, bias=bias)
        else:
            y = F.linear(x2, w_eff, bias)
        # A (seed, offset) draw is a tensor: saved as one, so that torch.compile can trace it.
        draw = generator if isinstance(generator, torch.Tensor) else None
        ctx.save_for_backward(x2, w_eff, draw)
        ctx.mvue, ctx.generator, ctx.fp8 = mvue, None if draw is not None else generator, fp8
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], w_eff.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w, draw = ctx.saved_tensors
        rng = draw if draw is not None else ctx.generator
        dy2 = dy.reshape(-1, dy.shape[-1])  # (T, out)
        dx = dw = db = None
        if ctx.fp8:
            e4m3, e5m2 = _fp8.FORWARD_DTYPE, _fp8.BACKWARD_DTYPE
            if ctx.needs_input_grad[0]:
                dx = _fp8.scaled_mm(dy2, w, e5m2, e4m3, out_dtype=x2.dtype).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                g, xx = dy2, x2
                if ctx.mvue is not None:
                    dyq = _fp8.fp8_cast_roundtrip(dy2, e5m2)
                    g, xx = _common.mvue_tokens(dyq, x2, ctx.mvue, rng)
                dw = _fp8.scaled_mm(g.t(), xx, e5m2, e4m3, out_dtype=w.dtype)  # (out, T) @ (T, in)
        else:
            if ctx.needs_input_grad[0]:
                dx = (dy2 @ w).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                g, xx = dy2, x2
                if ctx.mvue is not None:
                    g, xx = _common.mvue_tokens(dy2, x2, ctx.mvue, rng)
                dw = g.t() @ xx  # (out, T) @ (T, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)  # exact, from the un-quantised dY also with fp8
        return dx, dw, db, None, None, None


def linear(x, w_eff, bias, *, mvue=None, generator=None, fp8=False, cache=None):
    """Dense-backend product; ``cache`` is accepted for interface parity and unused."""
    if mvue is None and not fp8:
        return F.linear(x, w_eff, bias)  # plain autograd: fastest, and torch.compile sees through it
    return DenseSparseLinearFunction.apply(x, w_eff, bias, mvue, generator, fp8)
