"""The few facts about the process group the engine needs: rank, FSDP2 shards, one all-reduce."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ..nn.linear import SparseLinear

__all__ = ["dist_rank", "is_sharded", "ShardSum", "nonfinite_flags", "unwrap_optimizer", "refuse_wrapped"]


def dist_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def is_sharded(layers: Sequence[Tuple[str, SparseLinear]]) -> bool:
    """True when the weights are FSDP2 shards (DTensors)."""
    return any(hasattr(layer.weight, "to_local") for _, layer in layers)


class ShardSum:
    """Sums a tensor over the shards of an FSDP2 model (one all-reduce); nothing to do otherwise.

    Under DDP every rank holds the whole weight, so per-layer sums are already global."""

    def __init__(self, layers: Sequence[Tuple[str, SparseLinear]]) -> None:
        self.layers = list(layers)

    @property
    def sharded(self) -> bool:
        return is_sharded(self.layers)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.sharded:
            weight = self.layers[0][1].weight
            group = weight.device_mesh.get_group() if weight.device_mesh.ndim == 1 else None
            torch.distributed.all_reduce(tensor, group=group)
        return tensor


def nonfinite_flags(tensors: List[torch.Tensor]) -> torch.Tensor:
    """1.0 for each tensor holding NaN or inf, else 0.0 (float64, ready to all-reduce).

    The min and max of a tensor are NaN when it holds a NaN (they propagate it) and +-inf when it
    holds an inf; one read of the data in its own dtype, without a temporary (a float64 sum costs
    a conversion of every element)."""
    ends = torch.stack([torch.stack(torch.aminmax(t.reshape(-1))).float() for t in tensors])  # (n, 2)
    return (~torch.isfinite(ends).all(-1)).to(torch.float64)


def unwrap_optimizer(opt) -> torch.optim.Optimizer:
    """The torch optimizer inside Lightning's, `accelerate`'s or similar wrappers."""
    seen = 0
    while not isinstance(opt, torch.optim.Optimizer) or type(opt).__name__ in ("AcceleratedOptimizer", "LightningOptimizer"):
        inner = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if inner is None or seen > 8:
            break
        opt, seen = inner, seen + 1
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer (or a wrapper of one), got {type(opt).__name__}")
    return opt



_ORDER = ("the order is: `Sparsifier(model, ...)`, then DDP / `fully_shard`, then the optimizer, then "
          "`sparsity.attach(optimizer)`")


def refuse_wrapped(model) -> None:
    """Refuse a model whose layers a swap would take from under DDP or FSDP2.

    The swap gives a `transformers` ``Conv1D`` a new (transposed) Parameter: DDP would never
    synchronise it (the ranks drift apart silently), and a ``fully_shard``-ed model holds DTensors
    that a plain Parameter cannot be mixed with."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) or isinstance(getattr(model, "module", None), DistributedDataParallel):
        raise ValueError(f"`model` is already wrapped in DistributedDataParallel, whose Parameters the swap "
                         f"would replace: {_ORDER}.")
    if any(hasattr(p, "device_mesh") and hasattr(p, "to_local") for p in model.parameters()):
        raise ValueError(f"`model` is already sharded by `fully_shard` (its Parameters are DTensors), and the "
                         f"swap cannot replace them: {_ORDER}.")
