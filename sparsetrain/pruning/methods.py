"""Mask-and-weight rules for one layer: magnitude, Wanda and SparseGPT.

Every function takes the layer weight in ``nn.Linear`` layout ``W [out, in]`` (groups of ``m`` along
``in``) and, where it needs one, the input Gram matrix ``H = X^T X / tokens`` of shape ``[in, in]``.
Each returns the pruned float32 weight and its boolean mask. The local loss they aim at is
``tr((W - W^) H (W - W^)^T)``, see `local_loss`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops.nm import nm_mask

__all__ = ["local_loss", "magnitude_prune", "wanda_prune", "wanda_score", "sparsegpt_prune", "sparsegpt_score"]


def local_loss(w_hat: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``tr((W - W^) H (W - W^)^T)``: the squared output error per token, summed over outputs.

    Example:
        >>> local_loss(torch.zeros(2, 4), torch.ones(2, 4), torch.eye(4))
        tensor(8.)
    """
    d = (w - w_hat).float()
    return ((d @ h) * d).sum()


def magnitude_prune(w: torch.Tensor, n: int, m: int, mask: Optional[torch.Tensor] = None):
    """Keep the ``n`` largest ``|W_ij|`` of every ``m`` along ``in`` (or apply ``mask`` if given).

    Example:
        >>> magnitude_prune(torch.tensor([[4.0, -1.0, 3.0, 2.0]]), 2, 4)[0]
        tensor([[4., -0., 3., 0.]])
    """
    w = w.float()
    if mask is None:
        mask = nm_mask(w, n, m)
    return w * mask, mask


def wanda_score(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Wanda's importance ``|W_ij| * ||X_j||_2`` (up to a constant: ``sqrt(H_jj)`` with mean ``H``)."""
    return w.float().abs() * h.diagonal().clamp_min(0).sqrt().unsqueeze(0)


def wanda_prune(w: torch.Tensor, h: torch.Tensor, n: int, m: int, mask: Optional[torch.Tensor] = None):
    """Wanda (Sun et al. 2024): N:M per row on ``|W_ij| * ||X_j||_2``; the kept weights are unchanged.

    Example:
        >>> h = torch.diag(torch.tensor([1.0, 100.0, 1.0, 1.0]))
        >>> wanda_prune(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), h, 2, 4)[1]
        tensor([[ True,  True, False, False]])
    """
    w = w.float()
    if mask is None:
        mask = nm_mask(wanda_score(w, h), n, m)
    return w * mask, mask


def dead_inputs(h: torch.Tensor) -> torch.Tensor:
    """Boolean ``[in]``: the inputs that were zero on every calibration token (``H_jj == 0``).

    A ReLU down-projection with dead neurons has such inputs. Their weights never see data, so any
    value there leaves the local loss unchanged, and an N:M slot spent on them is a slot lost.
    """
    return h.diagonal() <= 0


def _damped_hessian(h: torch.Tensor, damp: float) -> torch.Tensor:
    h = h.double().clone()
    diag = h.diagonal()
    # An input that is always zero gives a zero row/column; any positive diagonal makes the
    # matrix invertible and leaves the loss unchanged, since the weights there never see data.
    diag[dead_inputs(h)] = 1.0
    diag.add_(damp * float(diag.mean()))
    return h


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1 = U^T U`` (float64).

    A badly conditioned ``H`` (few calibration tokens, collinear inputs) can still break the
    factorisation at 1% damping; we then retry with ten times the damping, up to 100%.
    """
    last = None
    for factor in (1.0, 10.0, 100.0):
        hd = _damped_hessian(h, min(damp * factor, 1.0))
        try:
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(hd))
            return torch.linalg.cholesky(hinv, upper=True)
        except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
            last = err
    raise RuntimeError(f"SparseGPT could not factorise the damped Hessian: {last}")


def sparsegpt_score(w: torch.Tensor, h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """SparseGPT's pruning score ``W_ij^2 / U_jj^2`` for the dense weights (used for fixed masks).

    Inputs that never saw data score 0, as in `sparsegpt_prune`, so a mask built on this score
    keeps live weights first.
    """
    u = _inverse_cholesky(h, damp)
    w = w.double().masked_fill(dead_inputs(h).unsqueeze(0), 0.0)
    return (w ** 2 / u.diagonal().unsqueeze(0) ** 2).float()


def sparsegpt_prune(
    w: torch.Tensor,
    h: torch.Tensor,
    n: int,
    m: int,
    damp: float = 0.01,
    block_size: int = 128,
    mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023) with N:M masks chosen every ``m`` columns.

    Columns are processed left to right. Pruning column ``j`` leaves an error ``e = (w_j - q_j) / U_jj``
    per row, and the columns to its right absorb it through the ``j``-th row of ``U`` (the upper
    Cholesky factor of the damped inverse Hessian): that is the optimal (OBS) update of the
    not-yet-processed weights given the ones fixed so far. Within a block of ``block_size``
    columns the update is applied column by column; the rest of the matrix gets the block's
    accumulated errors in one matrix product, which is what makes the method fast. Whenever a new
    group of ``m`` columns starts, its mask keeps the ``n`` entries per row with the largest
    ``w^2 / U_jj^2`` of the *updated* weights.

    Args:
        w: ``[out, in]`` weights, ``in`` a multiple of ``m``.
        h: ``[in, in]`` input Gram matrix.
        n, m: N:M pattern.
        damp: fraction of the mean diagonal added to the diagonal of ``H`` (1%, as in the paper).
        block_size: columns per lazy-update block, rounded down to a multiple of ``m``.
        mask: a fixed mask to use instead of the adaptive choice (transposable masks).

    Weights on dead inputs (``H_jj == 0``, see `dead_inputs`) are set to 0 and so are pruned first.

    Returns:
        ``(pruned weights float32, mask)``.

    Example:
        >>> x = torch.randn(256, 8); w = torch.randn(3, 8)
        >>> w_hat, mask = sparsegpt_prune(w, x.T @ x / 256, 2, 4)
        >>> mask.reshape(3, 2, 4).sum(-1).unique().tolist()
        [2]
    """
    out_f, in_f = w.shape
    u = _inverse_cholesky(h, damp)  # float64 (in, in)
    # Weights on inputs that never saw data are zeroed first (as the reference implementation
    # does): their damped-Hessian diagonal is set to 1, which would otherwise give them a score
    # W_ij^2 / U_jj^2 unrelated to the data and let them win N:M slots over live inputs.
    wk = w.double().masked_fill(dead_inputs(h).unsqueeze(0), 0.0)
    keep = torch.zeros(out_f, in_f, dtype=torch.bool, device=w.device)
    bs = max(m, (block_size // m) * m)  # a group of m never straddles two blocks
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        w1 = wk[:, i1:i2].clone()  # (out, cols)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = u1.diagonal()
        for i in range(i2 - i1):
            if i % m == 0:
                if mask is None:
                    score = w1[:, i:i + m] ** 2 / d1[i:i + m].unsqueeze(0) ** 2
                    keep[:, i1 + i:i1 + i + m] = nm_mask(score, n, m)
                else:
                    keep[:, i1 + i:i1 + i + m] = mask[:, i1 + i:i1 + i + m]
            col = w1[:, i]
            q = col * keep[:, i1 + i]
            e = (col - q) / d1[i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q  # exactly zero where pruned, whatever the rounding of the update
            err1[:, i] = e
        wk[:, i1:i2] = w1
        wk[:, i2:] -= err1 @ u[i1:i2, i2:]
    return (wk * keep).float(), keep
