"""Which linear layers of a model to work on, and their weights in one layout.

Shared by `sparsify` (which swaps the chosen layers for `SparseLinear`), `prune` (which rewrites
their weights) and the export (which checks them). It imports only torch, so the pruning package
and the config can use it without importing the layers.

The ``targets`` grammar, one for every caller:

- ``"mlp"``: the feed-forward layers, by the names common implementations give them;
- ``"mlp_down"``: the feed-forward down-projections only (whose input is the FFN activation);
- ``"all"``: every linear layer except output heads (``lm_head``, ``classifier``...) and layers whose
  weight is tied to an embedding;
- ``None``: the caller's default: for `prune`, every layer inside the decoder blocks (``within``),
  or ``"all"`` when the model has no block list;
- any other string: a regular expression matched with ``re.search`` against qualified names;
- a callable ``(module, name) -> bool``.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["is_conv1d", "is_linear_like", "layer_weight", "set_layer_weight", "select_targets", "Targets"]

Targets = Union[None, str, Callable[[nn.Module, str], bool]]

# Feed-forward layers by the names the common implementations give them:
#   transformers GPT-2 `h.0.mlp.c_fc` / `mlp.c_proj`; Llama, Mistral, Qwen `mlp.gate_proj|up_proj|down_proj`;
#   OPT `fc1`/`fc2`; BERT `intermediate.dense` and the block's (not attention's) `output.dense`;
#   nn.TransformerEncoderLayer / DecoderLayer `linear1`/`linear2`; GPT-NeoX `mlp.dense_h_to_4h` etc.
_MLP_PARENT = re.compile(r"(^|\.)(mlp|feed_forward|feedforward|ffn|ff|ffwd|intermediate)(\.|$)")
_MLP_LEAF = re.compile(r"(^|\.)(linear1|linear2|fc1|fc2|c_fc|gate_proj|up_proj|down_proj|w1|w2|w3|wi|wo)$")
_BERT_FFN_OUT = re.compile(r"(^|\.)layer\.\d+\.output\.dense$")
# The FFN's last layer, whose input is the FFN activation ("mlp_down"). GPT-2's attention has a
# `c_proj` too, so a leaf counts only inside an FFN (`_is_mlp`).
_MLP_DOWN_LEAF = re.compile(r"(^|\.)(c_proj|down_proj|fc2|linear2|w2|wo|dense_4h_to_h)$")
# Never chosen by "all": output heads that map to the vocabulary or the classes.
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output_projection|classifier|score)$")


def is_conv1d(module: nn.Module) -> bool:
    """True for `transformers`' ``Conv1D`` (GPT-2's linear layer that stores W^T as ``[in, out]``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or broken: no Conv1D can exist
        return False
    return isinstance(module, Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` (and its subclasses) and ``transformers``' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The detached weight of a Linear or Conv1D in ``nn.Linear`` layout ``[out, in]`` (a view).

    Example:
        >>> layer_weight(nn.Linear(4, 2)).shape
        torch.Size([2, 4])
    """
    w = module.weight.detach()
    return w.t() if is_conv1d(module) else w  # Conv1D stores [in, out]


def set_layer_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Write ``w`` (``[out, in]``) back into the layer, in its own layout and dtype."""
    if is_conv1d(module):
        w = w.t()
    with torch.no_grad():
        module.weight.copy_(w.to(module.weight.dtype))


def _is_mlp(name: str) -> bool:
    return bool(_MLP_PARENT.search(name) or _MLP_LEAF.search(name) or _BERT_FFN_OUT.search(name))


def _rule(model: nn.Module, targets: Targets, within: Optional[str]) -> Callable[[str, nn.Module], bool]:
    """``(name, module) -> chosen`` for a ``targets`` value (see the module docstring)."""
    if callable(targets):
        return lambda n, mod: bool(targets(mod, n))
    if targets is None and within:
        prefix = within + "."
        return lambda n, mod: n.startswith(prefix)
    if targets is None or targets == "all":
        tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        return lambda n, mod: not _HEAD.search(n) and id(mod.weight) not in tied
    if targets == "mlp":
        return lambda n, mod: _is_mlp(n)
    if targets == "mlp_down":
        return lambda n, mod: bool((_is_mlp(n) and _MLP_DOWN_LEAF.search(n)) or _BERT_FFN_OUT.search(n))
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"`targets`={targets!r} is neither 'mlp', 'all' nor a valid regex ('mlp_down' is a preset too): {e}") from None
        return lambda n, mod: bool(pattern.search(n))
    raise TypeError(
        f"`targets` must be None, 'mlp', 'all', a regex string or a callable (module, name) -> bool, got {targets!r}"
    )


def select_targets(
    model: nn.Module,
    targets: Targets,
    *,
    within: Optional[str] = None,
    exclude: Optional[Callable[[str, nn.Module], bool]] = None,
) -> Tuple[Dict[str, nn.Module], List[Tuple[str, str]]]:
    """The linear layers ``targets`` chooses, in model order.

    Args:
        model: the model.
        targets: see the module docstring.
        within: qualified name of a block list: chosen layers outside it are reported as skipped
            (`prune` works block by block), and ``targets=None`` means every layer inside it.
        exclude: ``(name, module) -> True`` for linear layers that are not candidates at all (for
            `sparsify`: layers already swapped, and those whose parent reads the weight directly).

    Returns:
        ``(name -> module, [(name, reason) skipped])``: a chosen layer that cannot be used is listed
        with the reason, never dropped silently.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> list(select_targets(model, r"^2$")[0])
        ['2']
    """
    chosen_by = _rule(model, targets, within)
    prefix = within + "." if within else None
    chosen: Dict[str, nn.Module] = {}
    skipped: List[Tuple[str, str]] = []
    for name, mod in model.named_modules():
        if not is_linear_like(mod) or (exclude is not None and exclude(name, mod)):
            continue
        if not chosen_by(name, mod):
            continue
        if prefix is not None and not name.startswith(prefix):
            skipped.append((name, f"outside the decoder blocks `{within}`, which are pruned one by one"))
            continue
        chosen[name] = mod
    return chosen, skipped
