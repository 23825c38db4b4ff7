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

S-STE with a threshold ramp (``SparsityConfig.threshold_ramp``) uses ``ramped_soft_threshold``:
``S_r(w)_i = sign(w_i) * max(|w_i| - r * t, 0)`` with ``r`` going from 0 (dense: ``S_0(W) = W``) to
1 (S-STE's exact N:M ``S(W)``), and the scale ``1 + r * (beta - 1)``, which goes from 1 to S-STE's
frozen beta, so W~ moves continuously from W to ``beta * S(W)``. Its mask is the N:M support of
``S(W)``, the pattern the ramp ends in (what the decays, the flip rate and ``flip_moments`` use).

The math lives in `sparsetrain.ops.nm`; this module only picks it and wires the gradient. On CUDA
the fused Triton kernel computes W~ and the mask in one pass. SR-STE's decay is not here: autograd
runs once per micro-batch on loss-scaled gradients, so the decay lives in the optimizer-step path
of `sparsetrain.Sparsifier` (see `decay_term`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops.nm import _threshold, group_view, project

__all__ = ["effective_weight", "masked_weight", "decay_term", "ramped_soft_threshold"]


def ramped_soft_threshold(w: torch.Tensor, n: int, m: int, ramp: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(S_r(W), mask)``: the soft threshold with its threshold scaled by ``ramp`` in [0, 1].

    ``S_r(w)_i = sign(w_i) * max(|w_i| - ramp * t, 0)``, ``t`` the (m-n)-th smallest |w| of the
    group; ``mask`` is the support of the full ``S_1(W)`` (N:M), the pattern the ramp ends in.

    Example:
        >>> s, mask = ramped_soft_threshold(torch.tensor([[4.0, -1.0, 3.0, 2.0]]), 2, 4, 0.5)
        >>> s
        tensor([[ 3.0000, -0.0000,  2.0000,  1.0000]])
        >>> mask
        tensor([[ True, False,  True, False]])
    """
    g = group_view(w, m)  # (..., groups, m)
    t = _threshold(g.abs(), n, m)  # (..., groups, 1)
    rt = t * ramp
    s = (g - torch.clamp(g, -rt, rt)).reshape(w.shape)
    mask = (g.abs() > t).reshape(w.shape)
    return s, mask


def masked_weight(
    weight: torch.Tensor,
    method: str,
    n: int,
    m: int,
    beta: Optional[torch.Tensor] = None,
    fixed_mask: Optional[torch.Tensor] = None,
    need_mask: bool = True,
    ramp: float = 1.0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(W~, mask)`` without autograd. ``fixed_mask`` (a transposable mask) overrides the N:M mask.

    With ``need_mask=False`` S-STE skips building its mask (the forward does not use it).
    ``ramp < 1`` (S-STE only) is the threshold ramp: ``W~ = (1 + ramp (beta - 1)) * S_ramp(W)``,
    not N:M yet, computed in torch (the fused kernel has no ramp)."""
    if method == "dense":
        return weight, None
    if fixed_mask is not None:
        return weight * fixed_mask, fixed_mask
    if method == "s-ste" and ramp < 1.0:
        s, mask = ramped_soft_threshold(weight.float(), n, m, ramp)
        scale = 1.0 + ramp * (beta - 1.0)
        return (s * scale).to(weight.dtype), mask
    return project(weight, n, m, "soft" if method == "s-ste" else "hard", beta, need_mask=need_mask)


def decay_term(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(1 - mask) * W``: the pruned weights, which SR-STE and masked decay pull towards zero."""
    return weight.masked_fill(mask, 0)


class _EffectiveWeight(torch.autograd.Function):
    """Forward: W~ of the method. Backward: straight-through (dL/dW = dL/dW~)."""

    @staticmethod
    def forward(ctx, weight, method, n, m, beta, fixed_mask, ramp):
        w_eff, _ = masked_weight(weight, method, n, m, beta, fixed_mask, need_mask=False, ramp=ramp)
        return w_eff

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None, None


def effective_weight(
    weight: torch.Tensor,
    method: str,
    n: int = 2,
    m: int = 4,
    beta: Optional[torch.Tensor] = None,
    fixed_mask: Optional[torch.Tensor] = None,
    ramp: float = 1.0,
) -> torch.Tensor:
    """The differentiable effective weight W~ of ``method`` (see the table in this module).

    Args:
        weight: ``[out, in]``; groups of ``m`` run along ``in``.
        method: ``"dense"``, ``"ste"``, ``"sr-ste"`` or ``"s-ste"``.
        beta: S-STE's frozen scale (0-dim tensor); required for ``"s-ste"``.
        fixed_mask: a precomputed (e.g. transposable) mask for STE / SR-STE.
        ramp: S-STE's threshold ramp in [0, 1] (1: plain S-STE); see `ramped_soft_threshold`.

    Example:
        >>> w = torch.tensor([[1.0, -2.0, 3.0, 0.5]], requires_grad=True)
        >>> effective_weight(w, "ste")
        tensor([[ 0., -2.,  3.,  0.]], grad_fn=<_EffectiveWeightBackward>)
    """
    if method == "dense":
        return weight
    if method == "s-ste" and beta is None:
        raise ValueError("method='s-ste' needs its scale `beta`")
    return _EffectiveWeight.apply(weight, method, n, m, beta, fixed_mask, float(ramp))
