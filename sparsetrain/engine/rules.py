"""The per-step gradient rules, and the few facts about a method the engine needs.

Run once per optimizer step on final (unscaled, clipped) gradients, right before the update:

- the NaN policy: a gradient holding NaN/inf raises, or (``on_nonfinite="skip"``) skips the step;
- the decays: SR-STE's ``srste_decay * (1 - mask) * W`` and ``masked_decay * (1 - mask) * W``
  added to the gradient, scaled by the decay ramp;
- after the update, ``flip_moments``: Adam moments of weights whose mask entry flipped are reset.

The method-specific questions (which decay, whether a beta is taken at the switch) are answered
here and nowhere else in the engine.
"""

from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..config import SparsityConfig
from ..methods import decay_term
from ..nn.linear import SparseLinear, local_tensor
from ._dist import ShardSum, nonfinite_flags

__all__ = ["GradientRules", "decay_rate", "has_decay", "initial_betas", "keep_sparse_weights", "method_metrics", "restore_lr", "scale_lr"]

Layers = Sequence[Tuple[str, SparseLinear]]


def decay_rate(config: SparsityConfig) -> float:
    """The factor on ``(1 - mask) * W`` added to the gradient each step for every method
    (``masked_decay``; before the decay ramp). A method's own term is `Method.add_step_term_`."""
    return config.masked_decay or 0.0


def has_decay(config: SparsityConfig) -> bool:
    """True when a per-step term changes the gradient: the method's own (SR-STE's decay) or ``masked_decay``."""
    return config.rule.has_step_term(config) or bool(decay_rate(config))


@torch.no_grad()
def initial_betas(layers: Layers, config: SparsityConfig, reduce: ShardSum) -> Optional[List[torch.Tensor]]:
    """The method's per-layer scale (S-STE's beta) from the weights as they are now, or None for a
    method without one. The method's sums over the weight (float64) are added up over all shards
    with one all-reduce for all layers."""
    rule = config.rule
    if not rule.has_scale:
        return None
    stats = torch.stack([rule.scale_stats(local_tensor(layer.weight.detach()), config.n, config.m)
                         for _, layer in layers])  # (layers, stats)
    return [rule.scale_from_stats(row) for row in reduce(stats).unbind(0)]


@torch.no_grad()
def keep_sparse_weights(layers: Layers) -> None:
    """At the switch to the dense final phase, write each layer's W~ into W (rank-local).

    Dense fine-tuning then starts from the model the sparse phase trained. Without it the first
    dense step would use the raw W: for S-STE, the weights before the soft threshold and beta
    (on the 2x64 squared-ReLU model of ``benchmarks/activation_quality.py`` the validation loss
    went from 1.71 to 3.16 at the switch), for STE every pruned weight at once."""
    for _, layer in layers:
        w_eff, _ = layer.projection()
        local_tensor(layer.weight.data).copy_(w_eff)


def scale_lr(optimizer: Optional[torch.optim.Optimizer], factor: float) -> Optional[List]:
    """Multiply every param group's lr by ``factor`` for one step; returns what `restore_lr` puts back."""
    if optimizer is None or factor == 1.0:
        return None
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
    return saved


def restore_lr(optimizer: Optional[torch.optim.Optimizer], saved: Optional[List]) -> None:
    if optimizer is not None and saved is not None:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr


class GradientRules:
    """The rules on a step's gradients (see the module docs)."""

    def __init__(self, config: SparsityConfig, reduce: ShardSum) -> None:
        self.config = config
        self.reduce = reduce

    def first_nonfinite(self, layers: Layers) -> Optional[str]:
        """The name of the first layer whose gradient holds NaN/inf (one host sync for all)."""
        tensors, names = [], []
        for name, layer in layers:
            if layer.weight.grad is not None:
                tensors.append(local_tensor(layer.weight.grad))
                names.append(name)
        if not tensors:
            return None
        flags = self.reduce(nonfinite_flags(tensors)).tolist()
        return next((name for name, flag in zip(names, flags) if flag), None)

    def skip_nonfinite(self, layers: Layers, step: int, optimizer: Optional[torch.optim.Optimizer]) -> bool:
        """Apply the NaN policy to optimizer step ``step`` (1-based): True if the step is skipped.

        Raises:
            FloatingPointError: a gradient holds NaN/inf and ``on_nonfinite="raise"``.
        """
        name = self.first_nonfinite(layers)
        if name is None:
            return False
        if self.config.on_nonfinite != "skip":
            raise FloatingPointError(
                f"Sparse layer `{name}`'s gradient holds NaN/inf at optimizer step {step}. Lower the learning rate, "
                f"enable gradient clipping, or set `on_nonfinite='skip'` to skip such steps."
            )
        warnings.warn(
            f"Sparse layer `{name}`'s gradient holds NaN/inf at optimizer step {step}: the step is skipped "
            f"(on_nonfinite='skip').",
            stacklevel=5,
        )
        # No gradient, no update: optimizers skip parameters whose .grad is None.
        if optimizer is not None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        return True

    @torch.no_grad()
    def apply_decays(self, layers: Layers, scale: float, mask_of: Callable[[str, SparseLinear], torch.Tensor]) -> None:
        """The method's per-step term (`Method.add_step_term_`, e.g. SR-STE's decay) and
        ``grad += scale * masked_decay * (1 - mask) * W``, for every layer with a gradient."""
        cfg = self.config
        alpha = decay_rate(cfg) * scale
        own = cfg.rule.has_step_term(cfg) and scale > 0
        if not alpha and not own:
            return
        for name, layer in layers:
            grad = layer.weight.grad
            if grad is None:
                continue
            g = local_tensor(grad)
            w = local_tensor(layer.weight.detach())
            mask = mask_of(name, layer)
            if own:
                cfg.rule.add_step_term_(g, w, mask, cfg, scale)
            if alpha:
                g.add_(decay_term(w, mask).to(g.dtype), alpha=alpha)

    @torch.no_grad()
    def reset_flipped_moments(self, optimizer: Optional[torch.optim.Optimizer], layer: SparseLinear,
                              flipped: torch.Tensor) -> None:
        """Zero the Adam moments of the weights whose mask entry flipped in this step."""
        if self.config.flip_moments is None or optimizer is None:
            return
        state = optimizer.state.get(layer.weight)
        if not state:
            return
        keys = ("exp_avg", "exp_avg_sq") if self.config.flip_moments == "reset" else ("exp_avg",)
        for key in keys:
            if key in state:
                local_tensor(state[key]).masked_fill_(flipped, 0)


def method_metrics(layers: Layers, config: SparsityConfig) -> dict:
    """The metrics a method adds to the engine's: the mean of its per-layer scale (S-STE's beta)."""
    if not config.rule.has_scale:
        return {}
    return {"sparsity/beta_mean": sum(float(layer.beta) for _, layer in layers) / len(layers)}
