"""Swap a model's linear layers for `SparseLinear` and back: `sparsify`, `densify`, `export`."""

from __future__ import annotations

import copy
import logging
import re
import warnings
from typing import Callable, Iterator, List, Tuple

import torch.nn as nn

from ..config import SparsityConfig
from .linear import SparseLinear, is_conv1d

__all__ = ["sparsify", "densify", "export", "select_targets", "sparse_layers"]

log = logging.getLogger(__name__)

# Feed-forward layers by the names the common implementations give them:
#   transformers GPT-2 `h.0.mlp.c_fc` / `mlp.c_proj`; Llama, Mistral, Qwen `mlp.gate_proj|up_proj|down_proj`;
#   OPT `fc1`/`fc2`; BERT `intermediate.dense` and the block's (not attention's) `output.dense`;
#   nn.TransformerEncoderLayer / DecoderLayer `linear1`/`linear2`; GPT-NeoX `mlp.dense_h_to_4h` etc.
_MLP_PARENT = re.compile(r"(^|\.)(mlp|feed_forward|feedforward|ffn|ff|ffwd|intermediate)(\.|$)")
_MLP_LEAF = re.compile(r"(^|\.)(linear1|linear2|fc1|fc2|c_fc|gate_proj|up_proj|down_proj|w1|w2|w3|wi|wo)$")
_BERT_FFN_OUT = re.compile(r"(^|\.)layer\.\d+\.output\.dense$")
# Never swapped by "all": output heads that map to the vocabulary.
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output_projection|classifier|score)$")


def _is_linear_like(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and not isinstance(module, SparseLinear)


def _is_mlp(name: str) -> bool:
    return bool(_MLP_PARENT.search(name) or _MLP_LEAF.search(name) or _BERT_FFN_OUT.search(name))


def _candidates(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Linear-like layers whose forward actually runs (nn.MultiheadAttention reads its
    ``out_proj.weight`` directly, so swapping it would do nothing)."""
    skip_prefixes = [n + "." for n, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)]
    for name, module in model.named_modules():
        if _is_linear_like(module) and not any(name.startswith(p) for p in skip_prefixes):
            yield name, module


def _embedding_weights(model: nn.Module) -> set:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def select_targets(model: nn.Module, targets) -> List[Tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``targets`` selects (see `SparsityConfig.targets`)."""
    tied = _embedding_weights(model)
    if callable(targets):
        chosen: Callable[[str, nn.Module], bool] = lambda n, mod: bool(targets(mod, n))
    elif targets == "mlp":
        chosen = lambda n, mod: _is_mlp(n)
    elif targets == "all":
        chosen = lambda n, mod: not _HEAD.search(n) and id(mod.weight) not in tied
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"`targets`={targets!r} is neither 'mlp', 'all' nor a valid regex: {e}") from None
        chosen = lambda n, mod: bool(pattern.search(n))
    else:
        raise TypeError(f"`targets` must be 'mlp', 'all', a regex or a callable, got {targets!r}")
    return [(n, mod) for n, mod in _candidates(model) if chosen(n, mod)]


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
    targets = select_targets(model, config.targets)
    if not targets:
        names = [n for n, _ in _candidates(model)][:8]
        raise ValueError(
            f"`targets`={config.targets!r} matched no nn.Linear / Conv1D layer of {type(model).__name__}. "
            f"Its linear layers include: {names or 'none'}"
        )
    swapped, skipped = [], []
    for index, (name, module) in enumerate(targets):
        # Conv1D stores (in, out); Linear (out, in)
        in_features, out_features = module.weight.shape if is_conv1d(module) else module.weight.shape[::-1]
        if in_features % config.m != 0:
            skipped.append(f"{name} (in_features={in_features})")
            continue
        if config.transposable and out_features % config.m != 0:
            skipped.append(f"{name} (out_features={out_features}; transposable masks tile both dims)")
            continue
        # Each layer draws its own MVUE stream: seed + a per-layer offset.
        layer_cfg = config if config.seed is None else config.replace(seed=config.seed + 7919 * index)
        _set_submodule(model, name, SparseLinear.from_dense(module, layer_cfg, name=name))
        swapped.append(name)
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
