"""N:M masks, the hard projection, S-STE's soft threshold and its per-tensor scale.

These are the plain-torch reference implementations: the Triton kernels in `sparsetrain.kernels`
are tested against them. Groups are ``m`` consecutive elements along the **last** dimension
(the input / reduction dimension of ``nn.Linear.weight``).
"""

from __future__ import annotations

import torch

from ..config import check_nm

__all__ = ["nm_mask", "project_nm", "soft_threshold", "sste_scale", "group_view", "check_finite"]


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


def _keep_rank(a: torch.Tensor) -> torch.Tensor:
    """Rank of each element of the last dim in descending order, ties to the lowest index.

    ``rank_i = #{j : a_j > a_i} + #{j < i : a_j == a_i}``: a pairwise count, cheaper than a sort
    for the small m of N:M sparsity and exactly the deterministic tie rule we promise.
    """
    m = a.shape[-1]
    ai = a.unsqueeze(-1)  # (..., m, 1): element i
    aj = a.unsqueeze(-2)  # (..., 1, m): element j
    lower = torch.ones(m, m, dtype=torch.bool, device=a.device).tril(-1)  # [i, j] = j < i
    beats = (aj > ai) | ((aj == ai) & lower)
    return beats.sum(-1)


def nm_mask(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude entries of every ``m`` along the last dim.

    Ties break toward the lowest index, so the mask is a deterministic function of ``w``.

    Example:
        >>> nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5]]))
        tensor([[False,  True,  True, False]])
    """
    check_nm(n, m)
    g = group_view(w, m)
    a = g.abs()
    if m <= 16:
        keep = _keep_rank(a) < n
    else:
        # Stable descending sort keeps equal values in index order: the lowest index comes first.
        order = torch.sort(a, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return keep.reshape(w.shape)


def project_nm(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Hard N:M projection ``P(w)``: ``w`` with all but the ``n`` largest |w| of each group zeroed."""
    return w * nm_mask(w, n, m)


def _threshold(g_abs: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The (m-n)-th smallest |w| of each group, shape ``[..., G, 1]``."""
    return torch.sort(g_abs, dim=-1).values[..., m - n - 1 : m - n]


def soft_threshold(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """S-STE's continuous N:M pruning ``S(w)_i = sign(w_i) * max(|w_i| - t, 0)``.

    ``t`` is the (m-n)-th smallest |w| of the group (the 2nd smallest for 2:4), so at most ``n``
    entries per group stay non-zero, and ``S`` is continuous (1-Lipschitz per entry) in ``w``.
    """
    check_nm(n, m)
    g = group_view(w, m)
    a = g.abs()
    t = _threshold(a, n, m)
    return (torch.sign(g) * torch.clamp(a - t, min=0)).reshape(w.shape)


def sste_scale(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """S-STE's per-tensor scale ``beta = <w, S(w)> / <S(w), S(w)>`` as a 0-dim float32 tensor.

    ``beta`` is the least-squares fit of ``w`` by ``beta * S(w)``; it is 1 when ``S(w)`` is all zero.
    """
    w32 = w.detach().float()
    s = soft_threshold(w32, n, m)
    num = (w32 * s).sum()
    den = (s * s).sum()
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(den))
