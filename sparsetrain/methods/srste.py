"""``sr-ste``: STE plus the sparse-refined decay (Zhou et al. 2021).

Forward W~ = P(W), straight-through backward, and once per optimizer step the engine adds
``srste_decay * (1 - mask) * W`` to the final gradient. The decay is not in the autograd backward:
that runs once per micro-batch on loss-scaled gradients, so accumulation and `GradScaler` would
change its weight.
"""

from __future__ import annotations

import torch

from .base import Method
from .registry import register


@register
class SRSTE(Method):
    name = "sr-ste"
    summary = "hard projection W~ = P(W), plus srste_decay * (1 - mask) * W on the gradient every optimizer step"
    mode = "hard"
    transposable = True  # T-SR-STE

    def has_step_term(self, cfg) -> bool:
        return cfg.srste_decay > 0

    def needs_engine(self, cfg):
        if self.has_step_term(cfg):
            return "SR-STE's decay is applied once per optimizer step by the engine; without one it trains as plain STE"
        return None

    def add_step_term_(self, grad: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, cfg, factor: float = 1.0) -> None:
        alpha = cfg.srste_decay * factor
        if alpha:
            grad.add_(w.masked_fill(mask, 0).to(grad.dtype), alpha=alpha)
