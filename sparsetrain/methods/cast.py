"""``cast``: CAST's adaptive sparse decay and weight scaling, in straight-through form.

CAST (Huang, Hu, Zhu, Chen 2025, "Continuous and Differentiable Semi-Structured Sparsity-Aware
Training for Large Language Models", arXiv 2509.25996; by the authors of S-STE) has three parts:

1. **AdamS**: Adam with an L1 decay on the weights outside the N:M mask (the mask keeps the n
   largest |W| of every group of m and is recomputed every T1 = 10 steps). The decay goes through
   Adam's adaptive normalisation, so every weight is pulled to zero in units of its own update
   size ("adaptive L1 decay", which sparsifies all layers alike), and a scheduler grows it.
2. **Weight scaling**: a scale on the weights that gives back the magnitude the decay takes away,
   without changing which weights are kept.
3. **Distillation** from the dense model as a teacher.

What this file implements, per layer, with the mask ``M`` of the current weights:

- forward ``W~ = s * P(W)`` (P: the hard N:M projection, as STE), backward straight-through;
- once per optimizer step, on the final gradient: ``grad += decay_t * sign(W) * (1 - M)``, with
  ``decay_t = method_options["decay"]`` times the ``decay_ramp`` factor (the scheduler: 0 -> 1
  over ``decay_ramp`` steps, constant without one). With Adam / AdamW the term passes through
  Adam's moments and is divided by ``sqrt(v)``: the adaptive L1 decay of AdamS;
- ``s = ||W||_F / ||P(W)||_F``, taken when sparse training starts and then frozen (kept in the
  layer's ``beta`` buffer; summed over shards under FSDP2): the projected weight keeps the dense
  weight's Frobenius norm, and scaling never changes which entries are kept.

What is simplified, and why:

- The paper's training is continuous: its forward sees the decaying weights until the decay has
  made them N:M. Here the forward is exactly N:M from the first sparse step, so the sparse
  backends, the metrics and `export` work unchanged; the decay then steers which weights win
  their group (fewer flips) instead of fading the pruned ones out of the forward.
- The decay enters through the gradient, so it also goes through Adam's first moment (the
  authors' earlier AST code adds it after the momentum): same size in steady state, a lag of
  about 1/(1 - beta1) steps.
- The mask is that of the current weights at every step (not every 10).
- ``s`` is a closed-form, frozen scale, not a learned parameter (a learned one would need a new
  Parameter in the user's optimizer).
- No distillation: it is a loss term, and the training loop owns the loss.
- The default ``decay`` (2e-4, the size of SR-STE's default) is not tuned.

Only the abstract and a published summary of the method section could be read while writing this
(not the full paper), so constants the paper may fix (its decay schedule's shape, where its scale
sits) are the ones stated above.

Example:
    >>> cfg = SparsityConfig(method="cast", method_options={"decay": 1e-3}, decay_ramp=1000)
"""

from __future__ import annotations

import math

import torch

from ..ops.nm import project
from .base import Method, accumulation_dtype
from .registry import register


@register
class CAST(Method):
    name = "cast"
    summary = ("CAST: W~ = s * P(W) with a frozen norm-keeping scale s, plus an adaptive L1 decay "
               "decay * sign(W) * (1 - mask) on the gradient every optimizer step (Huang et al. 2025)")
    mode = "hard"
    has_scale = True
    options = {"decay": 2e-4}

    def check(self, cfg) -> None:
        super().check(cfg)
        decay = self.resolved_options(cfg)["decay"]
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay) or decay < 0:
            raise ValueError(f"`method_options['decay']` for method='cast' must be a finite number >= 0, got {decay!r}")

    def has_step_term(self, cfg) -> bool:
        return self.resolved_options(cfg)["decay"] > 0

    def needs_engine(self, cfg):
        if self.has_step_term(cfg):
            return "CAST's decay is applied once per optimizer step by the engine; without one it trains as a scaled STE"
        return None

    def project(self, w, n, m, scale=None, ramp=1.0, need_mask=True):
        if scale is None:
            raise ValueError("method='cast' needs its scale `beta`")
        w_eff, mask = project(w, n, m, "hard", need_mask=need_mask)
        # Scaled in float32 (or wider) and rounded once to the weight's dtype.
        acc = torch.promote_types(w.dtype, torch.float32)
        return (w_eff.to(acc) * scale.to(acc)).to(w.dtype), mask

    def scale_stats(self, w, n, m):
        acc = accumulation_dtype(w)
        w_acc = w.detach().to(acc)
        p, _ = project(w_acc, n, m, "hard", need_mask=False)
        return torch.stack([(w_acc * w_acc).sum(), (p * p).sum()])

    def scale_from_stats(self, stats):
        dense, kept = stats[0], stats[1]
        # An all-zero weight keeps scale 1; a NaN in the weight gives a NaN scale (the NaN check reports it).
        fallback = torch.where(torch.isnan(kept), kept, torch.ones_like(kept))
        return torch.where(kept > 0, (dense / kept.clamp_min(torch.finfo(kept.dtype).tiny)).sqrt(), fallback).float()

    def add_step_term_(self, grad, w, mask, cfg, factor: float = 1.0) -> None:
        alpha = self.resolved_options(cfg)["decay"] * factor
        if alpha:
            grad.add_(torch.sign(w).masked_fill_(mask, 0).to(grad.dtype), alpha=alpha)
