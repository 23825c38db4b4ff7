"""`SparseTraining`: the Lightning adapter of `sparsetrain.Sparsifier`."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from ..config import SparsityConfig
from ..engine import Sparsifier

__all__ = ["SparseTraining"]


class SparseTraining(Callback):
    """Train the target layers of a LightningModule N:M sparse (a thin adapter of `Sparsifier`).

    - ``setup``: builds the `Sparsifier`, which swaps the target layers for `SparseLinear`
      (before a checkpoint is restored, so a resumed run gets its weights, beta and masks back).
    - ``on_train_start`` (after every strategy has restored the checkpoint): attaches the engine
      to the optimizers. On a fresh run sparsity switches on here: beta and transposable masks
      come from the weights at this moment (after DDP made the ranks' weights equal).
    - every optimizer step the engine applies decays, schedules and mask refreshes (see
      `Sparsifier`); this callback logs its `metrics`: ``sparsity/flip_rate`` (in the progress
      bar), ``sparsity/zero_fraction``, ``sparsity/beta_mean`` (S-STE), ``sparsity/dense_phase``,
      computed every ``trainer.log_every_n_steps`` optimizer steps.

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
        self.engine: Optional[Sparsifier] = None
        self._pending_state: Optional[Dict[str, Any]] = None
        self._logged_step = -1

    @property
    def swapped(self) -> List[str]:
        """Qualified names of the sparse layers (empty before ``setup``)."""
        return list(self.engine.swapped) if self.engine is not None else []

    @property
    def dense_phase(self) -> bool:
        """True once training has switched to dense fine-tuning."""
        return self.engine is not None and self.engine.phase == "dense" and self.config.trains_sparse

    # ------------------------------------------------------------------------------ lifecycle
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self.engine is not None and self.engine.model is pl_module:
            return
        # Metrics cost a projection of every layer: computed at the trainer's logging steps only.
        self.engine = Sparsifier(pl_module, self.config, metrics_every=max(1, int(trainer.log_every_n_steps or 1)))
        if self._pending_state is not None:
            self.engine.load_state_dict(self._pending_state)
            self._pending_state = None
        rank_zero_info(_swap_line(self.config, len(self.engine.swapped)))

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        engine = self.engine
        max_steps = trainer.max_steps
        if max_steps is None or max_steps < 0:
            max_steps = int(trainer.estimated_stepping_batches)
        optimizers = [opt for opt in trainer.optimizers if _holds_any(opt, engine)]
        if len(optimizers) != 1:
            raise ValueError(
                f"SparseTraining needs exactly one optimizer holding the sparse layers' weights, found {len(optimizers)}."
            )
        # The trainer's step count is the truth (a checkpoint may hold no callback state).
        engine.attach(optimizers[0], max_steps=max(1, max_steps), step=trainer.global_step)
        self._logged_step = engine.metrics_step

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.engine is not None:
            self.engine.detach()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.engine is not None:
            self.engine.detach()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        engine = self.engine
        if engine is not None and engine.metrics_step != self._logged_step and engine.metrics:
            self._logged_step = engine.metrics_step
            for key, value in engine.metrics.items():
                pl_module.log(key, value, on_step=True, on_epoch=False, prog_bar=key == "sparsity/flip_rate",
                              rank_zero_only=True)

    # ------------------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        # The config rebuilds the sparse layers when the checkpoint is exported or loaded outside
        # the run that wrote it (`sparsetrain.hub`, the CLI's resume check).
        checkpoint["sparsity_config"] = dataclasses.asdict(self.config)

    def state_dict(self) -> Dict[str, Any]:
        return self.engine.state_dict() if self.engine is not None else {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.engine is None:
            self._pending_state = dict(state_dict)
        else:
            self.engine.load_state_dict(state_dict)


def _swap_line(config: SparsityConfig, layers: int) -> str:
    """What setup prints: ``8 layer(s) -> s-ste 2:4``; the dense baseline says that nothing is sparse."""
    if not config.trains_sparse:
        return (f"SparseTraining: {config.describe()}: the {layers} target layer(s) stay dense "
                f"(a baseline through the same code path)")
    return f"SparseTraining: {layers} layer(s) -> {config.describe()}"


def _holds_any(optimizer, engine: Sparsifier) -> bool:
    inner = getattr(optimizer, "_optimizer", optimizer)
    held = {id(p) for group in inner.param_groups for p in group["params"]}
    return any(id(layer.weight) in held for _, layer in engine.layers)
