"""``ste``: the hard N:M projection W~ = P(W) with a straight-through gradient (dL/dW = dL/dW~)."""

from __future__ import annotations

from .base import Method
from .registry import register


@register
class STE(Method):
    name = "ste"
    summary = "hard projection W~ = P(W), straight-through gradient"
    mode = "hard"
    transposable = True  # T-STE: a stored transposable mask replaces P's mask
