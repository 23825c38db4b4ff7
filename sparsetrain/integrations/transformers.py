"""`SparseTrainerCallback`: the `transformers.Trainer` adapter of `sparsetrain.Sparsifier`.

The Trainer builds its optimizer inside ``train()``, so the model is made sparse first (that swap
replaces GPT-2's ``Conv1D`` weights, and an optimizer built before it would miss them)::

    sparsity = st.Sparsifier(model, st.SparsityConfig(method="sr-ste"))
    trainer = transformers.Trainer(model, args, train_dataset=ds, callbacks=[st.SparseTrainerCallback(sparsity)])
    trainer.train()                                   # or train(resume_from_checkpoint=True)

The engine hooks the Trainer's optimizer (under the `accelerate` wrapper), so its rules run after
the Trainer's clipping and only for steps the fp16 scaler does not skip. Its state is saved as
``sparsity.pt`` in every ``checkpoint-N`` folder and read back when training resumes from one;
`metrics` are added to the Trainer's logs.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from ..engine import Sparsifier

__all__ = ["SparseTrainerCallback", "STATE_FILE"]

STATE_FILE = "sparsity.pt"


class SparseTrainerCallback(TrainerCallback):
    """Runs a `Sparsifier` inside `transformers.Trainer`.

    Args:
        sparsifier: the engine, built on the model before the Trainer (see the module docs).
    """

    def __init__(self, sparsifier: Sparsifier) -> None:
        if not isinstance(sparsifier, Sparsifier):
            raise TypeError(
                f"`sparsifier` must be a sparsetrain.Sparsifier built on the model before the Trainer, "
                f"got {type(sparsifier).__name__}"
            )
        self.sparsifier = sparsifier
        self._optimizer: Any = None
        self._max_steps: Optional[int] = None
        self._begun = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # The Trainer restores its state (global_step) only after this event: attach at the first step.
        if optimizer is None:
            raise ValueError("SparseTrainerCallback: the Trainer passed no optimizer to `on_train_begin`")
        self._optimizer = optimizer
        self._max_steps = state.max_steps if state.max_steps and state.max_steps > 0 else None
        self._begun = False

    def on_step_begin(self, args, state, control, **kwargs):
        if self._begun:
            return
        self._begun = True
        engine = self.sparsifier
        if state.global_step > 0 and engine.step != state.global_step:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if os.path.exists(path):
                engine.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            else:
                warnings.warn(
                    f"Resuming at step {state.global_step} without {path}: the sparsity engine continues from the "
                    f"trainer's step. Call `sparsifier.load_state_dict(torch.load(<checkpoint>/{STATE_FILE}))` "
                    f"before `train()` to check the config too.",
                    stacklevel=2,
                )
                engine.resume(state.global_step)  # beta and masks came back with the model's weights: keep them
        if args.logging_steps and args.logging_steps >= 1 and float(args.logging_steps).is_integer():
            engine.metrics_every = int(args.logging_steps)  # metrics cost a projection: at logging steps only
        engine.attach(self._optimizer, max_steps=self._max_steps, step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder) and state.is_world_process_zero:
            torch.save(self.sparsifier.state_dict(), os.path.join(folder, STATE_FILE))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.sparsifier.metrics and "loss" in logs:
            logs.update(self.sparsifier.metrics)

    def on_train_end(self, args, state, control, **kwargs):
        self.sparsifier.detach()
