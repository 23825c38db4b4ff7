"""Triton kernels: faster twins of functions in `sparsetrain.ops`, tested against them.

Each `ops` function with a twin here asks `available(t)` itself and, when true, calls the twin
instead of its torch reference; nothing else in the package calls these directly:

- `project_weight`: the effective weight and its N:M mask in one pass (twin of ``ops.nm_mask`` /
  ``ops.project_nm`` / ``beta * ops.soft_threshold``; picked by ``ops.nm.project``);
- `mvue24`: unbiased 2:4 sparsification of a gradient (twin of ``ops.mvue24``, which picks it);
- `transposable24`: the exact transposable 2:4 mask (twin of
  ``ops.transposable_mask(score, 2, 4, method="exact24")``, which picks it for float32/16 scores);
- `sparsify_activation`: an input made N:M per token and its mask in one pass (twin of
  ``ops.activation.sparsify_activation``);
- `sparsify_pack24`: the same for 2:4, plus cuSPARSELt's compressed operand (twin of
  ``ops.cslt_layout.sparsify_pack24``).

This package is the bottom of sparsetrain: it imports nothing from the rest of it (its shared
argument checks live in `_checks`, which `ops` re-exports).

`available` is true only on CUDA: on CPU the torch reference is faster than Triton's interpreter.
The kernels themselves also run on CPU tensors through the interpreter, which is how the tests
check them without a GPU. Modules with kernels are imported lazily, so importing this package
never imports triton.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._launch import triton_importable

__all__ = ["available", "project_weight", "mvue24", "transposable24", "sparsify_activation", "sparsify_pack24"]

_TRITON_OK: Optional[bool] = None


def available(t: torch.Tensor) -> bool:
    """True when Triton kernels should run on ``t``: a CUDA tensor with triton importable."""
    global _TRITON_OK
    if not (isinstance(t, torch.Tensor) and t.is_cuda):
        return False
    if _TRITON_OK is None:
        _TRITON_OK = triton_importable()
    return _TRITON_OK


def project_weight(weight: torch.Tensor, n: int, m: int, mode: str, beta=None):
    """Fused effective weight and mask: ``(w_eff, mask)``.

    ``mask`` is ``ops.nm_mask(weight, n, m)``; ``w_eff`` is ``ops.project_nm(weight, n, m)`` for
    ``mode="hard"`` and ``(beta * ops.soft_threshold(weight.float(), n, m))
    .to(weight.dtype)`` for ``mode="soft"`` (bit-exact twins). Not differentiable: the layer wraps it
    in its straight-through autograd function.

    Example:
        >>> w_eff, mask = project_weight(torch.tensor([[0.1, -3.0, 2.0, 0.5]]), 2, 4, "hard")
        >>> w_eff
        tensor([[ 0., -3.,  2.,  0.]])
    """
    from .nm_project import nm_project_forward

    return nm_project_forward(weight, n, m, mode, beta)


def mvue24(g: torch.Tensor, dim: int = -1, method: str = "exact", generator=None, *, uniforms=None, out=None):
    """Unbiased 2:4 sparsification of ``g`` along ``dim``; see `kernels.mvue.mvue24_forward`."""
    from .mvue import mvue24_forward

    return mvue24_forward(g, dim, method, generator, uniforms=uniforms, out=out)


def transposable24(score: torch.Tensor) -> torch.Tensor:
    """Exact transposable 2:4 mask of a 2-D ``score``; see `kernels.transposable`."""
    from .transposable import transposable24_forward

    return transposable24_forward(score)


def sparsify_activation(x: torch.Tensor, n: int = 2, m: int = 4):
    """``(X~, mask)``: ``x`` made N:M along its last dim per token; see `kernels.activation`."""
    from .activation import sparsify_activation_forward

    return sparsify_activation_forward(x, n, m)


def sparsify_pack24(x: torch.Tensor):
    """``(X~, mask, buffer)``: ``x`` made 2:4 along its rows plus cuSPARSELt's packed operand of
    it; see `kernels.activation.sparsify_pack24_forward`."""
    from .activation import sparsify_pack24_forward

    return sparsify_pack24_forward(x)
