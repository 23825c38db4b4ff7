"""Unbiased 2:4 sparsification of gradients (MVUE, Chmiel et al. 2023; used by S-STE).

``mvue24(g)`` keeps exactly 2 of every 4 consecutive entries along ``dim`` (fewer only where a
group has fewer non-zeros), rescaled so that ``E[mvue24(g)] = g``. The weight gradient
``dW = dY^T X`` then becomes a 2:4-sparse x dense product.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["mvue24", "mvue24_probabilities", "MVUE_CHOICES"]

MVUE_CHOICES = ("exact", "approx")
# Added to |g| by the approximate estimator so that every entry has a positive probability of
# being drawn second; small enough to vanish next to any float32 gradient that is not ~0.
_APPROX_EPS = 1e-30


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / b.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(a))


def mvue24_probabilities(a: torch.Tensor, method: str = "exact") -> torch.Tensor:
    """Inclusion probabilities of each entry of groups ``a = |g|`` (shape ``[..., 4]``, float32).

    ``exact``: ``p_i = min(1, c * a_i)`` with ``sum p = 2``. ``approx``: the probability that
    2by4's draw (first index by ``a_i/S``, second among the rest by ``a``) includes ``i``.
    """
    if method == "exact":
        s = a.sum(-1, keepdim=True)
        amax, imax = a.max(-1, keepdim=True)
        rest = s - amax
        # If the largest is at least the sum of the other three it is kept surely and the other
        # three share the second slot in proportion to |g|.
        clip = amax > rest
        is_max = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, imax, True)
        p_clip = torch.where(is_max, torch.ones_like(a), _safe_div(a, rest))
        p_free = _safe_div(2 * a, s)
        return torch.where(clip, p_clip, p_free).clamp_(max=1.0)
    if method == "approx":
        a = a + _APPROX_EPS
        # S - a_j summed from the other three: subtracting would cancel to 0 when a_j dwarfs them.
        others = a.roll(1, -1) + a.roll(2, -1) + a.roll(3, -1)
        s = a.sum(-1, keepdim=True)
        t = a / s
        # P(i drawn second) = sum_{j != i} P(j first) * a_i / (S - a_j)
        u = t / others  # (..., 4): t_j / (S - a_j)
        second = a * (u.sum(-1, keepdim=True) - u)
        return (t + second).clamp_(max=1.0)
    raise ValueError(f"Unknown MVUE `method`={method!r}; valid choices: {', '.join(map(repr, MVUE_CHOICES))}")


def _interval_hits(cum: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Number of the points ``u, u+1`` lying below each cumulative sum."""
    return (cum > u).to(torch.int8) + (cum > u + 1).to(torch.int8)


def mvue24(
    g: torch.Tensor,
    dim: int = -1,
    method: str = "exact",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Unbiased 2:4 sparsification of ``g`` in groups of 4 consecutive entries along ``dim``.

    Args:
        g: any floating tensor; ``g.shape[dim]`` must be a multiple of 4.
        dim: the dimension the groups run along (the token dimension for ``dY^T``).
        method: ``"exact"`` (minimum variance: systematic sampling with ``p_i = min(1, c|g_i|)``)
            or ``"approx"`` (two sequential draws proportional to |g|, as in the 2by4 toolkit).
        generator: a `torch.Generator` on ``g``'s device, for reproducible draws.

    Returns:
        A tensor like ``g`` with at most 2 non-zeros per group and ``E[out] = g``.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> out = mvue24(torch.tensor([4.0, 1.0, 0.0, 0.0]), generator=gen)
        >>> out[0].item(), int((out != 0).sum())
        (4.0, 2)
    """
    if method not in MVUE_CHOICES:
        raise ValueError(f"Unknown MVUE `method`={method!r}; valid choices: {', '.join(map(repr, MVUE_CHOICES))}")
    if not g.is_floating_point():
        raise TypeError(f"`g` must be a floating tensor, got dtype {g.dtype}")
    dim = dim % g.dim()
    if g.shape[dim] % 4 != 0:
        raise ValueError(f"`g.shape[{dim}]`={g.shape[dim]} is not a multiple of 4 (shape {tuple(g.shape)})")
    x = g.movedim(dim, -1)
    moved_shape = x.shape
    grp = x.reshape(*moved_shape[:-1], moved_shape[-1] // 4, 4).float()  # (..., G, 4)
    a = grp.abs()

    if method == "exact":
        p = mvue24_probabilities(a, "exact")
        u = torch.rand(grp.shape[:-1] + (1,), generator=generator, device=g.device, dtype=torch.float32)
        cum = p.cumsum(-1)
        prev = cum - p
        # Systematic sampling: entry i is kept when [C_{i-1}, C_i) holds u or u+1. Each p_i <= 1,
        # so no interval holds both, and exactly sum(p) = 2 entries are kept.
        keep = (_interval_hits(cum, u) - _interval_hits(prev, u)) > 0
    else:
        aa = a + _APPROX_EPS
        p = mvue24_probabilities(a, "approx")
        u = torch.rand(grp.shape[:-1] + (2,), generator=generator, device=g.device, dtype=torch.float32)
        idx = torch.arange(4, device=g.device)
        c1 = aa.cumsum(-1)
        first = (c1 <= u[..., :1] * c1[..., -1:]).sum(-1, keepdim=True).clamp_(max=3)
        rest = aa.scatter(-1, first, 0.0)
        c2 = rest.cumsum(-1)
        second = (c2 <= u[..., 1:] * c2[..., -1:]).sum(-1, keepdim=True).clamp_(max=3)
        # Rounding can push the draw past the last positive weight; fall back to that entry.
        last_pos = torch.where(rest > 0, idx, -1).amax(-1, keepdim=True)
        second = torch.where(rest.gather(-1, second) > 0, second, last_pos)
        keep = (idx == first) | (idx == second)

    out = torch.where(keep, _safe_div(grp, p), torch.zeros_like(grp))
    return out.reshape(moved_shape).movedim(-1, dim).to(g.dtype)
