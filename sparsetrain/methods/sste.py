"""``s-ste``: S-STE (Hu et al. 2024), the soft threshold with a frozen per-tensor scale.

Forward ``W~ = beta * S(W)`` with ``S(w)_i = sign(w_i) * max(|w_i| - t, 0)``, ``t`` the (m-n)-th
smallest |w| of the group; backward straight-through (dL/dW = dL/dW~, not multiplied by beta).
``beta = <W, S(W)> / <S(W), S(W)>`` (the least-squares fit of W by beta * S(W)) is taken once, when
sparse training starts, and kept in the layer's ``beta`` buffer.

With a threshold ramp (``SparsityConfig.threshold_ramp``) the threshold is scaled by ``r`` in
[0, 1]: ``S_r(w)_i = sign(w_i) * max(|w_i| - r t, 0)`` and the scale ``1 + r (beta - 1)``, so W~
moves continuously from W (r = 0) to ``beta * S(W)`` (r = 1). Its mask is the N:M support of
``S(W)``, the pattern the ramp ends in (what the decays, the flip rate and ``flip_moments`` use).
"""

from __future__ import annotations

from typing import Tuple

import torch

from ..ops.nm import _threshold, group_view, project, soft_threshold
from .base import Method, accumulation_dtype
from .registry import register

__all__ = ["SSTE", "ramped_soft_threshold"]


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


@register
class SSTE(Method):
    name = "s-ste"
    summary = "soft threshold W~ = beta * S(W) with a frozen per-tensor scale beta (Hu et al. 2024)"
    mode = "soft"
    has_scale = True
    supports_ramp = True

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.transposable:
            raise ValueError(
                "`transposable=True` is supported for method='ste' and 'sr-ste' (the T-SR-STE recipe); "
                "S-STE's soft threshold has no transposable form yet. Use method='sr-ste'."
            )

    def project(self, w, n, m, scale=None, ramp=1.0, need_mask=True):
        if scale is None:
            raise ValueError("method='s-ste' needs its scale `beta`")
        if ramp < 1.0:
            # Mid-ramp W~ is not N:M yet: computed in torch (the fused kernel has no ramp).
            s, mask = ramped_soft_threshold(w.float(), n, m, ramp)
            return (s * (1.0 + ramp * (scale - 1.0))).to(w.dtype), mask
        return project(w, n, m, "soft", scale, need_mask=need_mask)

    def scale_stats(self, w, n, m):
        # <W, S(W)> and <S(W), S(W)>: sums, so FSDP2 shards add them up with one all-reduce.
        acc = accumulation_dtype(w)
        w32 = w.detach().float()
        s = soft_threshold(w32, n, m).to(acc)
        w_acc = w32.to(acc)
        return torch.stack([(w_acc * s).sum(), (s * s).sum()])

    def scale_from_stats(self, stats):
        num, den = stats[0], stats[1]
        # den is NaN when S(W) is (a non-finite weight): keep the NaN, so the NaN check reports it.
        fallback = torch.where(torch.isnan(den), den, torch.ones_like(den))
        return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), fallback).float()
