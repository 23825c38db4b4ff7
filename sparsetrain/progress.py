"""The progress bar of `sparsetrain fit`: short metric names, ``lr`` in scientific notation, no ``v_num``.

Lightning's bar shows every ``prog_bar`` metric under its logged name with three decimals, so a
learning rate of 2e-4 reads ``lr: 0.000`` and ``sparsity/flip_rate`` pushes the line past 160
columns. Here the bar shows::

    Epoch 0 (max 500 steps) ━━━━━━━━━ 250/500 0:00:18 • 0:00:18 13.6it/s loss: 2.871 val: 2.902 lr: 1.41e-03 flip: 0.0012

The logged (CSV) names stay the full ones.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

__all__ = ["BAR_NAMES", "bar_metrics", "default_progress_bar"]

# Logged name -> name in the bar. Anything else keeps its name.
BAR_NAMES = {
    "train/loss": "loss",
    "val/loss": "val",
    "lr": "lr",
    "sparsity/flip_rate": "flip",
    "sparsity/zero_fraction": "zeros",
    "sparsity/beta_mean": "beta",
}


def bar_metrics(items: Dict[str, Any]) -> Dict[str, Any]:
    """The metrics as the bar shows them: short names, no ``v_num``, small values in scientific notation.

    Example:
        >>> bar_metrics({"v_num": 0, "train/loss": 2.5, "lr": 0.0002})
        {'loss': 2.5, 'lr': '2.00e-04'}
    """
    out: Dict[str, Any] = {}
    for key, value in items.items():
        if key == "v_num":
            continue
        if hasattr(value, "item"):
            value = value.item()
        short = BAR_NAMES.get(key, key)
        if isinstance(value, float) and (key == "lr" or (value != 0 and abs(value) < 1e-2)):
            value = f"{value:.2e}"  # three decimals would print 0.000
        out[short] = value
    return out


def default_progress_bar(trainer_config: dict, extra: list) -> Optional[Any]:
    """The bar `sparsetrain fit` adds, or None where the user chose one or turned it off.

    Also tells a run bounded by ``max_steps`` that it has no last epoch: Lightning's rich bar labels
    training ``Epoch {e}/{max_epochs - 1}``, which reads "Epoch 0/-2" for the recipes' endless text
    stream (``max_epochs=-1``).
    """
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    given = list(extra) + list(trainer_config.get("callbacks") or [])
    if not trainer_config.get("enable_progress_bar", True):
        return None
    if any(isinstance(c, ProgressBar) for c in given):
        return None

    class CountSteps:
        """On an endless stream bounded by ``max_steps``, count optimizer steps out of ``max_steps``.

        Lightning counts the batches of the epoch (restored on resume) against the steps left, so a
        run resumed at step 500 of 550 reads "550/49". Here the count is the global step and the
        total ``max_steps``, the same before and after a resume (and with gradient accumulation).
        """

        def _counts_steps(self) -> bool:
            t = self.trainer
            return bool(t.max_steps and t.max_steps > 0 and t.num_training_batches == float("inf"))

        @property
        def total_train_batches(self):
            return self.trainer.max_steps if self._counts_steps() else super().total_train_batches

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            # The bars show ``batch_idx + 1`` as done: hand them the step count instead.
            counts = self._counts_steps()
            tqdm_bar = self.train_progress_bar if isinstance(self, TQDMProgressBar) else None
            if counts and tqdm_bar is not None and tqdm_bar.total != trainer.max_steps:
                # A run resumed mid-epoch skips `on_train_epoch_start`, where tqdm gets its total.
                tqdm_bar.total = trainer.max_steps
            super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1 if counts else batch_idx)

    if not _RICH_AVAILABLE:
        class ShortTQDMProgressBar(CountSteps, TQDMProgressBar):
            def get_metrics(self, trainer, pl_module):
                return bar_metrics(super().get_metrics(trainer, pl_module))

        return ShortTQDMProgressBar()

    class StepsRichProgressBar(CountSteps, RichProgressBar):
        def get_metrics(self, trainer, pl_module):
            return bar_metrics(super().get_metrics(trainer, pl_module))

        def _get_train_description(self, current_epoch: int) -> str:
            max_epochs = self.trainer.max_epochs
            if max_epochs is not None and max_epochs >= 0:
                return super()._get_train_description(current_epoch)
            steps = self.trainer.max_steps
            desc = f"Epoch {current_epoch}" + (f" (max {steps} steps)" if steps and steps > 0 else "")
            return f"{desc:{len(self.validation_description)}}"

    # leave=True keeps the finished bar on screen once; the validation bar disappears when done.
    return StepsRichProgressBar()
