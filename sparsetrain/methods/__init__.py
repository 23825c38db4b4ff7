"""Weight sparsifiers: dense W -> effective sparse W~, with each method's backward rule.

==========  ===========================  ==========================================================
method      forward W~                    backward dL/dW
==========  ===========================  ==========================================================
``ste``     ``P(W)`` (hard N:M)          ``dL/dW~``
``sr-ste``  ``P(W)``                     ``dL/dW~``, and once per optimizer step the engine adds
                                         ``srste_decay * (1 - mask) * W`` to the gradient
``s-ste``   ``beta * S(W)`` (soft)       ``dL/dW~`` (straight through; not multiplied by beta)
``dense``   ``W``                        ``dL/dW~``
==========  ===========================  ==========================================================

The math lives in `sparsetrain.ops.nm`; this module only picks it and wires the gradient. On CUDA
the fused Triton kernel computes W~ and the mask in one pass. SR-STE's decay is not here: autograd
runs once per micro-batch on loss-scaled gradients, so the decay lives in the optimizer-step path
of `sparsetrain.Sparsifier` (see `decay_term`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import kernels
from ..ops.nm import nm_mask, soft_threshold

__all__ = ["effective_weight", "masked_weight", "decay_term"]


def masked_weight(
    weight: torch.Tensor,
    method: str,
    n: int,
    m: int,
    beta: Optional[torch.Tensor] = None,
    fixed_mask: Optional[torch.Tensor] = None,
    need_mask: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(W~, mask)`` without autograd. ``fixed_mask`` (a transposable mask) overrides the N:M mask.

    With ``need_mask=False`` S-STE skips building its mask (the forward does not use it)."""
    if method == "dense":
        return weight, None
    if fixed_mask is not None:
        return weight * fixed_mask, fixed_mask
    if kernels.available(weight):
        return kernels.project_weight(weight, n, m, method, beta)
    if method == "s-ste":
        # In float32 whatever the weight dtype, then rounded once: the Triton kernel does the same.
        s = soft_threshold(weight.float(), n, m)
        # The mask is nm_mask, as the kernel's: the support of S(W) lies inside it and equals it
        # except on tied groups, where the support is smaller and would differ from the GPU's.
        return (s * beta).to(weight.dtype), (nm_mask(weight, n, m) if need_mask else None)
    mask = nm_mask(weight, n, m)
    return weight * mask, mask


def decay_term(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(1 - mask) * W``: the pruned weights, which SR-STE and masked decay pull towards zero."""
    return weight.masked_fill(mask, 0)


class _EffectiveWeight(torch.autograd.Function):
    """Forward: W~ of the method. Backward: straight-through (dL/dW = dL/dW~)."""

    @staticmethod
    def forward(ctx, weight, method, n, m, beta, fixed_mask):
        w_eff, _ = masked_weight(weight, method, n, m, beta, fixed_mask, need_mask=False)
        return w_eff

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None


def effective_weight(
    weight: torch.Tensor,
    method: str,
    n: int = 2,
    m: int = 4,
    beta: Optional[torch.Tensor] = None,
    fixed_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The differentiable effective weight W~ of ``method`` (see the table in this module).

    Args:
        weight: ``[out, in]``; groups of ``m`` run along ``in``.
        method: ``"dense"``, ``"ste"``, ``"sr-ste"`` or ``"s-ste"``.
        beta: S-STE's frozen scale (0-dim tensor); required for ``"s-ste"``.
        fixed_mask: a precomputed (e.g. transposable) mask for STE / SR-STE.

    Example:
        >>> w = torch.tensor([[1.0, -2.0, 3.0, 0.5]], requires_grad=True)
        >>> effective_weight(w, "ste")
        tensor([[ 0., -2.,  3.,  0.]], grad_fn=<_EffectiveWeightBackward>)
    """
    if method == "dense":
        return weight
    if method == "s-ste" and beta is None:
        raise ValueError("method='s-ste' needs its scale `beta`")
    return _EffectiveWeight.apply(weight, method, n, m, beta, fixed_mask)
