"""The dense backend: the sparse layer's matmuls as ordinary dense GEMMs on the masked weight.

It runs on every device and dtype. MVUE and simulated FP8 change what is multiplied, not how.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..ops import fp8 as _fp8
from . import _common


class DenseSparseLinearFunction(torch.autograd.Function):
    """``y = x @ w_eff^T + b`` with an MVUE weight gradient and optional FP8 simulation.

    Backward: ``dX = dY @ w_eff`` (exact), ``dW~ = MVUE(dY^T) @ X`` (2:4 along tokens) or
    ``dY^T @ X`` when ``mvue`` is None, ``db = sum(dY)`` (exact).
    """

    @staticmethod
    def forward(ctx, x, w_eff, bias, mvue: Optional[str], generator, fp8: bool):
        x2 = x.reshape(-1, x.shape[-1])  # (T, in): all leading batch dims are tokens
        if fp8:
            xq = _fp8.fp8_cast_roundtrip(x2, _fp8.FORWARD_DTYPE)
            wq = _fp8.fp8_cast_roundtrip(w_eff, _fp8.FORWARD_DTYPE)
        else:
            xq, wq = x2, w_eff
        y = F.linear(xq, wq, bias)
        ctx.save_for_backward(xq, wq)
        ctx.mvue, ctx.generator, ctx.fp8 = mvue, generator, fp8
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], w_eff.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xq, wq = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (T, out)
        if ctx.fp8:
            dy2 = _fp8.fp8_cast_roundtrip(dy2, _fp8.BACKWARD_DTYPE)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ wq).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            g, xx = dy2, xq
            if ctx.mvue is not None:
                g, xx = _common.mvue_tokens(dy2, xq, ctx.mvue, ctx.generator)
            dw = g.t() @ xx  # (out, T) @ (T, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None, None, None


def linear(x, w_eff, bias, *, mvue=None, generator=None, fp8=False, cache=None):
    """Dense-backend product; ``cache`` is accepted for interface parity and unused."""
    if mvue is None and not fp8:
        return F.linear(x, w_eff, bias)  # plain autograd: fastest, and torch.compile sees through it
    return DenseSparseLinearFunction.apply(x, w_eff, bias, mvue, generator, fp8)
