"""`SparsityConfig`: one frozen dataclass that says how a model is made N:M sparse."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

from .ops.mvue import MVUE_CHOICES
from .ops.nm import check_nm, fmt_choices as _fmt_choices  # the math layer owns both; config re-exports them
from .ops.transposable import TRANSPOSABLE_METHODS

METHODS = ("dense", "ste", "sr-ste", "s-ste")
# The one definition of each set of choices (`backends.BACKEND_CHOICES` is BACKENDS; the math's
# own choices, MVUE estimators and transposable solvers, are defined in ops/ and read here).
MVUE_METHODS = (None, *MVUE_CHOICES)
BACKENDS = ("auto", "dense", "cusparselt")
NONFINITE_ACTIONS = ("raise", "skip")
TARGET_PRESETS = ("mlp", "all")  # named `targets`; anything else is a regex or a callable
FLIP_MOMENTS = (None, "reset", "reset_exp_avg")
PRUNE_METHODS = ("magnitude", "wanda")

# A target filter receives the module and its qualified name, like torchao's `module_filter_fn`.
TargetFilter = Callable[["object", str], bool]



def _check_step_or_fraction(name: str, value, minimum: int = 0) -> None:
    """``None``, an int step >= ``minimum``, or a float fraction of max_steps in (0, 1)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be None, an int step or a float fraction of max_steps, got {value!r}")
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` as a fraction of max_steps must be in (0, 1), got {value!r}")
    if isinstance(value, int) and value < minimum:
        raise ValueError(f"`{name}` as a step must be >= {minimum}, got {value!r}")


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

    Schedules (all acted on by the engine, `sparsetrain.Sparsifier`; a step count is an int, a
    fraction of the run's ``max_steps`` a float in (0, 1)):

        dense_warmup: train dense for this many optimizer steps first, then switch to ``method``
            (S-STE's beta and transposable masks are taken from the weights at the switch).
        threshold_ramp: S-STE only. Over this many steps from the start of sparse training, the
            threshold ramps ``r`` from 0 to 1: ``W~ = (1 + r (beta - 1)) * S_r(W)`` with
            ``S_r(w) = sign(w) max(|w| - r t, 0)``, so W~ moves continuously from W to S-STE's exactly
            N:M ``beta * S(W)``; beta is taken once, when sparse training starts. ``r = (step - s0) / K``
            at optimizer step ``step`` (0-based), ``s0`` the first sparse step, ``K`` the ramp length.
        decay_ramp: SR-STE's decay and ``masked_decay`` grow linearly from 0 to their value over this
            many steps from the start of sparse training (factor ``(step - s0) / K``, at most 1).
        flip_moments: what happens to the Adam state of weights whose mask entry flipped in a step:
            ``None`` (kept), ``"reset"`` (``exp_avg`` and ``exp_avg_sq`` set to 0) or
            ``"reset_exp_avg"`` (only ``exp_avg`` set to 0). Needs an Adam-style optimizer.
        prune_at: train dense until this step, then prune once to exact N:M with ``prune_method``
            (W <- pruned W) and train sparse with ``method`` to the end (beta from the pruned W).
        prune_method: ``"magnitude"`` or ``"wanda"`` (|W_ij| * ||X_j||, with ||X_j|| from the
            training inputs of the last ``prune_calibration_steps`` dense optimizer steps).
        prune_calibration_steps: how many optimizer steps before ``prune_at`` Wanda collects inputs.
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
    dense_warmup: Optional[Union[int, float]] = None
    threshold_ramp: Optional[Union[int, float]] = None
    decay_ramp: Optional[Union[int, float]] = None
    flip_moments: Optional[str] = None
    prune_at: Optional[Union[int, float]] = None
    prune_method: str = "magnitude"
    prune_calibration_steps: int = 4  # a few micro-batches suffice for ||X_j|| (Wanda uses 128 sequences)

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
        for name in ("dense_finetune_from", "dense_warmup", "threshold_ramp", "decay_ramp", "prune_at"):
            _check_step_or_fraction(name, getattr(self, name), minimum=1 if name in ("threshold_ramp", "decay_ramp") else 0)
        self._check_schedules()
        if isinstance(self.mask_update_interval, bool) or not isinstance(self.mask_update_interval, int) \
                or self.mask_update_interval < 1:
            raise ValueError(f"`mask_update_interval` must be an int >= 1, got {self.mask_update_interval!r}")
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

    def _check_schedules(self) -> None:
        sparse_methods = "'ste', 'sr-ste' or 's-ste'"
        if self.flip_moments not in FLIP_MOMENTS:
            raise ValueError(f"Unknown `flip_moments`={self.flip_moments!r}; valid choices: {_fmt_choices(FLIP_MOMENTS)}")
        if self.flip_moments is not None and self.transposable:
            raise ValueError(
                "`flip_moments` is not supported with `transposable=True` yet (a transposable mask changes only at "
                "its refreshes); use it with a non-transposable method, or set flip_moments=None"
            )
        if self.prune_method not in PRUNE_METHODS:
            raise ValueError(f"Unknown `prune_method`={self.prune_method!r}; valid choices: {_fmt_choices(PRUNE_METHODS)}")
        c = self.prune_calibration_steps
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"`prune_calibration_steps` must be an int >= 1, got {c!r}")
        if self.prune_method != "magnitude" and self.prune_at is None:
            raise ValueError(f"`prune_method`={self.prune_method!r} would do nothing without `prune_at` (the step to prune at)")
        for name in ("dense_warmup", "threshold_ramp", "decay_ramp", "flip_moments", "prune_at"):
            if getattr(self, name) is not None and self.method == "dense":
                raise ValueError(f"`{name}`={getattr(self, name)!r} needs a sparse `method` ({sparse_methods}), got method='dense'")
        if self.threshold_ramp is not None and self.method != "s-ste":
            raise ValueError(
                f"`threshold_ramp` ramps S-STE's soft threshold and needs method='s-ste', got method={self.method!r}"
            )
        if self.decay_ramp is not None and not ((self.method == "sr-ste" and self.srste_decay > 0) or self.masked_decay):
            raise ValueError(
                f"`decay_ramp`={self.decay_ramp!r} would do nothing: no decay is active. Use method='sr-ste' "
                f"(srste_decay > 0) or set `masked_decay`."
            )
        if self.prune_at is not None and self.dense_warmup is not None:
            raise ValueError(
                "`prune_at` and `dense_warmup` both train dense first; set one: `prune_at` prunes the weights "
                "once at the switch, `dense_warmup` does not."
            )
        for early in ("dense_warmup", "prune_at"):
            a, b = getattr(self, early), self.dense_finetune_from
            if a is not None and b is not None and type(a) is type(b) and a >= b:
                raise ValueError(
                    f"`{early}`={a!r} must come before `dense_finetune_from`={b!r}: no sparse step would remain"
                )

    @property
    def sparse(self) -> bool:
        """True when the method makes weights sparse (every method but ``"dense"``)."""
        return self.method != "dense"

    def replace(self, **changes) -> "SparsityConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
