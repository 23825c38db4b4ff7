"""The metrics of a step (flip rate, zero fraction) and the weights' NaN/inf check after the update.

The flip rate compares the mask of this step's weights with the last one's. A non-transposable
mask follows from the weights, so only the last one is kept, packed (1 bit per weight); a
transposable mask changes only when refreshed, and the refresh counts its own flips.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import SparsityConfig
from ..nn._packing import pack_mask, unpack_mask
from ..nn.linear import SparseLinear, local_tensor
from ._dist import ShardSum, nonfinite_flags

__all__ = ["StepMetrics", "weight_error"]

Layers = Sequence[Tuple[str, SparseLinear]]


def weight_error(name: str, what: str, step: int) -> FloatingPointError:
    return FloatingPointError(
        f"Sparse layer `{name}`'s weight holds {what} after optimizer step {step}. Lower the learning "
        f"rate, enable gradient clipping, or use `on_nonfinite='skip'` to skip steps with non-finite gradients."
    )


class StepMetrics:
    """Measures the layers after each optimizer step.

    Attributes:
        values: the last measured metrics (see `Sparsifier.metrics`).
        step: the optimizer step `values` were measured at (-1: never).
    """

    def __init__(self, config: SparsityConfig, reduce: ShardSum) -> None:
        self.config = config
        self.reduce = reduce
        self.values: Dict[str, float] = {}
        self.step = -1
        self._prev_masks: Dict[str, torch.Tensor] = {}  # packed; non-transposable methods only

    def stored_mask(self, name: str, shape: torch.Size) -> Optional[torch.Tensor]:
        """The mask of the weights as the last measurement saw them (None if not kept)."""
        packed = self._prev_masks.get(name)
        return unpack_mask(packed, shape) if packed is not None else None

    def forget_masks(self) -> None:
        self._prev_masks = {}

    @torch.no_grad()
    def snapshot(self, layers: Layers, sparse: bool) -> None:
        """Keep the current masks as the reference of the next flip rate."""
        if not sparse or self.config.transposable:
            self._prev_masks = {}
            return
        self._prev_masks = {name: pack_mask(layer.current_mask()) for name, layer in layers}

    @torch.no_grad()
    def check_weights(self, layers: Layers, step: int) -> None:
        """NaN/inf in any sparse weight: one min/max pass per layer and one host sync for all."""
        bad = self.reduce(nonfinite_flags([local_tensor(layer.weight.detach()) for _, layer in layers]))
        for (name, _), flag in zip(layers, bad.tolist()):
            if flag:
                raise weight_error(name, "NaN/inf value(s)", step)

    @torch.no_grad()
    def measure(self, layers: Layers, step: int, sparse: bool, flipped: List[int],
                on_flips: Optional[Callable[[SparseLinear, torch.Tensor], None]] = None) -> List[List[float]]:
        """Flips, zeros, non-finite weights and size per layer (one all-reduce, one host sync).

        ``flipped`` holds the flips each transposable refresh counted. The masks are kept as the
        next step's reference; ``on_flips(layer, changed)`` sees each layer's flipped entries.

        Raises:
            FloatingPointError: a weight holds NaN/inf.
        """
        stats = []
        for (name, layer), refreshed in zip(layers, flipped):
            w_eff, mask = layer.projection() if sparse else (local_tensor(layer.weight.detach()), None)
            if self.config.transposable:
                flips = torch.tensor(refreshed if mask is not None else 0, device=w_eff.device)
            else:
                prev = self._prev_masks.get(name)
                changed = (mask != unpack_mask(prev, mask.shape)) if (mask is not None and prev is not None) else None
                flips = changed.sum() if changed is not None else w_eff.new_zeros((), dtype=torch.long)
                if changed is not None and on_flips is not None:
                    on_flips(layer, changed)
                if mask is not None:
                    self._prev_masks[name] = pack_mask(mask)
            nonfinite = (~torch.isfinite(local_tensor(layer.weight.detach()))).sum()
            stats.append(torch.stack([flips.long(), (w_eff == 0).sum(), nonfinite,
                                      torch.tensor(w_eff.numel(), device=w_eff.device)]))
        if not sparse:
            self._prev_masks = {}
        if not stats:
            return []
        per_layer = self.reduce(torch.stack(stats).to(torch.float64)).tolist()  # float64: exact counts to 2^53
        for (name, _), (_, _, nonfinite, _) in zip(layers, per_layer):
            if nonfinite:
                raise weight_error(name, f"{int(nonfinite)} NaN/inf value(s)", step)
        return per_layer

    def record(self, per_layer: List[List[float]], step: int, sparse: bool, extra: Dict[str, float]) -> None:
        """Turn `measure`'s counts into `values` for step ``step``."""
        self.step = step
        total = sum(row[3] for row in per_layer)
        self.values = {
            "sparsity/flip_rate": sum(row[0] for row in per_layer) / total if sparse else 0.0,
            "sparsity/zero_fraction": sum(row[1] for row in per_layer) / total,
            "sparsity/dense_phase": float(not sparse),
            **extra,
        }
