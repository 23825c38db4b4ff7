"""N:M masks, the hard projection, S-STE's soft threshold and its per-tensor scale.

These are the plain-torch reference implementations: the Triton kernel `kernels.nm_project` is
their twin. Groups are ``m`` consecutive elements along the **last** dimension (the input /
reduction dimension of ``nn.Linear.weight``).

The contract, for float32, bfloat16 and float16 and any shape whose last dim divides by ``m``
(`tests/test_properties.py` checks every clause against plain-Python loops and against the kernel):

1. Structure: `nm_mask` keeps exactly ``n`` of every group; `project_nm` and `soft_threshold` have
   at most ``n`` non-zeros in every group of finite values (`soft_threshold`'s support is a subset
   of `nm_mask`: an entry above the (m-n)-th smallest |w| beats at least m-n others).
2. Ties: the mask ranks by |w| in descending order, the lowest index winning ties, so
   ``[1, -1, 1, 1]`` keeps the first two. NaN ranks above everything (above +inf), so a NaN is
   never the entry a mask drops. The kernel ranks the same way and its mask is bit-equal.
3. Non-finite in, non-finite out: every entry of `project_nm` and `soft_threshold` in a group that
   holds a NaN or an inf is NaN, and `sste_scale` of a tensor holding one is NaN. A diverged weight
   therefore makes the forward output NaN, which the engine's NaN check reports, instead of being
   silently pruned away or kept as a finite value next to its finite neighbours.
4. Values: `project_nm` is ``w`` where the mask is true and zero elsewhere, in ``w``'s dtype;
   `soft_threshold` is ``sign(w) * max(|w| - t, 0)`` computed in ``w``'s dtype (the layer and the
   kernel call it on float32 and round once).
"""

from __future__ import annotations

import torch

from ..kernels._checks import PROJECTION_MODES, check_nm, fmt_choices  # the one home of both (kernels check their own arguments)

__all__ = [
    "nm_mask", "project_nm", "soft_threshold", "sste_scale", "group_view", "check_finite", "check_nm", "project",
    "fmt_choices",
    "PROJECTION_MODES",
]


def group_view(w: torch.Tensor, m: int, name: str = "w") -> torch.Tensor:
    """View ``w`` as ``[..., G, m]`` groups along the last dim; error if it does not divide."""
    if w.dim() == 0:
        raise ValueError(f"`{name}` must have at least one dimension, got a scalar")
    if w.shape[-1] % m != 0:
        raise ValueError(
            f"The last dimension of `{name}` ({w.shape[-1]}, shape {tuple(w.shape)}) is not a multiple of m={m}"
        )
    return w.reshape(*w.shape[:-1], w.shape[-1] // m, m)


def check_finite(w: torch.Tensor, name: str = "w") -> None:
    """Raise a `ValueError` naming ``name`` if ``w`` holds NaN or inf."""
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"`{name}` holds {bad} non-finite value(s) (NaN or inf)")


def _rank_key(g: torch.Tensor) -> torch.Tensor:
    """|w| with NaN mapped to +inf: NaN compares false with everything, so left as is it would
    beat nothing and lose nothing, and a group could keep more than n."""
    return g.abs().nan_to_num_(nan=float("inf"), posinf=float("inf"))


def _nan_groups_(out: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Set to NaN, in place, every group of ``out`` whose ``key`` holds an inf (a NaN or inf of w)."""
    bad = _nonfinite_groups(key)
    # On CPU the check is cheap and saves the fill pass in the usual all-finite case; elsewhere,
    # and under torch.compile (where a data-dependent branch breaks the graph and the fill fuses
    # into the producer), the fill is unconditional so that no host synchronisation happens.
    if out.device.type != "cpu" or torch.compiler.is_compiling() or bool(bad.any()):
        out.masked_fill_(bad, float("nan"))
    return out


def _nonfinite_groups(key: torch.Tensor) -> torch.Tensor:
    """``[..., G, 1]`` bool: groups of ``key = _rank_key(g)`` holding a NaN or an inf (max is inf)."""
    if key.shape[-1] == 4:
        # Two maxima of contiguous slices: ~3x cheaper on CPU than a reduction over stride-4 rows.
        k0, k1, k2, k3 = key.movedim(-1, 0).unbind(0)
        top = torch.maximum(torch.maximum(k0, k1), torch.maximum(k2, k3))
        return top.isinf().unsqueeze(-1)
    return key.isinf().any(-1, keepdim=True)


def _keep_small_m(a: torch.Tensor, n: int) -> torch.Tensor:
    """Top-n mask over the last dim (size m <= 8) by pairwise comparison of the m slices.

    ``rank_i = #{j < i : a_j >= a_i} + #{j > i : a_j > a_i}`` is the position of entry i in the
    descending order with ties to the lowest index; keep ``rank_i < n``. Comparing whole slices
    (m(m-1) elementwise ops on 1/m-sized contiguous tensors) is ~10x faster on CPU than a sort of
    size-m rows, and ~10x faster than the same compares on stride-m views.
    """
    cols = a.movedim(-1, 0).contiguous().unbind(0)  # m contiguous slices: vectorised compares
    ranks = []
    for i, ai in enumerate(cols):
        r = torch.zeros_like(ai, dtype=torch.uint8)
        for j, aj in enumerate(cols):
            if j < i:
                r += aj >= ai
            elif j > i:
                r += aj > ai
        ranks.append(r < n)
    return torch.stack(ranks, 0).movedim(0, -1)


def nm_mask(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude entries of every ``m`` along the last dim.

    Ties break toward the lowest index and NaN ranks above every number (see the module
    docstring), so the mask is a deterministic function of ``w`` with exactly ``n`` per group.

    Example:
        >>> nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5]]))
        tensor([[False,  True,  True, False]])
    """
    return _mask_and_key(w, n, m)[0].reshape(w.shape)


def _mask_and_key(w: torch.Tensor, n: int, m: int):
    """``(keep, key)``, both grouped ``[..., G, m]``: the mask and the rank key it was built from."""
    check_nm(n, m)
    g = group_view(w, m)
    a = _rank_key(g)
    if m <= 8:
        keep = _keep_small_m(a, n)
    else:
        # Stable descending sort keeps equal values in index order: the lowest index comes first.
        order = torch.sort(a, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return keep, a


def project_nm(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Hard N:M projection ``P(w)``: ``w`` with all but the ``n`` largest |w| of each group zeroed.

    A group holding NaN or inf comes out all NaN.

    Example:
        >>> project_nm(torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, float("nan"), 0.0, 0.0]]))
        tensor([[ 0., -3.,  2.,  0., nan, nan, nan, nan]])
    """
    keep, key = _mask_and_key(w, n, m)
    g = group_view(w, m)
    out = g * keep
    return _nan_groups_(out, key).reshape(w.shape)


def _threshold(g_abs: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The (m-n)-th smallest |w| of each group, shape ``[..., G, 1]``."""
    if m == 4:
        # Sorting networks on the four slices beat a sort of size-4 rows by ~10x on CPU.
        a0, a1, a2, a3 = g_abs.movedim(-1, 0).contiguous().unbind(0)
        lo01, hi01 = torch.minimum(a0, a1), torch.maximum(a0, a1)
        lo23, hi23 = torch.minimum(a2, a3), torch.maximum(a2, a3)
        if n == 3:  # smallest
            t = torch.minimum(lo01, lo23)
        elif n == 2:  # 2nd smallest
            t = torch.minimum(torch.maximum(lo01, lo23), torch.minimum(hi01, hi23))
        else:  # n == 1: 3rd smallest = 2nd largest
            t = torch.maximum(torch.minimum(hi01, hi23), torch.maximum(lo01, lo23))
        return t.unsqueeze(-1)
    return torch.kthvalue(g_abs, m - n, dim=-1, keepdim=True).values


