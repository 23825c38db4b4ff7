"""Swap a model's linear layers for `SparseLinear` and back: `sparsify`, `densify`, `export`."""

from __future__ import annotations

import copy
import logging
import warnings
from typing import List, Tuple

import torch.nn as nn

from ..config import SparsityConfig
from ..targets import layer_weight, select_targets
from .linear import SparseLinear, seed_names

__all__ = ["sparsify", "densify", "export", "select_targets", "sparse_layers"]

log = logging.getLogger(__name__)


def _not_swappable(model: nn.Module):
    """``(name, module) -> True`` for linear layers `sparsify` must leave alone: those already
    swapped, and those inside an ``nn.MultiheadAttention`` (it reads ``out_proj.weight`` directly,
    so swapping it would do nothing)."""
    mha = [n + "." for n, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)]
    return lambda name, mod: isinstance(mod, SparseLinear) or any(name.startswith(p) for p in mha)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def sparse_layers(model: nn.Module) -> List[Tuple[str, SparseLinear]]:
    """All `SparseLinear` layers of ``model`` with their qualified names."""
    return [(n, mod) for n, mod in model.named_modules() if isinstance(mod, SparseLinear)]


def sparsify(model: nn.Module, config: SparsityConfig | None = None) -> List[str]:
    """Swap the target `nn.Linear` / `Conv1D` layers of ``model`` for `SparseLinear`, in place.

    Layers whose input dim is not a multiple of ``m`` stay dense; one warning names them. If that
    leaves no layer sparse, it is an error (a run that silently trains dense helps nobody).

    Args:
        model: any module (a `transformers` model, a LightningModule, a plain stack...).
        config: the `SparsityConfig`; defaults to S-STE 2:4 on the feed-forward layers.

    Returns:
        The qualified names of the swapped layers.

    Raises:
        ValueError: ``targets`` matches no layer, no target's dims suit ``m``, or a target's
            weights are not finite.

    Example:
        >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 2)
        >>> sparsify(enc, SparsityConfig(method="ste"))
        ['layers.0.linear1', 'layers.0.linear2', 'layers.1.linear1', 'layers.1.linear2']
    """
    config = SparsityConfig() if config is None else config
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"`config` must be a SparsityConfig, got {type(config).__name__}")
    exclude = _not_swappable(model)
    targets = list(select_targets(model, config.targets, exclude=exclude)[0].items())
    if not targets:
        names = list(select_targets(model, lambda mod, name: True, exclude=exclude)[0])[:8]
        raise ValueError(
            f"`targets`={config.targets!r} matched no nn.Linear / Conv1D layer of {type(model).__name__}. "
            f"Its linear layers include: {names or 'none'}"
        )
    act_names = _activation_targets(model, config, targets, exclude)
    targets += [(n, mod) for n, mod in select_targets(model, config.activation_targets, exclude=exclude)[0].items()
                if n in act_names and all(n != t for t, _ in targets)]
    swapped, skipped = [], []
    for name, module in targets:
        out_features, in_features = layer_weight(module).shape
        if in_features % config.m != 0:
            skipped.append(f"{name} (in_features={in_features})")
            continue
        if config.transposable and out_features % config.m != 0:
            skipped.append(f"{name} (out_features={out_features}; transposable masks tile both dims)")
            continue
        swapped.append(name)
    # Each layer draws its own MVUE stream: its seed follows from the config's seed and its name.
    modules = dict(targets)
    for name, seed_name in zip(swapped, seed_names(swapped)):
        layer = SparseLinear.from_dense(modules[name], config, name=name)
        layer.set_name(seed_name)
        if name in act_names:
            layer.input_nm = config.activation_nm  # this layer's input is made N:M per token
        _set_submodule(model, name, layer)
    if not swapped and config.sparse:
        raise ValueError(
            f"`targets`={config.targets!r} selects {len(targets)} layer(s) but none can be made {config.n}:{config.m} "
            f"sparse: {', '.join(skipped[:8])}{'...' if len(skipped) > 8 else ''}. Choose an `m` that divides their "
            f"input dims, or other `targets`."
        )
    if skipped:
        warnings.warn(
            f"sparsify left {len(skipped)} layer(s) dense because a dim is not a multiple of "
            f"m={config.m}: {', '.join(skipped)}",
            stacklevel=2,
        )
    log.info("sparsify: %d layer(s) now %s %d:%d", len(swapped), config.method, config.n, config.m)
    return swapped


