"""`Method`: the interface every sparse-training method implements (one object per method).

A method says, in one place:

- **what the forward uses**: ``project(w, n, m, scale, ramp, need_mask) -> (W~, mask)`` and the
  projection ``mode`` of `sparsetrain.ops.nm.project` and the Triton kernel it maps to
  (``"hard"``, ``"soft"``, or ``None`` for W~ = W);
- **the backward rule**: ``backward(grad)``, dL/dW from dL/dW~ (straight-through by default);
- **the per-layer state**: ``has_scale`` methods keep one frozen scalar per layer (S-STE's beta),
  taken when sparse training starts from sums over the weight (``scale_stats`` gives them,
  summable across FSDP shards; ``scale_from_stats`` turns the totals into the scale);
- **the once-per-optimizer-step gradient term**: ``add_step_term_(grad, w, mask, cfg, factor)``
  (SR-STE's ``srste_decay * (1 - mask) * W``), applied by the engine to the final, unscaled,
  clipped gradient; ``needs_engine(cfg)`` says what is lost without an engine;
- **its own options**: ``options`` (name -> default), set through ``SparsityConfig.method_options``
  and checked by ``check``; a method with new hyper-parameters needs no new config field.

Methods are registered by name (`sparsetrain.methods.registry`); every module of this package is
imported when the package is, so a new method is one new file here. See docs/adding-a-method.md.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

import torch

from ..ops.nm import fmt_choices, project as _project

__all__ = ["Method"]


class Method:
    """Base class: the dense baseline's behaviour, overridden piece by piece by each method.

    Class attributes:
        name: the registry key and ``SparsityConfig.method`` value.
        summary: one line for the CLI help and the config's docs.
        sparse: False only for the dense baseline (same code path, W~ = W).
        mode: the projection mode of `sparsetrain.ops.nm.project` / the Triton kernel
            (``"hard"`` or ``"soft"``), or None for W~ = W.
        transposable: True when ``SparsityConfig.transposable`` may be used (a stored transposable
            mask replaces the projection's mask; see `sparsetrain.ops.transposable`).
        has_scale: the method keeps a per-layer frozen scale in the layer's ``beta`` buffer.
        supports_ramp: the method implements ``SparsityConfig.threshold_ramp`` (``ramp < 1``).
        options: the method's own options and their defaults (``SparsityConfig.method_options``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    sparse: ClassVar[bool] = True
    mode: ClassVar[Optional[str]] = "hard"
    transposable: ClassVar[bool] = False
    has_scale: ClassVar[bool] = False
    supports_ramp: ClassVar[bool] = False
    options: ClassVar[Mapping[str, Any]] = {}

    # ------------------------------------------------------------------------ config
    def resolved_options(self, cfg) -> Dict[str, Any]:
        """``options`` with ``cfg.method_options`` applied."""
        return {**self.options, **(getattr(cfg, "method_options", None) or {})}

    def check(self, cfg) -> None:
        """Raise a one-line `ValueError` for a config this method cannot run.

        The base check: ``method_options`` names only this method's options. Override to add
        value checks (call ``super().check(cfg)``)."""
        given = getattr(cfg, "method_options", None) or {}
        unknown = [k for k in given if k not in self.options]
        if unknown:
            valid = fmt_choices(self.options) if self.options else "none (this method has no options)"
            raise ValueError(f"Unknown `method_options` key {unknown[0]!r} for method={self.name!r}; valid keys: {valid}")

    def has_step_term(self, cfg) -> bool:
        """True when ``add_step_term_`` changes the gradient for this config."""
        return False

    def needs_engine(self, cfg) -> Optional[str]:
        """What is lost when this config trains without an engine (None: nothing)."""
        return None

    # ------------------------------------------------------------------------ forward / backward
    def project(self, w: torch.Tensor, n: int, m: int, scale: Optional[torch.Tensor] = None, ramp: float = 1.0,
                need_mask: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(W~, mask)`` without autograd. With ``need_mask=False`` the mask may be None."""
        if self.mode is None:
            return w, None
        return _project(w, n, m, self.mode, scale, need_mask=need_mask)

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        """dL/dW from dL/dW~: straight-through (the gradient of W~ passes to W unchanged)."""
        return grad

    def is_exact(self, ramp: float) -> bool:
        """True when W~ is exactly N:M (what the sparse GEMM backends need)."""
        return self.sparse and ramp >= 1.0

    # ------------------------------------------------------------------------ per-layer state
    def scale_stats(self, w: torch.Tensor, n: int, m: int) -> torch.Tensor:
        """Sums over (a shard of) the weight that determine the layer's scale: a 1-D float64
        tensor whose sum over shards ``scale_from_stats`` takes (float32 on MPS, which has no float64)."""
        raise NotImplementedError(f"method {self.name!r} keeps no per-layer scale")

    def scale_from_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """The layer's scale (0-dim float32) from the summed ``scale_stats``."""
        raise NotImplementedError(f"method {self.name!r} keeps no per-layer scale")

    def scale(self, w: torch.Tensor, n: int, m: int) -> torch.Tensor:
        """The scale of a whole (unsharded) weight."""
        return self.scale_from_stats(self.scale_stats(w, n, m))

    # ------------------------------------------------------------------------ once per optimizer step
    def add_step_term_(self, grad: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, cfg, factor: float = 1.0) -> None:
        """Add this method's once-per-step term, times ``factor`` (the decay ramp), to ``grad`` in place.

        ``grad`` is the final gradient (after accumulation, unscaling and clipping), ``w`` the weight
        and ``mask`` the mask W~ uses now (rank-local shards under FSDP2)."""

    def __repr__(self) -> str:
        return f"<method {self.name!r}>"


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for sums that decide a scale (float32 overflows above ~1e19), float32 on MPS."""
    return torch.float32 if t.device.type == "mps" else torch.float64
