"""The learning-rate schedule: linear warmup, then cosine decay to a floor, as a pure function of the step.

Being a function of the step alone (nanoGPT's habit) means a resumed run needs nothing but the step.
"""

from __future__ import annotations

import math


def warmup_cosine_lr(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based).

    - ``step < warmup_steps``: rises linearly, ``lr * (step + 1) / (warmup_steps + 1)`` (never 0, so
      the first step already moves the weights);
    - ``warmup_steps <= step <= decay_steps``: half a cosine from ``lr`` down to ``min_lr``;
    - ``step > decay_steps``: stays at ``min_lr``.

    Example:
        >>> warmup_cosine_lr(0, 1e-3, 1e-4, 0, 100)
        0.001
        >>> round(warmup_cosine_lr(100, 1e-3, 1e-4, 0, 100), 12)
        0.0001
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step > decay_steps:
        return min_lr
    span = max(1, decay_steps - warmup_steps)
    progress = (step - warmup_steps) / span  # in [0, 1]
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
