"""The pruners, by name: one table read by `prune` (one-shot, on calibration data), by the engine's
``prune_at`` (once, mid-training) and by `SparsityConfig`'s choices for ``prune_method``.

Each entry says what it reads besides the weights. The engine collects only the per-input squared
norms ``sum_t x_tj^2`` (the diagonal of the Gram matrix) while training, so only the pruners that
need at most those can run at ``prune_at`` (`MID_TRAINING_PRUNERS`); the others need the whole Gram
matrix, which `prune` computes layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .methods import magnitude_prune, sparsegpt_prune, sparsegpt_score, wanda_prune, wanda_score

__all__ = ["Pruner", "PRUNERS", "PRUNE_METHODS", "MID_TRAINING_PRUNERS", "INPUTS"]

# What a pruner reads besides the weights: nothing, the diagonal of H only, or all of H.
INPUTS = ("nothing", "input_norms", "gram")


@dataclass(frozen=True)
class Pruner:
    """One pruning method.

    Attributes:
        name: its name in `prune`'s ``method`` and the config's ``prune_method``.
        inputs: one of `INPUTS`.
        summary: one line for help texts.
        prune: ``(w, h, n, m, mask=None, **options) -> (w_hat, mask)`` on a float32 ``[out, in]``
            weight and the Gram matrix ``h`` (``None`` when ``inputs`` is ``"nothing"``; for
            ``"input_norms"`` only its diagonal is read). With ``mask`` it keeps that mask.
            ``None`` for prox, whose schedule `prune` runs itself (it reports its iterations).
        score: ``(w, h, **options) -> importance`` a transposable mask is solved on; ``None`` when
            the method picks its own mask.
        options: the keyword options of `prune` the method reads.
    """

    name: str
    inputs: str
    summary: str
    prune: Optional[Callable[..., Tuple[torch.Tensor, torch.Tensor]]] = None
    score: Optional[Callable[..., torch.Tensor]] = None
    options: Tuple[str, ...] = ()

    @property
    def mid_training(self) -> bool:
        """True when the engine can run it at ``prune_at``: it needs no more than the input norms."""
        return self.inputs in ("nothing", "input_norms")


def _magnitude_score(w, h):
    return w.abs()


def _magnitude(w, h, n, m, mask=None):
    return magnitude_prune(w, n, m, mask)


def _wanda(w, h, n, m, mask=None):
    return wanda_prune(w, h, n, m, mask)


def _sparsegpt(w, h, n, m, mask=None, damp=0.01, block_size=128):
    return sparsegpt_prune(w, h, n, m, damp=damp, block_size=block_size, mask=mask)


def _sparsegpt_score(w, h, damp=0.01, block_size=128):  # block_size shapes the updates, not the score
    return sparsegpt_score(w, h, damp)


# Cheapest first: the config lists the mid-training ones in this order.
PRUNERS: Dict[str, Pruner] = {
    p.name: p
    for p in (
        Pruner("magnitude", "nothing", "keep the n largest |W_ij| of every m", _magnitude, score=_magnitude_score),
        Pruner("wanda", "input_norms", "keep the n largest |W_ij| * ||x_j|| of every m (Sun et al. 2024)", _wanda,
               score=wanda_score),
        Pruner("sparsegpt", "gram", "OBS-style pruning with weight updates (Frantar & Alistarh 2023)", _sparsegpt,
               score=_sparsegpt_score, options=("damp", "block_size")),
        Pruner("prox", "gram", "the 2:4 proximal operator with a growing lambda (Kuebler et al. 2025)"),
    )
}
PRUNE_METHODS = tuple(PRUNERS)
MID_TRAINING_PRUNERS = tuple(name for name, p in PRUNERS.items() if p.mid_training)
