"""`SparseTraining`: the Lightning callback that trains a model N:M sparse."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from ..config import SparsityConfig
from ..nn.convert import sparse_layers, sparsify

__all__ = ["SparseTraining"]


class SparseTraining(Callback):
    """Train the target layers of a LightningModule N:M sparse.

    - ``setup``: swaps the target layers for `SparseLinear` (before a checkpoint is restored, so a
      resumed run gets its weights, beta and masks back into the swapped model).
    - ``on_fit_start``: on a fresh run, takes S-STE's beta and the masks from the weights as they are.
    - every optimizer step: adds ``masked_decay * (1 - mask) * W`` to the gradients after clipping
      (if set), refreshes masks (transposable ones every ``mask_update_interval`` steps), switches
      to dense training at ``dense_finetune_from``, and logs ``sparsity/flip_rate`` (fraction of
      mask entries changed by the step), ``sparsity/beta_mean`` (S-STE) and
      ``sparsity/zero_fraction`` (weights exactly zero in W~ over all targets).

    Args:
        config: a `SparsityConfig`. Keyword arguments build one, or override its fields.

    Example:
        >>> trainer = L.Trainer(callbacks=[SparseTraining(method="s-ste", mvue="exact")])
    """

    def __init__(self, config: Optional[SparsityConfig] = None, **kwargs: Any) -> None:
        if config is not None and not isinstance(config, SparsityConfig):
            raise TypeError(f"`config` must be a SparsityConfig or None, got {type(config).__name__}")
        if config is None:
            config = SparsityConfig(**kwargs)
        elif kwargs:
            config = config.replace(**kwargs)
        self.config = config
        self.swapped: List[str] = []
        self.dense_phase = False
        self._restored = False
        self._pending_generators: Dict[str, torch.Tensor] = {}
        self._hooks: list = []
        self._module_ref: Optional[torch.nn.Module] = None
        self._last: Dict[str, float] = {}

    # ------------------------------------------------------------------------------ lifecycle
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._module_ref = pl_module  # `state_dict` reads the layers' generator states from it
        existing = sparse_layers(pl_module)
        if existing:  # already swapped (a second fit, or the user called sparsify by hand)
            self.swapped = [n for n, _ in existing]
            return
        self.swapped = sparsify(pl_module, self.config)
        rank_zero_info(f"SparseTraining: {len(self.swapped)} layer(s) -> {self.config.method} {self.config.n}:{self.config.m}")

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._restored:
            # Sparsity switches on now: beta and the masks come from the weights at this moment
            # (after DDP has made the ranks' weights equal).
            for _, layer in sparse_layers(pl_module):
                layer.reset_sparsity_state()
        for name, layer in sparse_layers(pl_module):
            state = self._pending_generators.pop(name, None)
            if state is not None:
                layer.generator(layer.weight.device).set_state(state)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Runs after the training state (global_step, optimizers) is restored.
        self._remove_hooks()
        self._set_dense_phase(pl_module, self._dense_from_step(trainer) is not None
                              and trainer.global_step >= self._dense_from_step(trainer))
        for opt in trainer.optimizers:
            if self.config.masked_decay:
                self._hooks.append(_DecayAfterClipping(opt, lambda: self._before_step(pl_module)))
            self._hooks.append(opt.register_step_post_hook(lambda *_: self._after_step(trainer, pl_module)))

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_hooks()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------------------ schedule
    def _dense_from_step(self, trainer: "pl.Trainer") -> Optional[int]:
        d = self.config.dense_finetune_from
        if d is None:
            return None
        if isinstance(d, int):
            return d
        total = trainer.max_steps
        if total is None or total < 0:
            total = int(trainer.estimated_stepping_batches)
        return int(round(d * total))

    def _set_dense_phase(self, pl_module: "pl.LightningModule", dense: bool) -> None:
        self.dense_phase = dense
        for _, layer in sparse_layers(pl_module):
            layer.sparse_active = self.config.sparse and not dense

    # ------------------------------------------------------------------------------ per step
    @torch.no_grad()
    def _before_step(self, pl_module: "pl.LightningModule") -> None:
        alpha = self.config.masked_decay
        if not alpha or self.dense_phase:
            return
        for _, layer in sparse_layers(pl_module):
            g = layer.weight.grad
            if g is not None:
                # After clipping (this runs inside optimizer.step): decay the pruned weights.
                g.add_(layer.weight.masked_fill(layer.mask, 0).to(g.dtype), alpha=alpha)

    @torch.no_grad()
    def _after_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        step = trainer.global_step + 1  # global_step is incremented after the optimizer step returns
        dense_from = self._dense_from_step(trainer)
        if dense_from is not None and not self.dense_phase and step >= dense_from:
            self._set_dense_phase(pl_module, True)
            rank_zero_info(f"SparseTraining: dense fine-tuning from step {step}")
        layers = [layer for _, layer in sparse_layers(pl_module)]
        if not layers or self.dense_phase:
            return
        flips = total = zeros = 0
        betas = []
        refresh = self.config.transposable and step % self.config.mask_update_interval == 0
        for layer in layers:
            layer_flips, layer_zeros = layer.update_mask(refresh_transposable=refresh)
            flips += layer_flips
            zeros += layer_zeros
            total += layer.weight.numel()
            if layer.config.method == "s-ste":
                betas.append(float(layer.beta))
        self._last = {
            "sparsity/flip_rate": flips / total if total else 0.0,
            "sparsity/zero_fraction": zeros / total if total else 0.0,
        }
        if betas:
            self._last["sparsity/beta_mean"] = sum(betas) / len(betas)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._last:
            for key, value in self._last.items():
                pl_module.log(key, value, on_step=True, on_epoch=False, prog_bar=key == "sparsity/flip_rate",
                              rank_zero_only=True)
            self._last = {}

    @property
    def last_metrics(self) -> Dict[str, float]:
        """The metrics of the last optimizer step (before they are handed to the logger)."""
        return dict(self._last)

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        gens = {}
        module = getattr(self, "_module_ref", None)
        if module is not None:
            for name, layer in sparse_layers(module):
                for gen in layer._generators.values():
                    gens[name] = gen.get_state()
        return {"swapped": list(self.swapped), "dense_phase": self.dense_phase, "generators": gens,
                "method": self.config.method, "n": self.config.n, "m": self.config.m}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        for key in ("method", "n", "m"):
            mine = getattr(self.config, key)
            if key in state_dict and state_dict[key] != mine:
                raise ValueError(
                    f"The checkpoint was trained with {key}={state_dict[key]!r} but this SparseTraining "
                    f"has {key}={mine!r}; resume with the same sparsity config."
                )
        self._restored = True
        self.dense_phase = bool(state_dict.get("dense_phase", False))
        self._pending_generators = dict(state_dict.get("generators", {}))


class _DecayAfterClipping:
    """Runs ``fn`` between gradient clipping and the parameter update of ``optimizer.step``.

    Lightning calls ``optimizer.step(closure)`` and the closure does backward *and* clipping, so
    an optimizer step pre-hook would run before the gradients exist. Wrapping the closure puts
    ``fn`` right after it; with no closure (AMP's scaler, manual optimization) the gradients are
    final already and ``fn`` runs first. ``remove()`` restores the optimizer's own ``step``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, fn) -> None:
        self.optimizer = optimizer
        original = optimizer.step

        def step(closure=None, **kwargs):
            if closure is None:
                fn()
                return original(**kwargs)

            def closure_then_decay():
                loss = closure()
                fn()
                return loss

            return original(closure_then_decay, **kwargs)

        optimizer.step = step

    def remove(self) -> None:
        self.optimizer.__dict__.pop("step", None)
