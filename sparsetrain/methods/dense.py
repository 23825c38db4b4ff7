"""``dense``: no sparsity. W~ = W through the same layers, engine and logs: the baseline."""

from __future__ import annotations

from .base import Method
from .registry import register


@register
class Dense(Method):
    name = "dense"
    summary = "no sparsity: W~ = W through the same code path (the baseline)"
    sparse = False
    mode = None

    def is_exact(self, ramp: float) -> bool:
        return False
