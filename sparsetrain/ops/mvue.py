"""Unbiased 2:4 sparsification of gradients (MVUE, Chmiel et al. 2023; used by S-STE).

``mvue24(g)`` keeps exactly 2 of every 4 consecutive entries along ``dim`` (fewer only where a
group has fewer non-zeros), rescaled so that ``E[mvue24(g)] = g``. The weight gradient
``dW = dY^T X`` then becomes a 2:4-sparse x dense product.
"""

from __future__ import annotations

import math
import os
import warnings
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
        amax = a.amax(-1, keepdim=True)
        rest = s - amax
        # The largest is kept surely when it outweighs the other three (then c = 1/rest).
        inv_c = torch.where(amax > rest, rest, s * 0.5)
        return (a / inv_c.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(max=1.0)
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


def _exact(a, g, u):
    """Exact MVUE on four slices: ``p_i = min(1, c*a_i)`` with ``sum p = 2``, systematic sampling.

    Returns the four output slices. A kept entry's value ``g_i / p_i`` is ``sign(g_i) * max(a_i, 1/c)``:
    either ``p_i = 1`` (the value is ``g_i``) or ``p_i = c*a_i`` (the value is ``sign(g_i)/c``).
    """
    a0, a1, a2, a3 = a
    # In-place arithmetic where a value has no later use: this runs on every backward, and on CPU
    # each avoided temporary saves a full pass over memory.
    s = (a0 + a1).add_(a2).add_(a3)
    amax = torch.maximum(a0, a1)
    torch.maximum(amax, torch.maximum(a2, a3), out=amax)
    rest = s - amax
    # If the largest is at least the sum of the other three it is kept surely (c*amax >= 1) and
    # the other three share the second slot in proportion to |g|: c = 1/rest. Otherwise c = 2/S.
    inv_c = torch.where(amax > rest, rest, s.mul_(0.5))
    c = inv_c.clamp_min(torch.finfo(torch.float32).tiny).reciprocal_()  # all-zero groups: p = 0 * huge
    # Entry k is kept when [C_{k-1}, C_k) holds u or u+1: h(C) = ceil(C - u) counts those points
    # below C. Each p_k <= 1, so no interval holds both, and sum(p) entries are kept.
    out, cum, h_prev = [], None, None
    for ak, gk in zip(a, g):
        pk = (ak * c).clamp_(max=1.0)
        cum = pk if cum is None else cum.add_(pk)
        h = torch.sub(cum, u).ceil_()  # cum >= 0 and u < 1, so h >= -0.0: no clamp needed
        keep = h > h_prev if h_prev is not None else h > 0
        h_prev = h
        out.append(torch.maximum(ak, inv_c).copysign_(gk).mul_(keep))
    return out


def _approx(a, g, u0, u1):
    """2by4's estimator on four slices: two sequential draws (first by a_i/S, second among the
    rest by a), each kept entry divided by its inclusion probability."""
    aa = [ak + _APPROX_EPS for ak in a]
    # S - a_j summed from the other three: subtracting would cancel to 0 when a_j dwarfs them.
    others = [(aa[k - 1] + aa[k - 2]) + aa[k - 3] for k in range(4)]
    s = aa[0] + aa[1] + aa[2] + aa[3]
    t = [ak / s for ak in aa]
    u = [tk / ok for tk, ok in zip(t, others)]  # t_j / (S - a_j)
    usum = u[0] + u[1] + u[2] + u[3]
    # P(i drawn second) = sum_{j != i} P(j first) * a_i / (S - a_j)
    p = [(tk + ak * (usum - uk)).clamp_(max=1.0) for tk, ak, uk in zip(t, aa, u)]

    def draw(weights, r):
        total = weights[0] + weights[1] + weights[2] + weights[3]
        thr = r * total
        cum, idx = None, None
        for w in weights[:3]:
            cum = w if cum is None else cum + w
            step = (cum <= thr).to(torch.int8)
            idx = step if idx is None else idx + step
        return idx  # in 0..3: clamped at the last entry by construction

    first = draw(aa, u0)
    rest = [torch.where(first == k, torch.zeros_like(ak), ak) for k, ak in enumerate(aa)]
    second = draw(rest, u1)
    # Rounding can push the draw onto an entry of zero weight; fall back to the last positive one.
    last_pos = torch.full_like(second, -1)
    chosen_w = torch.zeros_like(rest[0])
    for k, rk in enumerate(rest):
        last_pos = torch.where(rk > 0, torch.full_like(last_pos, k), last_pos)
        chosen_w = torch.where(second == k, rk, chosen_w)
    second = torch.where(chosen_w > 0, second, last_pos)
    return [
        torch.where((first == k) | (second == k), _safe_div(gk, pk), 0.0) for k, (gk, pk) in enumerate(zip(g, p))
    ]


def _core(x: torch.Tensor, u: torch.Tensor, method: str):
    """The estimator on grouped data ``x`` (4, pre, G, post) with uniforms ``u`` (k, pre, G, post)."""
    gs = x.unbind(0)
    a = [gk.abs() for gk in gs]
    return _exact(a, gs, u[0]) if method == "exact" else _approx(a, gs, u[0], u[1])


# On CPU the eager estimator makes ~50 passes over memory; inductor fuses them into one loop
# (measured 11 ms -> 1 ms for a 1024 x 3072 gradient on 2 cores, bit-identical output) for a
# one-off compile of ~6 s per process. Small tensors, where the compile would not pay, stay eager.
# SPARSETRAIN_COMPILE=0 turns it off.
_COMPILE_MIN_NUMEL = 1 << 20
_COMPILED = {"fn": None, "disabled": os.environ.get("SPARSETRAIN_COMPILE", "1") == "0"}


def _compiled_core():
    if _COMPILED["disabled"]:
        return None
    if _COMPILED["fn"] is None:
        _COMPILED["fn"] = torch.compile(lambda x, u, method: torch.stack(_core(x, u, method)), dynamic=True)
    return _COMPILED["fn"]


def _disable_compile(err: Exception) -> None:
    _COMPILED["disabled"] = True
    warnings.warn(f"mvue24: torch.compile is unavailable here ({type(err).__name__}: {err}); using eager ops", stacklevel=3)


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
    pre = math.prod(g.shape[:dim])
    post = math.prod(g.shape[dim + 1 :])
    groups = g.shape[dim] // 4
    # The four members of every group as four contiguous slices: elementwise work on them is
    # vectorised, where the same ops on stride-4 views run ~10x slower on CPU.
    x = g.reshape(pre, groups, 4, post).movedim(2, 0).float().contiguous()  # (4, pre, G, post)
    k = 1 if method == "exact" else 2
    u = torch.rand((k, pre, groups, post), generator=generator, device=g.device, dtype=torch.float32)
    core = _compiled_core() if g.device.type == "cpu" and g.numel() >= _COMPILE_MIN_NUMEL else None
    out = None
    if core is not None:
        try:
            out = core(x, u, method).unbind(0)
        except Exception as e:  # no C++ toolchain, an unsupported platform...: eager from now on
            _disable_compile(e)
    if out is None:
        out = _core(x, u, method)
    result = torch.empty((pre, groups, 4, post), dtype=g.dtype, device=g.device)
    for k_, ok in enumerate(out):  # each slice lands as runs of `post` contiguous entries
        result[:, :, k_, :] = ok
    return result.reshape(g.shape)
