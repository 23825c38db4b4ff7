"""What a resume checks and restores: the config fields that change the math, and the layers.

The engine's state holds only what does not follow from the model's own state dict (weights,
beta, transposable masks) and the step: the step, the run's length, the sparse layers' names,
the config fingerprint and Wanda's calibration sums of a ``prune_at`` window still open.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from ..config import MATH_FIELDS, SparsityConfig, resume_value

__all__ = ["MATH_FIELDS", "STATE_FORMAT", "fingerprint", "check_adopted", "check_resume"]

# MATH_FIELDS (re-exported): the fields a resume must keep, as `sparsetrain.config` declares them.
STATE_FORMAT = 2


def _describe(value: Any) -> Any:
    """A config value as it is compared across a resume (a callable by its qualified name)."""
    if callable(value):
        return f"<callable {getattr(value, '__qualname__', type(value).__name__)}>"
    return value


def fingerprint(config: SparsityConfig) -> Dict[str, Any]:
    """The config fields that change the math, as a resume compares them."""
    return {f: _describe(getattr(config, f)) for f in MATH_FIELDS}


def check_adopted(layers: Sequence[Tuple[str, Any]], config: SparsityConfig) -> None:
    """A model's existing sparse layers must agree with ``config`` on every field of the math."""
    for name, layer in layers:
        diff = [f for f in MATH_FIELDS if f != "targets" and _describe(getattr(layer.config, f)) != _describe(getattr(config, f))]
        if diff:
            f = diff[0]
            raise ValueError(
                f"The model's sparse layer `{name}` was built with {f}={getattr(layer.config, f)!r}, but this "
                f"Sparsifier has {f}={getattr(config, f)!r}; use the same config, or start from a dense model."
            )


def check_resume(state: Dict[str, Any], config: SparsityConfig, swapped: List[str]) -> None:
    """Raise if ``state`` was trained with another value of a math field, or other sparse layers."""
    if not isinstance(state, dict):
        raise TypeError(f"`state` must be a dict from Sparsifier.state_dict(), got {type(state).__name__}")
    mine = fingerprint(config)
    for field, value in (state.get("config") or {}).items():
        # (a state read back from JSON holds lists where the config holds tuples)
        if field in mine and resume_value(value) != resume_value(mine[field]) and not (field == "targets" and str(value).startswith("<callable")):
            raise ValueError(
                f"Cannot resume: the checkpoint was trained with sparsity.{field}={value!r}, this run has "
                f"sparsity.{field}={mine[field]!r}. Resume with the checkpoint's value, or start a new run."
            )
    saved = state.get("swapped")
    if saved is not None and list(saved) != list(swapped):
        raise ValueError(
            f"Cannot resume: the checkpoint's sparse layers ({len(saved)}: {', '.join(saved[:3])}...) differ from "
            f"this model's ({len(swapped)}: {', '.join(swapped[:3])}...). Use the checkpoint's `targets`."
        )
