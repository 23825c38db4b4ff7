"""N:M sparse activations: a linear layer whose *input* is made N:M per token.

The plain-torch reference of DESIGN.md's "Sparse activations" (Haziza et al. 2025, arXiv
2503.16672). For an input ``X`` (tokens x features, any leading dims) and a weight ``W~`` (the
weight method's effective weight, itself differentiable):

- ``mask = activation_mask(X)``: per token, the ``n`` entries of largest |x| in every group of
  ``m`` consecutive features (ties to the lowest index, NaN ranked above everything: the rule of
  ``ops.nm.nm_mask``, which this reuses);
- forward ``X~ = X * mask``, ``Y = X~ W~^T + b``;
- backward ``dX = mask * (dY W~)`` (the mask is piecewise constant in ``X``, so the masking's
  derivative is the mask itself), ``dW~ = dY^T X~``, ``db = sum_tokens dY``. The weight method's
  own rule (STE, S-STE, ...) then maps ``dW~`` to the dense weight's gradient, as for any layer.

`activation_sparse_linear` is a ``torch.library`` custom op with a registered autograd formula and
fake (meta) implementation, so ``torch.compile`` treats it as one opaque node instead of tracing
the mask's comparisons, and backward runs the closed formulas above.

Non-finite inputs: a NaN or inf ranks above every number, so it is always kept and reaches ``Y``
(the engine's NaN check then reports it); an inf the mask drops would otherwise turn into
``inf * 0 = NaN``, so the masking is a select, not a product.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .nm import check_nm, nm_mask

__all__ = [
    "activation_mask",
    "sparsify_activation",
    "activation_sparse_linear",
    "parse_nm",
]


def parse_nm(spec, name: str = "activation_sparsity") -> Optional[Tuple[int, int]]:
    """``"2:4"`` -> ``(2, 4)``; ``None`` stays ``None``. A clear error for anything else.

    Example:
        >>> parse_nm("2:4")
        (2, 4)
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise TypeError(f"`{name}` must be None or an 'N:M' string such as '2:4', got {spec!r}")
    parts = spec.strip().split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"`{name}` must be None or an 'N:M' string such as '2:4' (0 < N < M), got {spec!r}")
    n, m = (int(p) for p in parts)
    try:
        check_nm(n, m)
    except ValueError as err:
        raise ValueError(f"`{name}`={spec!r} is not a valid N:M pattern: {err}") from None
    return n, m


def activation_mask(x: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Per token, keep the ``n`` largest |x| of every ``m`` consecutive features (bool, like ``x``).

    Example:
        >>> activation_mask(torch.tensor([[0.0, 3.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]]))
        tensor([[False,  True, False,  True,  True,  True, False, False]])
    """
    return nm_mask(x, n, m)


def sparsify_activation(x: torch.Tensor, n: int = 2, m: int = 4) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(X~, mask)`` without autograd: the Triton kernel on CUDA, the torch reference elsewhere.

    Example:
        >>> sparsify_activation(torch.tensor([[0.5, -2.0, 0.0, 1.0]]))[0]
        tensor([[ 0., -2.,  0.,  1.]])
    """
    from .. import kernels  # the Triton twin; imported lazily (it imports no triton itself)

    if kernels.available(x) and m <= 32:
        return kernels.sparsify_activation(x, n, m)
    mask = activation_mask(x, n, m)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)), mask


@torch.library.custom_op("sparsetrain::activation_sparse_linear", mutates_args=())
def _act_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], n: int, m: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Y, X~, mask)``; X~ and the mask are outputs so that backward can keep them."""
    xt, mask = sparsify_activation(x.detach(), n, m)
    y = F.linear(xt, weight.detach(), None if bias is None else bias.detach())
    return y, xt, mask


@_act_linear.register_fake
def _(x, weight, bias, n, m):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def _setup_context(ctx, inputs, output):
    x, weight, bias, n, m = inputs
    _, xt, mask = output
    ctx.save_for_backward(xt, mask, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dxt, _dmask):
    xt, mask, weight = ctx.saved_tensors
    dx = dw = db = None
    dy2 = dy.reshape(-1, dy.shape[-1])  # (T, out): every leading dim is a token
    if ctx.needs_input_grad[0]:
        dx = torch.where(mask, (dy2 @ weight).reshape(mask.shape), torch.zeros((), dtype=dy.dtype, device=dy.device))
    if ctx.needs_input_grad[1]:
        dw = dy2.t() @ xt.reshape(-1, xt.shape[-1])  # (out, T) @ (T, in)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = dy2.sum(0)
    return dx, dw, db, None, None


_act_linear.register_autograd(_backward, setup_context=_setup_context)


def activation_sparse_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, n: int = 2, m: int = 4
) -> torch.Tensor:
    """``Y = (X * mask(X)) W^T + b`` with the N:M input mask; differentiable in ``x``, ``weight``, ``bias``.

    Args:
        x: ``(..., in)`` input; ``in`` must be a multiple of ``m``.
        weight: ``(out, in)``: pass the layer's effective weight ``W~`` (its own autograd rule
            applies on top of ``dW~``).
        bias: ``(out,)`` or None.
        n, m: keep ``n`` of every ``m`` consecutive input features, per token.

    Example:
        >>> x = torch.tensor([[0.5, -2.0, 0.1, 1.0]])
        >>> activation_sparse_linear(x, torch.ones(1, 4))
        tensor([[-1.]])
    """
    check_nm(n, m)
    if x.shape[-1] % m:
        raise ValueError(
            f"The last dimension of `x` ({x.shape[-1]}, shape {tuple(x.shape)}) is not a multiple of m={m}: "
            "activation groups run along the input features"
        )
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"`weight` must be (out, {x.shape[-1]}) for `x` of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    return _act_linear(x, weight, bias, n, m)[0]