def soft_threshold(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """S-STE's continuous N:M pruning ``S(w)_i = sign(w_i) * max(|w_i| - t, 0)``.

    ``t`` is the (m-n)-th smallest |w| of the group (the 2nd smallest for 2:4), so at most ``n``
    entries per group stay non-zero, and ``S`` is continuous (1-Lipschitz per entry) in ``w``.
    A group holding NaN or inf comes out all NaN.

    Example:
        >>> soft_threshold(torch.tensor([[0.5, -3.0, 2.0, 1.0]]))
        tensor([[ 0., -2.,  1.,  0.]])
    """
    check_nm(n, m)
    g = group_view(w, m)
    key = _rank_key(g)
    t = _threshold(key, n, m)
    # sign(w) * max(|w| - t, 0) == w - clamp(w, -t, t), bit for bit, in two passes instead of five.
    out = g - torch.clamp(g, -t, t)
    return _nan_groups_(out, key).reshape(w.shape)


def sste_scale(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """S-STE's per-tensor scale ``beta = <w, S(w)> / <S(w), S(w)>`` as a 0-dim float32 tensor.

    ``beta`` is the least-squares fit of ``w`` by ``beta * S(w)``; it is 1 when ``S(w)`` is all zero
    and NaN when ``w`` holds a NaN or an inf.

    Example:
        >>> round(float(sste_scale(torch.tensor([[0.5, -3.0, 2.0, 1.0]]))), 4)
        1.6
    """
    w32 = w.detach().float()
    s = soft_threshold(w32, n, m)
    # The two sums in float64 (once per run, so the cost does not matter): in float32 they
    # overflow to inf / inf = NaN for weights above ~1e19. MPS has no float64.
    acc = torch.float32 if w.device.type == "mps" else torch.float64
    w_acc, s_acc = w32.to(acc), s.to(acc)
    num = (w_acc * s_acc).sum()
    den = (s_acc * s_acc).sum()
    # den is NaN when S(w) is (a non-finite group); `den > 0` alone would then answer 1.
    fallback = torch.where(torch.isnan(den), den, torch.ones_like(den))
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(acc).tiny), fallback).float()


def project(w: torch.Tensor, n: int, m: int, mode: str, beta=None, need_mask: bool = True):
    """``(W~, mask)`` of a projection mode, without autograd; the Triton kernel on CUDA.

    ``mode="hard"``: ``W~ = project_nm(w)``; ``mode="soft"``: ``W~ = (beta * soft_threshold(w.float()))
    .to(w.dtype)`` (float32 whatever the dtype, rounded once, as the kernel does). ``mask`` is
    ``nm_mask(w)`` in both modes (the soft support lies inside it, and equals it but on tied
    groups); with ``need_mask=False`` the reference path may return ``None`` for it.

    Example:
        >>> project(torch.tensor([[1.0, -2.0, 3.0, 0.5]]), 2, 4, "hard")[0]
        tensor([[ 0., -2.,  3.,  0.]])
    """
    if mode not in PROJECTION_MODES:
        raise ValueError(f"Unknown projection `mode`={mode!r}; valid choices: 'hard', 'soft'")
    if mode == "soft" and beta is None:
        raise ValueError("the soft projection needs S-STE's scale `beta`")
    from .. import kernels  # the Triton twin; imported lazily (it imports no triton itself)

    if kernels.available(w):
        return kernels.project_weight(w, n, m, mode, beta)
    if mode == "soft":
        s = soft_threshold(w.float(), n, m)
        return (s * beta).to(w.dtype), (nm_mask(w, n, m) if need_mask else None)
    mask = nm_mask(w, n, m)
    return w * mask, mask
