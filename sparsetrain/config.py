"""`SparsityConfig`: one frozen dataclass that says how a model is made N:M sparse.

Every field is declared once, with ``dataclasses.field(metadata=...)``, by `_field`. The metadata
keys (read them with `field_info`, never by hand):

- ``kind``: ``"math"`` (changes what a training step computes), ``"schedule"`` (a step count or
  interval: when the math changes) or ``"runtime"`` (how the same math is run: backend, seed of
  the draws, what to do on NaN). A resume must keep every math and schedule field.
- ``help``: one paragraph for ``sparsetrain fit --help`` and this class's docstring (``Args:``).
- ``choices``: the valid values (a tuple, or a callable returning one, e.g. the method registry's
  names), or None when the values are free or checked in ``__post_init__``.
- ``engine``: None, or one line saying what happens when the field is set (not None, False or 0)
  and no engine (`sparsetrain.Sparsifier`, or its Lightning / transformers adapters) runs it.

Every list of fields is derived from these declarations: `resume_fields` (the engine's resume
fingerprint and the CLI's early resume check), the CLI help, `engine_requirements` (the layer's
"needs an engine" warning) and the export metadata. To add a field: declare it with `_field`
(pick its kind; give it help, and choices or a check in ``__post_init__``), and nothing else.

A method's own hyper-parameters are not fields: they go in ``method_options`` and are declared
by the method (`sparsetrain.methods.Method.options`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from . import methods as _methods
from .pruning.registry import MID_TRAINING_PRUNERS
from .ops.activation import parse_nm
from .ops.mvue import MVUE_CHOICES
from .ops.nm import check_nm, fmt_choices as _fmt_choices  # the math layer owns both; config re-exports them
from .ops.transposable import TRANSPOSABLE_METHODS

# The one definition of each set of choices (`backends.BACKEND_CHOICES` is BACKENDS; the math's
# own choices, MVUE estimators and transposable solvers, are defined in ops/ and read here; the
# methods are the registry's, `sparsetrain.methods.names()`).
MVUE_METHODS = (None, *MVUE_CHOICES)
BACKENDS = ("auto", "dense", "cusparselt")
NONFINITE_ACTIONS = ("raise", "skip")
# Named `targets` / `activation_targets`; anything else is a regex or a callable. "mlp_down": the
# FFN down-projections only (GPT-2 `mlp.c_proj`, Llama `mlp.down_proj`, OPT `fc2`, ...), whose input
# is the FFN's hidden activation.
TARGET_PRESETS = ("mlp", "all", "mlp_down")
FLIP_MOMENTS = (None, "reset", "reset_exp_avg")
PRUNE_METHODS = MID_TRAINING_PRUNERS  # the pruner registry's: those that need no more than the input norms
FIELD_KINDS = ("math", "schedule", "runtime")

# A target filter receives the module and its qualified name, like torchao's `module_filter_fn`.
TargetFilter = Callable[["object", str], bool]

_STEPS = "an optimizer step (an int) or a fraction of max_steps (a float in (0, 1))"
_LENGTH = "K optimizer steps (an int K, or a float in (0, 1): that fraction of max_steps)"
# The fields given as a step or a length (an int) or a fraction of the run (a float); the lengths are >= 1.
SCHEDULE_FIELDS = ("dense_finetune_from", "dense_warmup", "threshold_ramp", "decay_ramp", "prune_at", "lr_rewarm")
_LENGTH_FIELDS = ("threshold_ramp", "decay_ramp", "lr_rewarm")


def _field(default: Any, kind: str, help: str, choices: Any = None, engine: Optional[str] = None):
    """A `SparsityConfig` field with its declaration (see the module docstring)."""
    if kind not in FIELD_KINDS:
        raise ValueError(f"Unknown field `kind`={kind!r}; valid choices: {_fmt_choices(FIELD_KINDS)}")
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help, "choices": choices, "engine": engine})


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


def _decaying_methods() -> List[str]:
    """The methods that add a per-step term to the gradient (SR-STE's decay and the like)."""
    return [x.name for x in _methods.all_methods() if type(x).add_step_term_ is not _methods.Method.add_step_term_]


def _method_help() -> str:
    return "the sparse-training method: " + "; ".join(
        f'``"{meth.name}"`` ({meth.summary})' for meth in _methods.all_methods()
    ) + ". Default: S-STE, as in Hu et al. 2024."


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """How to make the target layers of a model N:M sparse during training.

    Each field's ``kind`` (math, schedule or runtime), help text, choices and engine needs are
    declared on the field itself (see `field_info`); the ``Args:`` section below is generated
    from those declarations.
    """

    method: str = _field("s-ste", "math", _method_help(), choices=_methods.names)
    n: int = _field(2, "math", "keep ``n`` of every ``m`` consecutive weights along the input dimension.")
    m: int = _field(4, "math", "the group size of the N:M pattern (``n`` < ``m``; the input dim must divide by it).")
    targets: Union[str, TargetFilter] = _field(
        "mlp", "math",
        'which layers to swap: ``"mlp"`` (feed-forward layers only, as the papers do), ``"all"`` (every '
        "Linear/Conv1D except the LM head), a regular expression matched with ``re.search`` against qualified "
        "module names, or a callable ``(module, name) -> bool``.")
    srste_decay: float = _field(
        2e-4, "math", "lambda_W of SR-STE: ``srste_decay * (1 - mask) * W`` is added to the gradient once per "
        "optimizer step (Zhou et al. 2021 use 2e-4). Used by SR-STE only.")
    masked_decay: Optional[float] = _field(
        None, "math", "if set, ``masked_decay * (1 - mask) * W`` is added to the gradient after clipping, right "
        "before the optimizer step, for any sparse method (the T-SR-STE recipe uses 6e-5 or 2e-4).",
        engine="`masked_decay` is applied once per optimizer step by the engine; without one it does nothing")
    mvue: Optional[str] = _field(
        None, "math", '``None`` (exact weight gradient), ``"exact"`` (minimum-variance unbiased 2:4 of dY^T) or '
        '``"approx"`` (the cheaper sampling estimator of the 2by4 toolkit).', choices=MVUE_METHODS)
    fp8: bool = _field(False, "math", "simulate (CPU) or run (sm89+) per-tensor scaled FP8 matmuls.")
    backend: str = _field(
        "auto", "runtime", '``"auto"`` (cuSPARSELt where it can run, else dense), ``"dense"``, ``"cusparselt"``: '
        "how the same product is computed.", choices=BACKENDS)
    dense_finetune_from: Optional[Union[int, float]] = _field(
        None, "schedule", f"switch to dense training at {_STEPS}; ``None`` never switches. The dense phase "
        "starts from the sparse model: W~ is written into W at the switch.",
        engine="`dense_finetune_from` is a schedule of the engine; without one training never switches")
    seed: Optional[int] = _field(
        None, "runtime", "seeds the MVUE sampling generators (each layer's seed mixes it with the layer's name); "
        "``None`` uses a fixed default, whatever torch's global seed.")
    transposable: bool = _field(
        False, "math", "use masks that are N:M along rows and columns of every m x m tile (methods that support "
        "it: STE / SR-STE), so that W~^T is N:M too and the input-gradient GEMM can be sparse.",
        engine="transposable masks are refreshed by the engine; without one the mask stays as it was built")
    mask_update_interval: int = _field(
        40, "schedule", "with ``transposable``, recompute the mask every this many optimizer steps.")
    transposable_method: str = _field(
        "auto", "math", "the solver used for transposable masks (see `ops.transposable_mask`).",
        choices=TRANSPOSABLE_METHODS)
    on_nonfinite: str = _field(
        "raise", "runtime", "what the engine does when a target layer's gradient (before the optimizer step) or "
        'weight (after it) holds NaN/inf: ``"raise"`` a `FloatingPointError` naming the layer and the step, or '
        '``"skip"`` the step (no parameter, mask or schedule moves) with a warning. Under fp16 `GradScaler` an '
        "overflow is skipped by the scaler before the engine sees it.", choices=NONFINITE_ACTIONS)
    dense_warmup: Optional[Union[int, float]] = _field(
        None, "schedule", f"train dense until {_STEPS}, then switch to ``method`` (S-STE's beta and transposable "
        "masks are taken from the weights at the switch).",
        engine="`dense_warmup` is a schedule of the engine; without one training is sparse from the start")
    threshold_ramp: Optional[Union[int, float]] = _field(
        None, "schedule", f"S-STE only: over {_LENGTH} from the start of sparse training, the "
        "threshold ramps ``r`` from 0 to 1: ``W~ = (1 + r (beta - 1)) * S_r(W)`` with ``S_r(w) = sign(w) "
        "max(|w| - r t, 0)``, so W~ moves continuously from W to S-STE's exactly N:M ``beta * S(W)``; beta is "
        "taken once, when sparse training starts. ``r = (step - s0) / K`` at optimizer step ``step`` (0-based), "
        "``s0`` the first sparse step, ``K`` the ramp length.",
        engine="`threshold_ramp` is a schedule of the engine; without one S-STE uses its full threshold")
    decay_ramp: Optional[Union[int, float]] = _field(
        None, "schedule", f"the method's per-step decay (SR-STE's) and ``masked_decay`` grow linearly from 0 to "
        f"their value over {_LENGTH} from the start of sparse training (factor "
        "``(step - s0) / K``, at most 1).",
        engine="`decay_ramp` is a schedule of the engine; without one it does nothing")
    lr_rewarm: Optional[Union[int, float]] = _field(
        None, "schedule", f"re-warm the learning rate at the switch to sparse training (after ``dense_warmup`` or "
        f"``prune_at``): over {_LENGTH} the optimizer's lr is multiplied by ``min(1, (step - s0 + 1) / K)``, "
        "``s0`` the first sparse step (the loop's scheduler still sets the lr; the factor is applied around each "
        "optimizer step and removed after it).",
        engine="`lr_rewarm` scales the optimizer's lr through the engine; without one it does nothing")
    flip_moments: Optional[str] = _field(
        None, "math", "what happens to the Adam state of weights whose mask entry flipped in a step: ``None`` "
        '(kept), ``"reset"`` (``exp_avg`` and ``exp_avg_sq`` set to 0) or ``"reset_exp_avg"`` (only ``exp_avg`` '
        "set to 0). Needs an Adam-style optimizer.", choices=FLIP_MOMENTS,
        engine="`flip_moments` acts on the optimizer through the engine; without one it does nothing")
    prune_at: Optional[Union[int, float]] = _field(
        None, "schedule", f"train dense until {_STEPS}, then prune once to exact N:M with ``prune_method`` "
        "(W <- pruned W) and train sparse with ``method`` to the end (beta from the pruned W).",
        engine="`prune_at` is a schedule of the engine; without one training is sparse from the start")
    prune_method: str = _field(
        "magnitude", "math", '``"magnitude"`` or ``"wanda"`` (|W_ij| * ||X_j||, with ||X_j|| from the training '
        "inputs of the last ``prune_calibration_steps`` dense optimizer steps); needs ``prune_at``.",
        choices=PRUNE_METHODS)
    # A few micro-batches suffice for ||X_j|| (Wanda uses 128 sequences).
    prune_calibration_steps: int = _field(
        4, "schedule", "how many optimizer steps before ``prune_at`` Wanda collects inputs.")
    activation_sparsity: Optional[str] = _field(
        None, "math", '``None`` or an ``"N:M"`` string such as ``"2:4"``: the input of every layer in '
        "``activation_targets`` is made N:M per token (the N largest |x| of every M consecutive input features), "
        'in training and evaluation (docs/sparse-activations.md). Independent of ``method``: ``method="dense"`` '
        "keeps the weights dense. The engine's dense phases (``dense_warmup``, ``dense_finetune_from``) make the "
        "activations dense too.")
    activation_targets: Union[str, TargetFilter] = _field(
        "mlp_down", "math", "which layers get N:M inputs, with the grammar of ``targets``; the default "
        '``"mlp_down"`` is the FFN down-projections (GPT-2 ``mlp.c_proj``, Llama ``mlp.down_proj``, OPT '
        "``fc2``), whose input is the FFN activation: mostly exact zeros with squared ReLU "
        "(``model.activation: relu2``).")
    method_options: Optional[Dict[str, Any]] = _field(
        None, "math", "the method's own options, e.g. ``{decay: 1e-3}``; each method declares the keys it takes "
        "and their defaults (``sparsetrain.methods.get(name).options``); ``None`` keeps the defaults.")

    def __post_init__(self) -> None:
        meth = _methods.get(self.method)  # the registry's one-line error for an unknown name
        for f in dataclasses.fields(self):
            choices = field_choices(f.name)
            value = getattr(self, f.name)
            if choices is not None and f.name != "method" and value not in choices:
                raise ValueError(f"Unknown `{f.name}`={value!r}; valid choices: {_fmt_choices(choices)}")
        check_nm(self.n, self.m)
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
        for name in SCHEDULE_FIELDS:
            _check_step_or_fraction(name, getattr(self, name), minimum=1 if name in _LENGTH_FIELDS else 0)
        if isinstance(self.mask_update_interval, bool) or not isinstance(self.mask_update_interval, int) \
                or self.mask_update_interval < 1:
            raise ValueError(f"`mask_update_interval` must be an int >= 1, got {self.mask_update_interval!r}")
        if self.method_options is not None and not (
                isinstance(self.method_options, dict) and all(isinstance(k, str) for k in self.method_options)):
            raise TypeError(f"`method_options` must be None or a dict of option names to values, got {self.method_options!r}")
        sparse_names = _fmt_choices([x.name for x in _methods.all_methods() if x.sparse])
        if self.mvue is not None and not meth.sparse:
            raise ValueError(f"`mvue` needs a sparse `method` ({sparse_names}), got method={self.method!r}")
        meth.check(self)  # the method's own checks first: its message says why (S-STE and transposable)
        if self.transposable and not meth.transposable:
            supported = _fmt_choices([x.name for x in _methods.all_methods() if x.transposable])
            raise ValueError(
                f"`transposable=True` is supported for method {supported} (the T-SR-STE recipe), not "
                f"method={self.method!r}"
            )
        self._check_schedules(meth, sparse_names)
        self._check_activations()

    def _check_activations(self) -> None:
        parse_nm(self.activation_sparsity, "activation_sparsity")
        if not (callable(self.activation_targets) or isinstance(self.activation_targets, str)):
            raise TypeError(
                f"`activation_targets` must be {_fmt_choices(TARGET_PRESETS)}, a regex string or a callable "
                f"(module, name) -> bool, got {self.activation_targets!r}"
            )
        if self.activation_sparsity is not None and (self.mvue is not None or self.fp8):
            what = "`mvue`" if self.mvue is not None else "`fp8`"
            raise ValueError(
                f"{what} is not implemented together with `activation_sparsity` yet; turn {what} off, or set "
                f"activation_sparsity=None"
            )

    def _check_schedules(self, meth, sparse_names: str) -> None:
        if self.flip_moments is not None and self.transposable:
            raise ValueError(
                "`flip_moments` is not supported with `transposable=True` yet (a transposable mask changes only at "
                "its refreshes); use it with a non-transposable method, or set flip_moments=None"
            )
        c = self.prune_calibration_steps
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"`prune_calibration_steps` must be an int >= 1, got {c!r}")
        if self.prune_method != "magnitude" and self.prune_at is None:
            raise ValueError(f"`prune_method`={self.prune_method!r} would do nothing without `prune_at` (the step to prune at)")
        for name in ("dense_warmup", "threshold_ramp", "decay_ramp", "flip_moments", "prune_at", "lr_rewarm"):
            if name in ("dense_warmup", "lr_rewarm") and self.activation_sparsity is not None:
                continue  # a dense warm-up of sparse activations (with dense weights) is a schedule too
            if getattr(self, name) is not None and not meth.sparse:
                raise ValueError(
                    f"`{name}`={getattr(self, name)!r} needs a sparse `method` ({sparse_names}), got method={self.method!r}"
                )
        if self.threshold_ramp is not None and not meth.supports_ramp:
            raise ValueError(
                f"`threshold_ramp` ramps S-STE's soft threshold and needs method="
                f"{' or '.join(repr(x.name) for x in _methods.all_methods() if x.supports_ramp)}, got method={self.method!r}"
            )
        if self.decay_ramp is not None and not (meth.has_step_term(self) or self.masked_decay):
            raise ValueError(
                f"`decay_ramp`={self.decay_ramp!r} would do nothing: no decay is active. Use a method with a "
                f"per-step decay ({_fmt_choices(_decaying_methods())}) or set `masked_decay`."
            )
        if self.lr_rewarm is not None and self.dense_warmup is None and self.prune_at is None:
            raise ValueError(
                f"`lr_rewarm`={self.lr_rewarm!r} re-warms the learning rate at the switch from dense to sparse "
                f"training, and there is none: set `dense_warmup` or `prune_at` (or lr_rewarm=None)."
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
    def rule(self) -> "_methods.Method":
        """The `sparsetrain.methods.Method` object of ``method`` (from the registry)."""
        return _methods.get(self.method)

    @property
    def sparse(self) -> bool:
        """True when the method makes weights sparse (every method but ``"dense"``)."""
        return self.rule.sparse

    @property
    def activation_nm(self) -> Optional[Tuple[int, int]]:
        """``(n, m)`` of ``activation_sparsity``, or None when the activations stay dense."""
        return parse_nm(self.activation_sparsity, "activation_sparsity")

    @property
    def trains_sparse(self) -> bool:
        """True when anything is sparse: the weights (`sparse`) or the target layers' inputs."""
        return self.sparse or self.activation_sparsity is not None

    def describe(self) -> str:
        """One line for logs: ``"s-ste 2:4"``, ``"dense (no sparsity)"`` for the baseline, and
        ``"... + 2:4 activations"`` when the target layers' inputs are sparse too."""
        weights = f"{self.method} {self.n}:{self.m}" + (" transposable" if self.transposable else "") if self.sparse else None
        if self.activation_sparsity is not None:
            return f"{weights or 'dense weights'} + {self.activation_sparsity} activations"
        return weights or f"{self.method} (no sparsity)"

    def replace(self, **changes) -> "SparsityConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------ declarations

def field_info(name: str) -> Dict[str, Any]:
    """The declaration of field ``name``: ``kind``, ``help``, ``choices`` (resolved) and ``engine``."""
    f = _FIELDS.get(name)
    if f is None:
        raise ValueError(f"Unknown SparsityConfig field {name!r}; valid: {', '.join(_FIELDS)}")
    return {**f.metadata, "choices": field_choices(name), "default": f.default}


def field_choices(name: str) -> Optional[Tuple[Any, ...]]:
    """The valid values of field ``name`` (None: free, or checked in ``__post_init__``)."""
    choices = _FIELDS[name].metadata["choices"]
    return tuple(choices()) if callable(choices) else choices


def fields_of(*kinds: str) -> Tuple[str, ...]:
    """The names of the fields of these kinds, in declaration order."""
    for kind in kinds:
        if kind not in FIELD_KINDS:
            raise ValueError(f"Unknown field `kind`={kind!r}; valid choices: {_fmt_choices(FIELD_KINDS)}")
    return tuple(name for name, f in _FIELDS.items() if f.metadata["kind"] in kinds)


def resume_fields() -> Tuple[str, ...]:
    """The fields a resume must keep: every ``math`` and ``schedule`` field."""
    return fields_of("math", "schedule")


def resume_value(value: Any) -> Any:
    """A field's value as a resume compares it: tuples and lists alike (a state read back from JSON
    or YAML holds lists), dicts compared by their values the same way."""
    if isinstance(value, (tuple, list)):
        return [resume_value(v) for v in value]
    if isinstance(value, dict):
        return {k: resume_value(v) for k, v in value.items()}
    return value


def field_help() -> Dict[str, str]:
    """``{field: help text}`` for every field (RST markup as in docstrings)."""
    out = {name: f.metadata["help"] for name, f in _FIELDS.items()}
    out["method"] = _method_help()  # methods registered after import show up too
    return out


def _is_set(value: Any) -> bool:
    return value is not None and value is not False and not (isinstance(value, (int, float)) and value == 0)


def engine_requirements(cfg: SparsityConfig) -> List[Tuple[str, str]]:
    """``(key, message)`` for every setting of ``cfg`` that only an engine acts on: the method's
    per-step rule (keyed by the method's name) and each set field declared with ``engine``."""
    out = []
    need = cfg.rule.needs_engine(cfg)
    if need:
        out.append((cfg.method, need))
    for name, f in _FIELDS.items():
        if f.metadata["engine"] and _is_set(getattr(cfg, name)):
            out.append((name, f.metadata["engine"]))
    return out


def _generated_doc() -> str:
    """The class docstring: its summary plus an ``Args:`` entry per field, from the declarations."""
    lines = [SparsityConfig.__doc__.rstrip(), "", "    Args:"]
    import textwrap

    for name, text in field_help().items():
        kind = _FIELDS[name].metadata["kind"]
        body = textwrap.wrap(f"{name}: ({kind}) {text}", width=100, initial_indent="        ",
                             subsequent_indent="            ")
        lines.extend(body)
    return "\n".join(lines) + "\n"


_FIELDS = {f.name: f for f in dataclasses.fields(SparsityConfig)}
SparsityConfig.__doc__ = _generated_doc()
# The fields a resume must keep (the engine's fingerprint, the CLI's early check).
MATH_FIELDS = resume_fields()
METHODS = _methods.names()  # the methods registered at import (read `sparsetrain.methods.names()` for later ones)