def _activation_targets(model: nn.Module, config: SparsityConfig, weight_targets, exclude) -> set:
    """Names of the layers whose input ``config.activation_sparsity`` makes N:M (empty when off).

    A layer may have sparse inputs without being in ``targets``: with ``method="dense"`` it is
    swapped just for its input. With a sparse method its weights would need a config of their own,
    which the engine's per-step rules do not support yet: that is an error naming the layers.
    """
    nm = config.activation_nm
    if nm is None:
        return set()
    try:
        chosen = select_targets(model, config.activation_targets, exclude=exclude)[0]
    except ValueError as err:  # the grammar's message names `targets`: say which field it was
        raise ValueError(str(err).replace("`targets`", "`activation_targets`", 1)) from None
    if not chosen:
        names = list(select_targets(model, lambda mod, name: True, exclude=exclude)[0])[:8]
        raise ValueError(
            f"`activation_targets`={config.activation_targets!r} matched no nn.Linear / Conv1D layer of "
            f"{type(model).__name__}, so `activation_sparsity`={config.activation_sparsity!r} would do nothing. "
            f"Its linear layers include: {names or 'none'}"
        )
    bad = [n for n, mod in chosen.items() if layer_weight(mod).shape[1] % nm[1]]
    if bad:
        raise ValueError(
            f"`activation_sparsity`={config.activation_sparsity!r}: the input dim of {', '.join(bad[:4])} is not a "
            f"multiple of {nm[1]}; choose other `activation_targets`"
        )
    weight_names = {n for n, _ in weight_targets}
    extra = [n for n in chosen if n not in weight_names]
    if extra and config.sparse:
        raise ValueError(
            f"`activation_targets` selects layer(s) that `targets` does not: {', '.join(extra[:4])}. With "
            f"method={config.method!r} add them to `targets` (their weights are then trained sparse too), or "
            f"use method='dense' for sparse activations with dense weights."
        )
    return set(chosen)


def densify(model: nn.Module) -> List[str]:
    """Swap every `SparseLinear` back to `nn.Linear` / `Conv1D` holding its dense weight W, in place."""
    names = []
    for name, layer in sparse_layers(model):
        _set_submodule(model, name, layer.to_dense(effective=False))
        names.append(name)
    return names


def _fully_sharded(model: nn.Module) -> bool:
    """True when ``model`` or a submodule is managed by FSDP2's `fully_shard`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def export(model: nn.Module, inplace: bool = False, semi_structured: bool = False) -> nn.Module:
    """A model with plain `nn.Linear` / `Conv1D` layers holding the effective weights W~.

    The result has no sparsetrain modules, so it saves with ``save_pretrained`` and loads without
    sparsetrain; its outputs equal the sparse model's.

    Args:
        model: a model with `SparseLinear` layers.
        inplace: swap in ``model`` itself instead of a deep copy.
        semi_structured: keep 2:4 weights as `torch.sparse.to_sparse_semi_structured` tensors for
            fast inference. Needs the model on an Ampere-or-newer GPU in float16/bfloat16. Layers
            that came from ``Conv1D`` become `nn.Linear` (the 2:4 groups run along the input
            dim, the last dim of a Linear weight); layers that cannot be stored that way (not
            2:4, or shapes off cuSPARSELt's multiples of 16) stay dense, with one warning.

    Under FSDP2 (`fully_shard`) only ``inplace=True`` works: every rank must call it (each layer's
    W~ is gathered from the shards), and the swapped layers then hold full, unsharded W~.

    Raises:
        ValueError: ``semi_structured=True`` where no semi-structured GEMM can run (no CUDA,
            no cuSPARSELt, an older GPU, or a float32 model); the message says which. Or a copy
            (``inplace=False``) of an FSDP2 model, which FSDP2 cannot deepcopy.

    Example (GPU)::

        fast = export(model.half().cuda(), semi_structured=True)
    """
    if not inplace and _fully_sharded(model):
        raise ValueError(
            "export(model) cannot copy a model sharded with FSDP2 `fully_shard` (FSDP2 does not support deepcopy). "
            "Call `export(model, inplace=True)` on every rank after training: it gathers each sparse layer's W~ (a "
            "collective) and swaps it in place."
        )
    out = model if inplace else copy.deepcopy(model)
    layers = list(sparse_layers(out))
    if semi_structured and layers:
        from ..backends import cusparselt

        # Device, GPU and dtype first, on a 16 x 16 stand-in: a shape problem is one layer's.
        ok, reason = cusparselt.can_use(layers[0][1].weight.new_zeros(16, 16))
        if not ok:
            raise ValueError(f"export(semi_structured=True) cannot run here: {reason}")
    kept_dense = []
    for name, layer in layers:
        if not semi_structured:
            _set_submodule(out, name, layer.to_dense(effective=True))
            continue
        lin = layer.to_dense(effective=True, as_linear=True)
        try:
            cusparselt.to_semi_structured(lin)
        except ValueError as err:
            kept_dense.append(f"{name} ({str(err).split(': ', 1)[-1]})")
            lin = layer.to_dense(effective=True)
        _set_submodule(out, name, lin)
    if kept_dense:
        warnings.warn(
            f"export(semi_structured=True) kept {len(kept_dense)} layer(s) dense: {'; '.join(kept_dense)}",
            stacklevel=2,
        )
    return out
