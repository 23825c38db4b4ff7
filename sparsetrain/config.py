"""`SparsityConfig`: one frozen dataclass that says how a model is made N:M sparse."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

METHODS = ("dense", "ste", "sr-ste", "s-ste")
# The one definition of each set of choices: `ops.mvue.MVUE_CHOICES` and
# `backends.BACKEND_CHOICES` are these (config imports nothing from the package, so both can).
MVUE_METHODS = (None, "exact", "approx")
BACKENDS = ("auto", "dense", "cusparselt")
NONFINITE_ACTIONS = ("raise", "skip")

# A target filter receives the module and its qualified name, like torchao's `module_filter_fn`.
TargetFilter = Callable[["object", str], bool]


def _fmt_choices(choices) -> str:
    return ", ".join(repr(c) for c in choices)


def check_nm(n: int, m: int) -> None:
    """Raise a `ValueError` unless ``0 < n < m`` are integers."""
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__})")
    if m < 2:
        raise ValueError(f"`m` must be at least 2, got m={m}")
    if not 0 < n < m:
        raise ValueError(f"`n` must satisfy 0 < n < m, got n={n}, m={m}")


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """How to make the target layers of a model N:M sparse during training.

    Args:
        method: ``"dense"`` (no sparsity; a baseline with the same code path), ``"ste"`` (hard
            projection, straight-through gradient), ``"sr-ste"`` (hard projection plus the
            sparse-refined decay ``srste_decay * (1 - mask) * W`` on the gradient), or ``"s-ste"``
            (soft threshold with a frozen per-tensor scale; the default, as in Hu et al. 2024).
        n, m: keep ``n`` of every ``m`` consecutive weights along the input dimension.
        targets: which layers to swap: ``"mlp"`` (feed-forward layers only, as the papers do),
            ``"all"`` (every Linear/Conv1D except the LM head), a regular expression matched
            with ``re.search`` against qualified module names, or a callable ``(module, name) -> bool``.
        srste_decay: lambda_W of SR-STE (Zhou et al. 2021 use 2e-4).
        masked_decay: if set, ``masked_decay * (1 - mask) * W`` is added to the gradient after
            clipping, right before the optimizer step (the T-SR-STE recipe uses 6e-5 or 2e-4).
        mvue: ``None`` (exact weight gradient), ``"exact"`` (minimum-variance unbiased 2:4 of
            dY^T) or ``"approx"`` (the cheaper sampling estimator of the 2by4 toolkit).
        fp8: simulate (CPU) or run (sm89+) per-tensor scaled FP8 matmuls.
        backend: ``"auto"`` (cuSPARSELt where it can run, else dense), ``"dense"``, ``"cusparselt"``.
        dense_finetune_from: switch to dense training at this optimizer step (int) or at this
            fraction of ``max_steps`` (float in (0, 1)); ``None`` never switches.
        seed: seeds the MVUE sampling generators; ``None`` draws one from torch's global RNG.
        transposable: use masks that are N:M along rows and columns of every m x m tile (STE /
            SR-STE), so that W~^T is N:M too and the input-gradient GEMM can be sparse.
        mask_update_interval: with ``transposable``, recompute the mask every this many optimizer steps.
        transposable_method: the solver used for transposable masks (see `ops.transposable_mask`).
        on_nonfinite: what the engine does when a target layer's gradient (before the optimizer
            step) or weight (after it) holds NaN/inf: ``"raise"`` a `FloatingPointError` naming
            the layer and the step, or ``"skip"`` the step (no parameter, mask or schedule moves)
            with a warning. Under fp16 `GradScaler` an overflow is skipped by the scaler before
            the engine sees it.
    """

    method: str = "s-ste"
    n: int = 2
    m: int = 4
    targets: Union[str, TargetFilter] = "mlp"
    srste_decay: float = 2e-4
    masked_decay: Optional[float] = None
    mvue: Optional[str] = None
    fp8: bool = False
    backend: str = "auto"
    dense_finetune_from: Optional[Union[int, float]] = None
    seed: Optional[int] = None
    transposable: bool = False
    mask_update_interval: int = 40
    transposable_method: str = "auto"
    on_nonfinite: str = "raise"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown `method`={self.method!r}; valid choices: {_fmt_choices(METHODS)}")
        check_nm(self.n, self.m)
        if self.mvue not in MVUE_METHODS:
            raise ValueError(f"Unknown `mvue`={self.mvue!r}; valid choices: {_fmt_choices(MVUE_METHODS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown `backend`={self.backend!r}; valid choices: {_fmt_choices(BACKENDS)}")
        if not (callable(self.targets) or isinstance(self.targets, str)):
            raise TypeError(
                f"`targets` must be 'mlp', 'all', a regex string or a callable (module, name) -> bool, "
                f"got {self.targets!r}"
            )
        for name in ("srste_decay",):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {v!r}")
        if self.masked_decay is not None and not (
            isinstance(self.masked_decay, (int, float)) and math.isfinite(self.masked_decay) and self.masked_decay >= 0
        ):
            raise ValueError(f"`masked_decay` must be None or a finite number >= 0, got {self.masked_decay!r}")
        d = self.dense_finetune_from
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, (int, float)):
                raise TypeError(f"`dense_finetune_from` must be None, an int step or a float fraction, got {d!r}")
            if isinstance(d, float) and not 0.0 < d < 1.0:
                raise ValueError(f"`dense_finetune_from` as a fraction of max_steps must be in (0, 1), got {d!r}")
            if isinstance(d, int) and d < 0:
                raise ValueError(f"`dense_finetune_from` as a step must be >= 0, got {d!r}")
        if isinstance(self.mask_update_interval, bool) or not isinstance(self.mask_update_interval, int) \
                or self.mask_update_interval < 1:
            raise ValueError(f"`mask_update_interval` must be an int >= 1, got {self.mask_update_interval!r}")
        from .ops.transposable import TRANSPOSABLE_METHODS  # ops import config: import here

        if self.transposable_method not in TRANSPOSABLE_METHODS:
            raise ValueError(
                f"Unknown `transposable_method`={self.transposable_method!r}; "
                f"valid choices: {_fmt_choices(TRANSPOSABLE_METHODS)}"
            )
        if self.on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(
                f"Unknown `on_nonfinite`={self.on_nonfinite!r}; valid choices: {_fmt_choices(NONFINITE_ACTIONS)}"
            )
        if self.mvue is not None and self.method == "dense":
            raise ValueError("`mvue` needs a sparse `method` ('ste', 'sr-ste' or 's-ste'), got method='dense'")
        if self.transposable and self.method == "s-ste":
            raise ValueError(
                "`transposable=True` is supported for method='ste' and 'sr-ste' (the T-SR-STE recipe); "
                "S-STE's soft threshold has no transposable form yet. Use method='sr-ste'."
            )
        if self.transposable and self.method == "dense":
            raise ValueError("`transposable=True` needs a sparse `method` ('ste' or 'sr-ste')")

    @property
    def sparse(self) -> bool:
        """True when the method makes weights sparse (every method but ``"dense"``)."""
        return self.method != "dense"

    def replace(self, **changes) -> "SparsityConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
