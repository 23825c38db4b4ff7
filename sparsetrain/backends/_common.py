"""Pieces shared by the backends."""

from __future__ import annotations

import torch

from ..ops.mvue import mvue24, mvue24_seeded


def mvue_tokens(dy2: torch.Tensor, x2: torch.Tensor, method: str, generator):
    """MVUE of ``dY`` along the token dim (groups of 4 tokens); pads T to a multiple of 4.

    ``generator`` is a `torch.Generator`, or the layer's draw ``(seed, offset)`` (an int64 CPU
    tensor), which goes through the custom op `ops.mvue.mvue24_seeded` that torch.compile keeps
    opaque instead of breaking the graph on a generator.

    Returns ``(g, x)`` with ``g`` 2:4 along dim 0 and ``x`` padded with zero rows to match, so that
    ``g.t() @ x`` is an unbiased estimate of ``dY^T X``.
    """
    t = dy2.shape[0]
    pad = (-t) % 4
    if pad:
        dy2 = torch.cat([dy2, dy2.new_zeros(pad, dy2.shape[1])])
        x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])])
    if isinstance(generator, torch.Tensor):
        return mvue24_seeded(dy2, generator, 0, method), x2
    return mvue24(dy2, dim=0, method=method, generator=generator), x2  # the Triton twin on CUDA
