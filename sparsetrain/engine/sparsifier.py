"""`Sparsifier`: the one owner of everything sparse training does once per optimizer step or per run.

It works in any training loop. It swaps the target layers (like `sparsify`), and `attach` hooks an
optimizer with PyTorch's own step hooks (see `hooks`), so whatever the loop does before
``optimizer.step()`` (gradient accumulation, `GradScaler`, clipping) stays the loop's business:

- **before the update**: the gradients are final, unscaled and clipped. The NaN policy runs, then
  SR-STE's ``srste_decay * (1 - mask) * W`` and ``masked_decay * (1 - mask) * W`` are added to
  them (`rules`). Once per step, whatever the accumulation or the loss scale.
- **after the update**: the step counter advances; the `schedule` says the phase and the ramps,
  which the layers receive through `SparseLinear.set_step_state` (with the MVUE seed of the
  step); ``prune_at`` prunes once (`prune_at`); transposable masks refresh every
  ``mask_update_interval`` steps; `metrics` are computed from one projection of each layer and
  non-finite weights are caught (`metrics`).

State that follows from the weights is not stored. `state_dict` holds the step, the config
fields that change the math (`state`), so a resume with a different config is a one-line error.

Distributed: under DDP the weights are equal on every rank and everything is computed locally,
with MVUE draws distinct per rank. Under FSDP2 (`fully_shard`, dim 0 sharded) N:M groups run along
dim 1, so projections, masks and decays are exact per shard; S-STE's beta and the metrics are sums
over shards, combined with one all-reduce for all layers. The order is: `Sparsifier`, then DDP /
`fully_shard`, then the optimizer, then `attach`.

Example:
    >>> sparsity = Sparsifier(model, SparsityConfig(method="sr-ste"))
    >>> opt = torch.optim.AdamW(model.parameters(), lr=6e-4)
    >>> sparsity.attach(opt, max_steps=10_000)
    >>> for x, y in loader:
    ...     loss_fn(model(x), y).backward()
    ...     opt.step(); opt.zero_grad()
    ...     log(sparsity.metrics)
    >>> torch.save({"model": model.state_dict(), "sparsity": sparsity.state_dict()}, path)
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..config import SparsityConfig, engine_requirements
from ..nn.convert import sparse_layers, sparsify
from ..nn.linear import SparseLinear, local_tensor, seed_names
from ._dist import ShardSum, dist_rank, refuse_wrapped, unwrap_optimizer
from .hooks import OptimizerHooks, warn_until_attached
from .metrics import StepMetrics
from .prune_at import PruneAt
from .rules import GradientRules, has_decay, initial_betas, keep_sparse_weights, method_metrics, restore_lr, scale_lr
from .schedule import Schedule
from .state import STATE_FORMAT, check_adopted, check_resume, fingerprint

__all__ = ["Sparsifier"]

log = logging.getLogger(__name__)


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return value


def _check_attach(layers, opt, config: SparsityConfig, sharded: bool) -> None:
    """What `Sparsifier.attach` refuses: an optimizer without the sparse weights, ``flip_moments``
    without Adam moments, transposable masks on FSDP2 shards."""
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    missing = [name for name, layer in layers if id(layer.weight) not in held]
    if missing:
        raise ValueError(
            f"The optimizer does not hold the weight of {len(missing)} sparse layer(s) ({', '.join(missing[:4])}"
            f"{'...' if len(missing) > 4 else ''}). Build the optimizer after `Sparsifier(model, ...)`: the swap "
            f"replaces transformers Conv1D weights by transposed Parameters."
        )
    if config.flip_moments is not None and "betas" not in opt.defaults:
        raise ValueError(
            f"`flip_moments`={config.flip_moments!r} resets Adam moments, but the optimizer is "
            f"{type(opt).__name__} (no `betas`). Use Adam/AdamW, or flip_moments=None."
        )
    if config.transposable and sharded:
        raise ValueError(
            "`transposable=True` is not supported with FSDP2-sharded weights yet (a transposable tile spans "
            "rows that may sit on different ranks). Use DDP, or a non-transposable method."
        )


class Sparsifier:
    """Makes a model's target layers N:M sparse and runs the per-step rules in any training loop.

    Args:
        model: any `nn.Module`. Its target layers are swapped for `SparseLinear` now, before the
            optimizer is built (a `transformers` ``Conv1D`` gets a new, transposed Parameter).
            A model already holding `SparseLinear` layers (a second run, or `sparsify` by hand)
            is adopted as it is; their config must agree with ``config`` on every field that
            changes the math.
        config: a `SparsityConfig`; keyword arguments build one or override its fields.
        metrics_every: compute `metrics` (flip rate, zero fraction: one projection of every layer
            and a mask comparison) every this many optimizer steps, e.g. the logging interval.
            Steps in between only check the weights for NaN/inf, unless a rule needs the mask
            anyway (decays, ``flip_moments``). The Lightning and transformers adapters pass their
            logging interval.

    Raises:
        ValueError: no layer ends up sparse (``targets`` matches nothing, or ``m`` divides no
            target's input dim); the message lists the candidates and their dims. Or the model is
            already wrapped by DDP or sharded by ``fully_shard`` (build the Sparsifier first).

    Attributes:
        swapped: the qualified names of the sparse layers.
        step: optimizer steps taken (skipped steps do not count).
        max_steps: the run's length given to `attach` (None: not given).
        schedule: the run's `Schedule` (phase, ramps and decay factor per step).
        metrics_every: as the argument (the adapters set their logging interval).
    """

    def __init__(self, model: nn.Module, config: Optional[SparsityConfig] = None, *, metrics_every: int = 1,
                 **overrides: Any) -> None:
        self.metrics_every = _positive_int("metrics_every", metrics_every)
        if config is not None and not isinstance(config, SparsityConfig):
            raise TypeError(f"`config` must be a SparsityConfig or None, got {type(config).__name__}")
        config = SparsityConfig(**overrides) if config is None else (config.replace(**overrides) if overrides else config)
        self.config = config
        self.model = model
        existing = sparse_layers(model)
        if existing:
            check_adopted(existing, config)
            self.swapped = [n for n, _ in existing]
        else:
            refuse_wrapped(model)
            self.swapped = sparsify(model, config)
        self._layers: List[Tuple[str, SparseLinear]] = sparse_layers(model)
        for (name, layer), seed_name in zip(self._layers, seed_names([n for n, _ in self._layers])):
            layer.engine_attached = True
            if layer.name is None:
                layer.set_name(seed_name)  # a layer built by hand: its MVUE seed follows from its name
        self.step = 0
        self.max_steps: Optional[int] = None
        self.schedule = Schedule(config)
        self._reduce = ShardSum(self._layers)
        self._rules = GradientRules(config, self._reduce)
        self._metrics = StepMetrics(config, self._reduce)
        self._prune = PruneAt(config, self._layers)
        self._hooks = OptimizerHooks(self.before_step, self.after_step)
        needs = [text for _, text in engine_requirements(config)]
        self._unattached = warn_until_attached(self._layers[0][1], needs, lambda: self._hooks.optimizer is not None)
        self._started = self._restored = self._skip_step = False
        self._rank = 0
        self._saved_lr = None  # the lr `lr_rewarm` scaled for the current step

    # ------------------------------------------------------------------------------ views
    @property
    def layers(self) -> List[Tuple[str, SparseLinear]]:
        """``(name, SparseLinear)`` pairs of the sparse layers."""
        return list(self._layers)

    @property
    def sharded(self) -> bool:
        """True when the weights are FSDP2 shards (DTensors)."""
        return self._reduce.sharded

    @property
    def phase(self) -> str:
        """``"sparse"`` or ``"dense"`` (dense warm-up or fine-tuning, or ``method="dense"``). The layers
        hold it (it is what their forward computes); the engine sets all of them at once."""
        active = any(layer.sparse_active or layer.input_sparse_active for _, layer in self._layers)
        return "sparse" if active else "dense"

    @property
    def metrics(self) -> Dict[str, float]:
        """The last measured ``sparsity/flip_rate``, ``sparsity/zero_fraction``, ``sparsity/dense_phase``
        (0 or 1), ``sparsity/beta_mean`` (S-STE) and ``sparsity/threshold_ramp`` (with a ramp)."""
        return self._metrics.values

    @property
    def metrics_step(self) -> int:
        """The optimizer step `metrics` were measured at (-1: not yet)."""
        return self._metrics.step

    def phase_at(self, step: int) -> str:
        """The phase that optimizer step ``step`` (0-based: the number of steps already taken) trains in."""
        return self.schedule.phase_at(step)

    def dense_from_step(self) -> Optional[int]:
        """The optimizer step where dense fine-tuning starts (None: never)."""
        return self.schedule.dense_from_step()

    # ------------------------------------------------------------------------------ lifecycle
    def attach(self, optimizer: Any, max_steps: Optional[int] = None, *, step: Optional[int] = None) -> "Sparsifier":
        """Hook ``optimizer`` so the per-step rules run at every (non-skipped) ``optimizer.step()``.

        On a fresh run this is when sparsity switches on: S-STE's beta and transposable masks are
        taken from the weights as they are now (call it after DDP / FSDP2 wrapping and after any
        custom initialisation). After `load_state_dict` or `resume` the restored state is used.

        Args:
            optimizer: the optimizer that updates the sparse layers' weights (Lightning's and
                `accelerate`'s wrappers are unwrapped).
            max_steps: the run's length in optimizer steps; needed when a schedule is a fraction.
            step: the loop's count of optimizer steps taken, when the loop keeps one (a trainer
                resuming a run); it replaces the engine's.

        Raises:
            ValueError: the optimizer does not hold a sparse layer's weight (build it after the
                Sparsifier), a fractional schedule without ``max_steps``, or the engine is attached
                to another optimizer already (`detach` it first).
        """
        opt = unwrap_optimizer(optimizer)
        if self._hooks.optimizer is not None and self._hooks.optimizer is not opt:
            raise ValueError(
                f"This Sparsifier is already attached to another optimizer ({type(self._hooks.optimizer).__name__}); "
                f"call `sparsity.detach()` first (its rules run on one optimizer, the one holding the sparse weights)."
            )
        self.detach()
        _check_attach(self._layers, opt, self.config, self.sharded)
        if max_steps is not None:
            self.max_steps = _positive_int("max_steps", max_steps)
        if step is not None:
            self.step = _positive_int("step", step, minimum=0)
        self.schedule = Schedule(self.config, self.max_steps)
        self.schedule.validate()  # a fractional schedule without max_steps fails here, not mid-run
        self._rank = dist_rank()
        if not self._started:
            self._start()
        self._hooks.attach(opt)
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks (the optimizer is left exactly as it was found)."""
        self._hooks.detach()

    def resume(self, step: int) -> None:
        """Continue a run at optimizer step ``step`` whose engine state was not saved.

        Beta and transposable masks are kept as the model's state dict brought them back, instead
        of being taken afresh from the weights at `attach`. Prefer `load_state_dict`, which also
        checks that the config is the checkpoint's."""
        self.step = _positive_int("step", step, minimum=0)
        self._restored = True
        self._started = False

    def _start(self) -> None:
        """Switch sparsity on (or apply a restored state): phase, ramp, seeds, beta, masks."""
        phase = self.schedule.phase_at(self.step)
        self._set_step_state(phase)
        if phase == "sparse" and not self._restored:
            self._take_sparsity_state()
        self._metrics.snapshot(self._layers, phase == "sparse")
        self._prune.update_hooks(self.step, self.schedule.calibration_window())
        self._started = True

    def _set_step_state(self, phase: str) -> None:
        sparse = phase == "sparse"
        ramp = self.schedule.ramp_at(self.step) if sparse else 1.0
        keep = has_decay(self.config)  # the decay reads the forward's mask (no second projection)
        for _, layer in self._layers:
            layer.set_step_state(sparse=sparse, ramp=ramp, step=self.step, rank=self._rank, keep_mask=keep)

    @torch.no_grad()
    def _take_sparsity_state(self) -> None:
        """Beta (S-STE) and transposable masks from the weights as they are now."""
        betas = initial_betas(self._layers, self.config, self._reduce)
        for i, (_, layer) in enumerate(self._layers):
            layer.reset_sparsity_state(beta=None if betas is None else betas[i])

    # ------------------------------------------------------------------------------ the step
    @torch.no_grad()
    def before_step(self) -> None:
        """The rules on final, unscaled, clipped gradients, right before the parameter update.

        Called by the optimizer hook; call it by hand only in a loop that does not use one."""
        self._skip_step = self._rules.skip_nonfinite(self._layers, self.step + 1, self._hooks.optimizer)
        if self._skip_step or self.phase != "sparse":
            return
        self._saved_lr = scale_lr(self._hooks.optimizer, self.schedule.lr_factor_at(self.step))
        self._rules.apply_decays(self._layers, self.schedule.decay_scale_at(self.step), self._step_mask)

    def _step_mask(self, name: str, layer: SparseLinear) -> torch.Tensor:
        # The mask of the current weights, cheapest first: the one this step's forward computed, the
        # one the last `after_step` measured (nothing has changed the weights since), a projection.
        if self.config.transposable:
            return layer.mask
        mask = layer.forward_mask()
        if mask is None:
            mask = self._metrics.stored_mask(name, local_tensor(layer.weight).shape)
        return mask if mask is not None else layer.mask

    @torch.no_grad()
    def after_step(self) -> None:
        """The rules after the parameter update: step, schedule, masks, seeds, metrics."""
        restore_lr(self._hooks.optimizer, self._saved_lr)
        self._saved_lr = None
        if self._skip_step:
            self._skip_step = False
            return
        self.step += 1
        phase = self.schedule.phase_at(self.step)
        switched = phase != self.phase
        if switched and phase == "sparse" and self.schedule.prunes_at(self.step):
            self._prune.prune(self.step)
        if switched:
            log.info("Sparsifier: %s training from optimizer step %d", phase, self.step)
            if phase == "dense":  # the dense final phase continues from the sparse model
                keep_sparse_weights(self._layers)
        self._set_step_state(phase)
        if switched and phase == "sparse":
            self._take_sparsity_state()
        self._prune.update_hooks(self.step, self.schedule.calibration_window())
        cfg, sparse = self.config, phase == "sparse"
        refresh = cfg.transposable and sparse and self.step % cfg.mask_update_interval == 0
        report = self.step % self.metrics_every == 0
        # The mask of these weights is needed now for the metrics, or at the next step: by
        # `flip_moments`, or as the reference of the next reported flip rate.
        # (The decays read the forward's mask, but under FSDP2, whose forward sees the gathered weight.)
        needed = cfg.flip_moments is not None or (has_decay(cfg) and self.sharded)
        keep_mask = (needed or (self.step + 1) % self.metrics_every == 0) and not cfg.transposable
        if sparse and not report and not keep_mask:
            self._metrics.forget_masks()
            for _, layer in self._layers:
                if refresh:
                    layer.refresh_transposable_mask()
            self._metrics.check_weights(self._layers, self.step)
            return
        flipped = [layer.refresh_transposable_mask() if refresh else 0 for _, layer in self._layers]
        on_flips = None
        if cfg.flip_moments is not None:
            on_flips = lambda layer, changed: self._rules.reset_flipped_moments(self._hooks.optimizer, layer, changed)
        per_layer = self._metrics.measure(self._layers, self.step, sparse, flipped, on_flips)
        if report:
            extra = method_metrics(self._layers, cfg)
            if cfg.threshold_ramp is not None:
                extra["sparsity/threshold_ramp"] = self.schedule.ramp_at(self.step)
            self._metrics.record(per_layer, self.step, sparse, extra)

    # ------------------------------------------------------------------------------ checkpoint
    def config_fingerprint(self) -> Dict[str, Any]:
        """The config fields that change the math, as a resume compares them."""
        return fingerprint(self.config)

    def state_dict(self) -> Dict[str, Any]:
        """What a resume needs besides the model's own state dict (which holds weights, beta and
        transposable masks): the step, the run's length, the layers and the config fingerprint."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "phase": self.phase,  # for the reader: a resume takes the phase from the schedule
            "max_steps": self.max_steps,
            "swapped": list(self.swapped),
            "config": self.config_fingerprint(),
            "calibration": self._prune.state_dict(),
            "seeds": {name: layer.seed for name, layer in self._layers},  # MVUE streams, whatever the process
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a `state_dict`; `attach` then continues from it.

        Raises:
            ValueError: the checkpoint was trained with a different value of a field that
                changes the math, or with other layers sparse; the message names it.
        """
        check_resume(state, self.config, self.swapped)
        self.resume(int(state.get("step", self.step)))
        if state.get("max_steps") is not None and self.max_steps is None:
            self.max_steps = int(state["max_steps"])
        self._prune.load_state_dict(state.get("calibration"))
        seeds = state.get("seeds") or {}
        for name, layer in self._layers:
            if name in seeds:
                layer.seed = int(seeds[name])  # the run's own streams, even under another config seed

    def __repr__(self) -> str:
        c = self.config
        return (f"Sparsifier({c.method} {c.n}:{c.m}, {len(self.swapped)} layer(s), step={self.step}, "
                f"phase={self.phase}{', attached' if self._hooks.optimizer is not None else ''})")
