"""Pieces shared by the backends."""

from __future__ import annotations

import torch

from ..ops.mvue import mvue24


def mvue_tokens(dy2: torch.Tensor, x2: torch.Tensor, method: str, generator):
    """MVUE of ``dY`` along the token dim (groups of 4 tokens); pads T to a multiple of 4.

    Returns ``(g, x)`` with ``g`` 2:4 along dim 0 and ``x`` padded with zero rows to match, so that
    ``g.t() @ x`` is an unbiased estimate of ``dY^T X``.
    """
    t = dy2.shape[0]
    pad = (-t) % 4
    if pad:
        dy2 = torch.cat([dy2, dy2.new_zeros(pad, dy2.shape[1])])
        x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])])
    return mvue24(dy2, dim=0, method=method, generator=generator), x2  # the Triton twin on CUDA
