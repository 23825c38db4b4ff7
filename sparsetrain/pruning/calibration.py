"""Finding target layers and decoder blocks, and capturing each layer's input Gram matrix.

``H = X^T X / tokens`` is accumulated in float32 by forward pre-hooks, where ``X`` stacks every
token's input to the layer (``[tokens, in]``). Dividing by the token count makes ``H`` independent
of how much calibration data there is, so the prox schedule and the damping mean the same thing
for 16 or 1024 sequences. Padding tokens, if a batch has any, are counted like the others.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..targets import Targets, is_linear_like, layer_weight, select_targets, set_layer_weight  # noqa: F401

# Target selection and the Conv1D-aware weight access live in `sparsetrain.targets` (one grammar
# for `sparsify` and `prune`); re-exported here for the pruning package's callers.
__all__ = ["layer_weight", "set_layer_weight", "find_blocks", "select_targets", "GramCollector"]

# Attribute paths of the decoder block list in common `transformers` causal LMs; anything else is
# found by `_largest_block_list`.
_BLOCK_PATHS = (
    "transformer.h",  # GPT-2, GPT-J, Bloom
    "model.layers",  # Llama, Mistral, Qwen, Gemma
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # Pythia
    "transformer.blocks",  # MPT
)


def _get_path(model: nn.Module, path: str) -> Optional[nn.Module]:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _largest_block_list(model: nn.Module) -> Optional[nn.ModuleList]:
    """The ``nn.ModuleList`` of same-class children holding the most prunable layers."""
    best, best_count = None, 0
    for mod in model.modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(c) for c in mod}) != 1:
            continue
        count = sum(1 for c in mod for s in c.modules() if is_linear_like(s))
        if count > best_count:
            best, best_count = mod, count
    return best


def find_blocks(model: nn.Module) -> Optional[Tuple[str, nn.ModuleList]]:
    """``(qualified name, block list)`` of a transformer's decoder blocks, or ``None``.

    Known attribute paths are tried first; otherwise the largest ``nn.ModuleList`` of same-class
    modules containing Linear/Conv1D layers is used, if the model has a ``config`` (a
    ``transformers`` model whose blocks take the hidden states as first input).
    """
    for path in _BLOCK_PATHS:
        mod = _get_path(model, path)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    if getattr(model, "config", None) is not None:
        mod = _largest_block_list(model)
        if mod is not None:
            name = next(n for n, m in model.named_modules() if m is mod)
            return name, mod
    return None


class GramCollector:
    """Context manager accumulating ``H = X^T X`` (float32) and the token count of some layers.

    Example:
        >>> lin = nn.Linear(4, 2); x = torch.randn(3, 5, 4)
        >>> with GramCollector({"lin": lin}) as gc:
        ...     _ = lin(x)
        >>> gc.tokens["lin"], torch.allclose(gc.mean_gram("lin"), x.reshape(15, 4).T @ x.reshape(15, 4) / 15)
        (15, True)
    """

    def __init__(self, layers: Dict[str, nn.Module], stop_after: Optional[str] = None):
        self.layers = layers
        self.stop_after = stop_after
        self.gram: Dict[str, torch.Tensor] = {}
        self.tokens: Dict[str, int] = {name: 0 for name in layers}
        self._handles = []

    def _hook(self, name):
        def pre_hook(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
            if name not in self.gram:
                self.gram[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.gram[name].addmm_(x.t(), x)
            self.tokens[name] += x.shape[0]

        return pre_hook

    def __enter__(self) -> "GramCollector":
        for name, mod in self.layers.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
            if name == self.stop_after:
                self._handles.append(mod.register_forward_hook(_raise_stop))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def mean_gram(self, name: str) -> torch.Tensor:
        """``H / tokens`` of one layer; a ``ValueError`` if it never saw a token."""
        if self.tokens.get(name, 0) == 0:
            raise ValueError(f"Layer `{name}` received no calibration tokens: it is never called in the forward pass")
        return self.gram[name] / self.tokens[name]


class StopForward(Exception):
    """Raised from a hook to end a forward pass early once everything needed was captured."""


def _raise_stop(module, args, output):
    raise StopForward


def record_call_order(run: Callable[[], None], layers: Dict[str, nn.Module]) -> Tuple[List[List[str]], Dict[str, int]]:
    """Group layers by shared input, in call order, from one forward pass.

    Layers called back to back on the very same input tensor (q/k/v, gate/up) form one group: they
    can be pruned together. A later group sees the outputs of the earlier, already-pruned ones.
    A layer called more than once per pass joins the group of its first call; a layer never called
    is in no group (the caller reports it).

    Returns:
        ``(groups of names, calls per name)``.
    """
    calls: List[Tuple[str, int]] = []
    keep = []  # holds every input tensor until the pass ends, so that no id() is reused
    handles = []
    for name, mod in layers.items():
        def pre_hook(module, args, _name=name):
            keep.append(args[0])
            calls.append((_name, id(args[0])))
        handles.append(mod.register_forward_pre_hook(pre_hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    groups: List[List[str]] = []
    seen = set()
    last_id = None
    for name, xid in calls:
        if name in seen:
            continue  # a re-used layer: its first call decides its group
        seen.add(name)
        if groups and xid == last_id:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_id = xid
    counts = {name: sum(1 for n, _ in calls if n == name) for name in layers}
    return groups, counts
