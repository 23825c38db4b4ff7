"""Sparse-training methods: each one object in one file of this package, registered by name.

==========  ===========================  ==========================================================
method      forward W~                    backward dL/dW
==========  ===========================  ==========================================================
``dense``   ``W``                        ``dL/dW~``
``ste``     ``P(W)`` (hard N:M)          ``dL/dW~``
``sr-ste``  ``P(W)``                     ``dL/dW~``, and once per optimizer step the engine adds
                                         ``srste_decay * (1 - mask) * W`` to the gradient
``s-ste``   ``beta * S(W)`` (soft)       ``dL/dW~`` (straight through; not multiplied by beta)
==========  ===========================  ==========================================================

(and every method added since: ``sparsetrain.methods.names()``; each file's docstring has its rule).

The interface is `Method` (base.py); `register`, `get` and `names` are the registry
(registry.py). Importing this package imports every module in it, so adding a method is adding
one file (docs/adding-a-method.md). The config's choices, the CLI help, the layers, the engine
and the export metadata read the registry; the math of the projections lives in `sparsetrain.ops.nm`
(the Triton kernel is chosen there, by the method's ``mode``).

`masked_weight` and `effective_weight` are the functional entry points the layers use.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Optional, Tuple, Union

import torch

from .base import Method
from .registry import all_methods, get, names, register, unregister

# The built-in methods first, in the order the docs list them; then every other module of this
# package, whatever its name: a new method needs no line here.
_BUILTIN = ("dense", "ste", "srste", "sste")
for _mod in _BUILTIN:
    importlib.import_module(f"{__name__}.{_mod}")
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.name not in _BUILTIN and _info.name not in ("base", "registry") and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

from .sste import ramped_soft_threshold  # noqa: E402  (after the registry is filled)

__all__ = ["Method", "register", "unregister", "get", "names", "all_methods", "effective_weight", "masked_weight",
           "decay_term", "ramped_soft_threshold"]

MethodLike = Union[str, Method]


def _method(method: MethodLike) -> Method:
    return method if isinstance(method, Method) else get(method)


def masked_weight(
    weight: torch.Tensor,
    method: MethodLike,
    n: int,
    m: int,
    beta: Optional[torch.Tensor] = None,
    fixed_mask: Optional[torch.Tensor] = None,
    need_mask: bool = True,
    ramp: float = 1.0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(W~, mask)`` without autograd. ``fixed_mask`` (a transposable mask) overrides the N:M mask.

    ``beta`` is the method's per-layer scale (S-STE's beta), ``ramp < 1`` S-STE's threshold ramp.
    With ``need_mask=False`` a method may skip building its mask (the forward does not use it)."""
    meth = _method(method)
    if not meth.sparse:
        return weight, None
    if fixed_mask is not None:
        return weight * fixed_mask, fixed_mask
    return meth.project(weight, n, m, beta, ramp=ramp, need_mask=need_mask)


def decay_term(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(1 - mask) * W``: the pruned weights, which SR-STE and masked decay pull towards zero."""
    return weight.masked_fill(mask, 0)


class _EffectiveWeight(torch.autograd.Function):
    """Forward: W~ of the method. Backward: the method's rule (straight-through for every built-in)."""

    @staticmethod
    def forward(ctx, weight, method, n, m, beta, fixed_mask, ramp):
        ctx.method = method
        w_eff, _ = masked_weight(weight, method, n, m, beta, fixed_mask, need_mask=False, ramp=ramp)
        return w_eff

    @staticmethod
    def backward(ctx, grad):
        return ctx.method.backward(grad), None, None, None, None, None, None


def effective_weight(
    weight: torch.Tensor,
    method: MethodLike,
    n: int = 2,
    m: int = 4,
    beta: Optional[torch.Tensor] = None,
    fixed_mask: Optional[torch.Tensor] = None,
    ramp: float = 1.0,
) -> torch.Tensor:
    """The differentiable effective weight W~ of ``method`` (a name or a `Method`).

    Args:
        weight: ``[out, in]``; groups of ``m`` run along ``in``.
        method: a registered name (``names()``) or a `Method`.
        beta: the method's per-layer scale (0-dim tensor); required when ``method.has_scale``.
        fixed_mask: a precomputed (e.g. transposable) mask for methods that support one.
        ramp: S-STE's threshold ramp in [0, 1] (1: plain S-STE).

    Example:
        >>> w = torch.tensor([[1.0, -2.0, 3.0, 0.5]], requires_grad=True)
        >>> effective_weight(w, "ste")
        tensor([[ 0., -2.,  3.,  0.]], grad_fn=<_EffectiveWeightBackward>)
    """
    meth = _method(method)
    if not meth.sparse:
        return weight
    if meth.has_scale and beta is None:
        raise ValueError(f"method={meth.name!r} needs its scale `beta`")
    return _EffectiveWeight.apply(weight, meth, n, m, beta, fixed_mask, float(ramp))
