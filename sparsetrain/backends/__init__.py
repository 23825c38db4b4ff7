"""How a sparse layer's matmuls run. The layer computes its effective weight W~ and hands the
product to a backend:

- ``dense``: masked dense GEMMs (`dense.linear`), everywhere.
- ``cusparselt``: 2:4 semi-structured GEMMs through ``torch._cslt_*`` on Ampere/Hopper GPUs.

Every backend exposes ``linear(x, w_eff, bias, *, mvue, generator, fp8, cache) -> y`` where
``generator`` is a `torch.Generator` or the layer's MVUE draw ``(seed, offset)`` (an int64 CPU
tensor, which torch.compile can trace where it cannot trace a generator), and
``cache`` is a per-layer dict it may use (e.g. the compressed weight, keyed by the weight's version,
so the weight is compressed once per optimizer step and not per micro-batch).
"""

from __future__ import annotations

import warnings

from ..config import BACKENDS as BACKEND_CHOICES, _fmt_choices
from . import cusparselt, dense  # both light: torch and ops only

__all__ = ["dense", "get_backend", "select_backend", "BACKEND_CHOICES"]

_WARNED: set = set()


def get_backend(name: str):
    """The backend module named ``name`` (``"dense"`` or ``"cusparselt"``)."""
    if name == "dense":
        return dense
    if name == "cusparselt":
        return cusparselt
    raise ValueError(f"Unknown backend {name!r}; valid choices: 'dense', 'cusparselt'")


def select_backend(config_backend: str, weight, dtype=None, *, warn: bool = True):
    """Resolve a config's ``backend`` for one weight: ``(name, reason)``.

    ``"dense"`` is always honoured. ``"cusparselt"`` is honoured when `cusparselt.can_use` agrees
    and is a `ValueError` saying why otherwise. ``"auto"`` picks cuSPARSELt where it can run and
    falls back to ``"dense"``, with one warning per distinct reason (not one per layer or step).

    Args:
        config_backend: ``"auto"``, ``"dense"`` or ``"cusparselt"``.
        weight: the layer's weight (device and shape are checked).
        dtype: the GEMM dtype (default ``weight.dtype``; pass the autocast dtype under autocast).
        warn: emit the fall-back warning for ``"auto"``.

    Returns:
        ``(name, reason)``: ``reason`` is empty when ``name`` is what was asked for.

    Example:
        >>> select_backend("auto", torch.zeros(64, 64), warn=False)[0]
        'dense'
    """
    if config_backend not in BACKEND_CHOICES:
        raise ValueError(
            f"Unknown `backend`={config_backend!r}; valid choices: {_fmt_choices(BACKEND_CHOICES)}"
        )
    if config_backend == "dense":
        return "dense", ""
    ok, reason = cusparselt.can_use(weight, dtype=dtype)
    if ok:
        return "cusparselt", ""
    if config_backend == "cusparselt":
        raise ValueError(f"`backend`='cusparselt' cannot run here: {reason}. Use backend='auto' or 'dense'.")
    if warn and reason not in _WARNED and not _expected_on_this_machine(reason):
        _WARNED.add(reason)
        warnings.warn(f"backend='auto': using the dense backend because {reason}", stacklevel=2)
    return "dense", reason


def _expected_on_this_machine(reason: str) -> bool:
    """True when no GPU here could have run cuSPARSELt: ``"auto"`` falling back is then silent.

    On a machine without a CUDA device dense is the only way, and a warning would only be noise; a
    GPU that cannot take a layer (its shape, dtype or architecture, a torch build without
    cuSPARSELt, a weight left on the CPU) is worth a warning.
    """
    import torch

    machine_level = "has no cuSPARSELt" in reason or "cuSPARSELt needs a CUDA device" in reason
    return machine_level and not torch.cuda.is_available()
