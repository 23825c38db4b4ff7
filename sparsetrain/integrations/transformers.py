"""`SparseTrainerCallback`: the `transformers.Trainer` adapter of `sparsetrain.Sparsifier`.

The Trainer builds its optimizer inside ``train()``, so the model is made sparse first (that swap
replaces GPT-2's ``Conv1D`` weights, and an optimizer built before it would miss them)::

    sparsity = st.Sparsifier(model, st.SparsityConfig(method="sr-ste"))
    trainer = transformers.Trainer(model, args, train_dataset=ds, callbacks=[st.SparseTrainerCallback(sparsity)])
    trainer.train()                                   # or train(resume_from_checkpoint=True)

The engine hooks the Trainer's optimizer (under the `accelerate` wrapper), so its rules run after
the Trainer's clipping and only for steps the fp16 scaler does not skip. Its state is saved in every
``checkpoint-N`` folder, in ``trainer_state.json`` (``stateful_callbacks["sparsetrain"]``, which the
Trainer reads back from whichever checkpoint it resumes, in any ``output_dir``) and as
``sparsity.pt`` (the same state, for `SparseTrainerCallback.load_state_dict` by hand); `metrics` are
added to the Trainer's logs. The checkpoint's model file has the model's own layout, so
``AutoModelForCausalLM.from_pretrained("checkpoint-N")`` loads the dense weights W: swapped
``Conv1D`` weights are stored as ``[in, out]``, and the layers' ``beta`` / transposable masks live
in the callback's state instead.
"""

from __future__ import annotations

import base64
import os
import warnings
import weakref
from typing import Any, Dict, Optional

import torch
from transformers import TrainerCallback

from ..engine import Sparsifier

__all__ = ["SparseTrainerCallback", "STATE_FILE"]

STATE_FILE = "sparsity.pt"
STATE_KEY = "sparsetrain"  # the engine's state in trainer_state.json's `stateful_callbacks`


_EXTRAS = ("beta", "mask_packed")  # the layers' sparsity state, kept out of the checkpoint's model file


def _to_json(state: Dict[str, Any]) -> Dict[str, Any]:
    """The callback's state with its tensors as JSON values, for trainer_state.json: Wanda's sums as
    lists, beta as a float, a transposable mask's bytes in base64."""
    layers = {name: {"beta": float(extra["beta"]),
                     "mask_packed": base64.b64encode(extra["mask_packed"].cpu().numpy().tobytes()).decode()
                     if "mask_packed" in extra else None}
              for name, extra in state["layers"].items()}
    return {**state, "calibration": {k: v.tolist() for k, v in state.get("calibration", {}).items()}, "layers": layers}


def _from_json(data: Dict[str, Any]) -> Dict[str, Any]:
    layers = {}
    for name, extra in (data.get("layers") or {}).items():
        layers[name] = {"beta": torch.tensor(extra["beta"], dtype=torch.float32)}
        if extra.get("mask_packed") is not None:
            layers[name]["mask_packed"] = torch.frombuffer(bytearray(base64.b64decode(extra["mask_packed"])), dtype=torch.uint8)
    calibration = {k: torch.tensor(v, dtype=torch.float32) for k, v in (data.get("calibration") or {}).items()}
    return {**data, "calibration": calibration, "layers": layers}


_IN_TRANSFORMERS_LAYOUT: "weakref.WeakSet" = weakref.WeakSet()


def _install_transformers_layout(sparsifier: Sparsifier) -> None:
    """Make the model's state dict the one `from_pretrained` reads: a swapped ``Conv1D``'s weight
    back in its ``[in, out]`` layout, no ``beta`` / ``mask_packed`` (the callback's state carries
    them). A state dict without a layer's ``beta`` (one saved this way) is read back the same way."""
    if sparsifier.model in _IN_TRANSFORMERS_LAYOUT:
        return  # a second callback on the same model: the hooks are there already
    _IN_TRANSFORMERS_LAYOUT.add(sparsifier.model)
    layers = dict(sparsifier.layers)
    conv1d = [name for name, layer in layers.items() if layer.source == "conv1d"]

    def save(module, state_dict, prefix, local_metadata) -> None:
        for name in layers:
            for extra in _EXTRAS:
                state_dict.pop(f"{prefix}{name}.{extra}", None)
        for name in conv1d:
            key = f"{prefix}{name}.weight"
            if key in state_dict:
                state_dict[key] = state_dict[key].t().contiguous()

    def load(module, state_dict, prefix, *args) -> None:
        for name in conv1d:
            key = f"{prefix}{name}.weight"
            if key in state_dict and f"{prefix}{name}.beta" not in state_dict:
                state_dict[key] = state_dict[key].t().contiguous()

    sparsifier.model.register_state_dict_post_hook(save)
    sparsifier.model.register_load_state_dict_pre_hook(load)


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
        _install_transformers_layout(sparsifier)
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
            # The state of the checkpoint being resumed: the Trainer loaded its trainer_state.json.
            saved = (state.stateful_callbacks or {}).get(STATE_KEY)
            if saved is not None:
                self.load_state_dict(_from_json(saved))
            else:
                warnings.warn(
                    f"Resuming at step {state.global_step} from a checkpoint without the sparsity state: the sparsity "
                    f"engine continues from the trainer's step. Call `sparsifier.load_state_dict(torch.load("
                    f"<checkpoint>/{STATE_FILE}))` before `train()` to check the config too.",
                    stacklevel=2,
                )
                engine.resume(state.global_step)  # beta and masks came back with the model's weights: keep them
        if args.logging_steps and args.logging_steps >= 1 and float(args.logging_steps).is_integer():
            engine.metrics_every = int(args.logging_steps)  # metrics cost a projection: at logging steps only
        engine.attach(self._optimizer, max_steps=self._max_steps, step=state.global_step)

    def state_dict(self) -> Dict[str, Any]:
        """The engine's state plus each layer's ``beta`` / ``mask_packed`` (not in the model file)."""
        layers = {name: {k: v for k, v in layer.state_dict().items() if k in _EXTRAS} for name, layer in self.sparsifier.layers}
        return {**self.sparsifier.state_dict(), "layers": layers}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a `state_dict` (also a `Sparsifier.state_dict`, whose layers' extras came with the model)."""
        self.sparsifier.load_state_dict(state)
        for name, layer in self.sparsifier.layers:
            if name in state.get("layers", {}):
                layer.load_state_dict(state["layers"][name], strict=False)

    def on_step_end(self, args, state, control, **kwargs):
        # Before the Trainer writes trainer_state.json (it decides to save in its own on_step_end,
        # which runs before this one).
        if control.should_save:
            state.stateful_callbacks[STATE_KEY] = _to_json(self.state_dict())

    def on_epoch_end(self, args, state, control, **kwargs):
        self.on_step_end(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder) and state.is_world_process_zero:
            torch.save(self.state_dict(), os.path.join(folder, STATE_FILE))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.sparsifier.metrics and "loss" in logs:
            logs.update(self.sparsifier.metrics)

    def on_train_end(self, args, state, control, **kwargs):
        self.sparsifier.detach()
