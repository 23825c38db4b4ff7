"""`Sparsifier`: the one owner of everything sparse training does once per optimizer step or per run.

It works in any training loop. It swaps the target layers (like `sparsify`), and `attach` hooks an
optimizer with PyTorch's own step hooks, so whatever the loop does before ``optimizer.step()``
(gradient accumulation, `GradScaler`, clipping) stays the loop's business:

- **before the update** (an optimizer step pre-hook; when the optimizer is stepped with a closure,
  as Lightning does, right after the closure's backward and clipping): the gradients are final,
  unscaled and clipped. The engine checks them for NaN/inf, then adds SR-STE's
  ``srste_decay * (1 - mask) * W`` and ``masked_decay * (1 - mask) * W`` to them. Once per step,
  whatever the accumulation or the loss scale. A step that `GradScaler` skips (inf gradients)
  never calls the optimizer, so nothing here runs and nothing advances.
- **after the update** (a post-hook): the step counter advances, schedules switch phase (dense
  fine-tuning), transposable masks refresh every ``mask_update_interval`` steps, MVUE generators
  are re-seeded from ``(seed, rank, step)``, and `metrics` are computed from one projection of
  each layer: flip rate, zero fraction, beta, phase. Non-finite weights are caught here.

State that follows from the weights is not stored: the mask of a non-transposable method (the
engine keeps the last one packed, 1 bit per weight, only for the flip rate), and the MVUE
generator states (a function of the step). `state_dict` holds the step, the phase and the config
fields that change the math, so a resume with a different config is a one-line error.

Distributed: under DDP the weights are equal on every rank and everything is computed locally,
with MVUE draws distinct per rank. Under FSDP2 (`fully_shard`, dim 0 sharded) N:M groups run along
dim 1, so projections, masks and decays are exact per shard; S-STE's beta and the metrics are sums
over shards, combined with one all-reduce for all layers.

Example:
    >>> sparsity = Sparsifier(model, SparsityConfig(method="sr-ste"))
    >>> opt = torch.optim.AdamW(model.parameters(), lr=6e-4)
    >>> sparsity.attach(opt, max_steps=10_000)
    >>> for x, y in loader:
    ...     loss_fn(model(x), y).backward()
    ...     opt.step(); opt.zero_grad()
    ...     log(sparsity.metrics)
    >>> torch.save({"model": model.state_dict(), "sparsity": sparsity.state_dict()}, path)
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .config import SparsityConfig
from .methods import decay_term
from .nn._packing import pack_mask, unpack_mask
from .nn.convert import sparse_layers, sparsify
from .nn.linear import SparseLinear, local_tensor

__all__ = ["Sparsifier", "MATH_FIELDS"]

log = logging.getLogger(__name__)

# Config fields that change what is computed: a resume must not change them.
MATH_FIELDS = (
    "method", "n", "m", "targets", "mvue", "fp8", "transposable", "transposable_method",
    "mask_update_interval", "srste_decay", "masked_decay", "dense_finetune_from",
    "dense_warmup", "threshold_ramp", "decay_ramp", "flip_moments", "prune_at", "prune_method",
    "prune_calibration_steps",
)
STATE_FORMAT = 2


def _describe(value: Any) -> Any:
    """A config value as it is compared across a resume (a callable by its qualified name)."""
    if callable(value):
        return f"<callable {getattr(value, '__qualname__', type(value).__name__)}>"
    return value


def _unwrap_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Lightning's, `accelerate`'s or similar wrappers."""
    seen = 0
    while not isinstance(opt, torch.optim.Optimizer) or type(opt).__name__ in ("AcceleratedOptimizer", "LightningOptimizer"):
        inner = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if inner is None or seen > 8:
            break
        opt, seen = inner, seen + 1
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer (or a wrapper of one), got {type(opt).__name__}")
    return opt


def _nonfinite_flags(tensors: List[torch.Tensor]) -> torch.Tensor:
    """1.0 for each tensor holding NaN or inf, else 0.0 (float64, ready to all-reduce).

    The min and max of a tensor are NaN when it holds a NaN (they propagate it) and +-inf when it
    holds an inf; one read of the data in its own dtype, without a temporary (a float64 sum costs
    a conversion of every element)."""
    ends = torch.stack([torch.stack(torch.aminmax(t.reshape(-1))).float() for t in tensors])  # (n, 2)
    return (~torch.isfinite(ends).all(-1)).to(torch.float64)


def _dist_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class Sparsifier:
    """Makes a model's target layers N:M sparse and runs the per-step rules in any training loop.

    Args:
        model: any `nn.Module`. Its target layers are swapped for `SparseLinear` now, before the
            optimizer is built (a `transformers` ``Conv1D`` gets a new, transposed Parameter).
            A model already holding `SparseLinear` layers (a second run, or `sparsify` by hand)
            is adopted as it is; their config must agree with ``config`` on every field that
            changes the math.
        config: a `SparsityConfig`; keyword arguments build one or override its fields.
        metrics_every: compute `metrics` (flip rate, zero fraction: one projection of every layer
            and a mask comparison) every this many optimizer steps, e.g. the logging interval.
            Steps in between only check the weights for NaN/inf, unless a rule needs the mask
            anyway (decays, ``flip_moments``). The Lightning and transformers adapters pass their
            logging interval.

    Raises:
        ValueError: no layer ends up sparse (``targets`` matches nothing, or ``m`` divides no
            target's input dim); the message lists the candidates and their dims.

    Attributes:
        swapped: the qualified names of the sparse layers.
        step: optimizer steps taken (skipped steps do not count).
        phase: ``"sparse"`` or ``"dense"`` (dense fine-tuning, or ``method="dense"``).
        metrics: the last step's ``sparsity/flip_rate``, ``sparsity/zero_fraction``,
            ``sparsity/beta_mean`` (S-STE) and ``sparsity/dense_phase`` (0 or 1).
    """

    def __init__(self, model: nn.Module, config: Optional[SparsityConfig] = None, *, metrics_every: int = 1,
                 **overrides: Any) -> None:
        if isinstance(metrics_every, bool) or not isinstance(metrics_every, int) or metrics_every < 1:
            raise ValueError(f"`metrics_every` must be an int >= 1, got {metrics_every!r}")
        self.metrics_every = metrics_every
        if config is not None and not isinstance(config, SparsityConfig):
            raise TypeError(f"`config` must be a SparsityConfig or None, got {type(config).__name__}")
        config = SparsityConfig(**overrides) if config is None else (config.replace(**overrides) if overrides else config)
        self.config = config
        self.model = model
        existing = sparse_layers(model)
        if existing:
            for name, layer in existing:
                diff = [f for f in MATH_FIELDS if f != "targets" and _describe(getattr(layer.config, f)) != _describe(getattr(config, f))]
                if diff:
                    f = diff[0]
                    raise ValueError(
                        f"The model's sparse layer `{name}` was built with {f}={getattr(layer.config, f)!r}, but this "
                        f"Sparsifier has {f}={getattr(config, f)!r}; use the same config, or start from a dense model."
                    )
            self.swapped = [n for n, _ in existing]
        else:
            self.swapped = sparsify(model, config)
        self._layers: List[Tuple[str, SparseLinear]] = sparse_layers(model)
        for _, layer in self._layers:
            layer.engine_attached = True
        self.step = 0
        self.phase = "sparse" if config.sparse else "dense"
        self.max_steps: Optional[int] = None
        self.metrics: Dict[str, float] = {}
        self.metrics_step = -1  # the step `metrics` were computed at
        self._started = False
        self._restored = False
        self._hooks: list = []
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._prev_masks: Dict[str, torch.Tensor] = {}  # packed, for the flip rate only (not transposable)
        self._skip_step = False
        self._rank = 0
        self._calib: Dict[str, torch.Tensor] = {}  # Wanda's sum of x_j^2 per sparse layer (prune_at)
        self._calib_hooks: list = []

    # ------------------------------------------------------------------------------ properties
    @property
    def layers(self) -> List[Tuple[str, SparseLinear]]:
        """``(name, SparseLinear)`` pairs of the sparse layers."""
        return list(self._layers)

    @property
    def sharded(self) -> bool:
        """True when the weights are FSDP2 shards (DTensors)."""
        return any(hasattr(layer.weight, "to_local") for _, layer in self._layers)

    def _steps(self, field: str) -> Optional[int]:
        """A schedule field in optimizer steps (an int as it is, a fraction times ``max_steps``)."""
        d = getattr(self.config, field)
        if d is None or isinstance(d, int):
            return d
        if self.max_steps is None:
            raise ValueError(
                f"`{field}`={d!r} is a fraction of the run's length: pass `max_steps` to "
                f"`Sparsifier.attach(optimizer, max_steps=...)`, or give the step as an int."
            )
        return int(round(d * self.max_steps))

    def dense_from_step(self) -> Optional[int]:
        """The optimizer step where dense fine-tuning starts (None: never)."""
        return self._steps("dense_finetune_from")

    def sparse_from_step(self) -> int:
        """The first optimizer step trained sparse (after ``dense_warmup`` or at ``prune_at``; 0 otherwise)."""
        return self._steps("dense_warmup") or self._steps("prune_at") or 0

    def phase_at(self, step: int) -> str:
        """The phase that optimizer step ``step`` (0-based: the number of steps already taken) trains in."""
        if not self.config.sparse:
            return "dense"
        if step < self.sparse_from_step():
            return "dense"
        dense_from = self.dense_from_step()
        if dense_from is not None and step >= dense_from:
            return "dense"
        return "sparse"

    def _progress(self, field: str, step: int) -> float:
        """``min(1, (step - s0) / K)`` for a ramp of ``K`` = ``field`` steps from the first sparse step s0."""
        k = self._steps(field)
        if k is None:
            return 1.0
        return min(1.0, max(0, step - self.sparse_from_step()) / max(k, 1))

    def ramp_at(self, step: int) -> float:
        """S-STE's threshold ramp ``r`` in [0, 1] at optimizer step ``step`` (1 without ``threshold_ramp``)."""
        return self._progress("threshold_ramp", step)

    def decay_scale_at(self, step: int) -> float:
        """The factor on SR-STE's decay and ``masked_decay`` at optimizer step ``step`` (1 without ``decay_ramp``)."""
        return self._progress("decay_ramp", step)

    # ------------------------------------------------------------------------------ lifecycle
    def attach(self, optimizer: Any, max_steps: Optional[int] = None) -> "Sparsifier":
        """Hook ``optimizer`` so the per-step rules run at every (non-skipped) ``optimizer.step()``.

        On a fresh run this is when sparsity switches on: S-STE's beta and transposable masks are
        taken from the weights as they are now (call it after DDP / FSDP2 wrapping and after any
        custom initialisation). After `load_state_dict` the restored state is used instead.

        Args:
            optimizer: the optimizer that updates the sparse layers' weights (Lightning's and
                `accelerate`'s wrappers are unwrapped).
            max_steps: the run's length in optimizer steps; needed when a schedule is a fraction.

        Raises:
            ValueError: the optimizer does not hold a sparse layer's weight (build it after the
                Sparsifier), or a fractional schedule without ``max_steps``.
        """
        self.detach()
        opt = _unwrap_optimizer(optimizer)
        held = {id(p) for group in opt.param_groups for p in group["params"]}
        missing = [name for name, layer in self._layers if id(layer.weight) not in held]
        if missing:
            raise ValueError(
                f"The optimizer does not hold the weight of {len(missing)} sparse layer(s) ({', '.join(missing[:4])}"
                f"{'...' if len(missing) > 4 else ''}). Build the optimizer after `Sparsifier(model, ...)`: the swap "
                f"replaces transformers Conv1D weights by transposed Parameters."
            )
        if max_steps is not None:
            if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
                raise ValueError(f"`max_steps` must be a positive int or None, got {max_steps!r}")
            self.max_steps = max_steps
        for field in ("dense_finetune_from", "dense_warmup", "threshold_ramp", "decay_ramp", "prune_at"):
            self._steps(field)  # a fractional schedule without max_steps fails here, not mid-run
        dense_from = self.dense_from_step()
        if dense_from is not None and self.sparse_from_step() >= dense_from:
            raise ValueError(
                f"The dense warm-up / `prune_at` ends at step {self.sparse_from_step()}, not before "
                f"`dense_finetune_from` (step {dense_from}): no step would train sparse."
            )
        if self.config.flip_moments is not None and "betas" not in opt.defaults:
            raise ValueError(
                f"`flip_moments`={self.config.flip_moments!r} resets Adam moments, but the optimizer is "
                f"{type(opt).__name__} (no `betas`). Use Adam/AdamW, or flip_moments=None."
            )
        self._rank = _dist_rank()
        if self.config.transposable and self.sharded:
            raise ValueError(
                "`transposable=True` is not supported with FSDP2-sharded weights yet (a transposable tile spans "
                "rows that may sit on different ranks). Use DDP, or a non-transposable method."
            )
        self._optimizer = opt
        if not self._started:
            self.start()
        self._hooks = [opt.register_step_pre_hook(self._pre_hook), opt.register_step_post_hook(self._post_hook)]
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks (the optimizer is left exactly as it was found)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._optimizer = None

    def start(self) -> None:
        """Switch sparsity on (or apply a restored state): beta, masks, generators and the phase."""
        if self._restored:
            self._set_phase(self.phase_at(self.step), announce=False)
        else:
            self._set_phase(self.phase_at(self.step), announce=False)
            if self.phase == "sparse":
                self._take_sparsity_state()
        self._apply_ramp()
        self._reseed()
        self._snapshot_masks()
        self._update_calibration_hooks()
        self._started = True

    @torch.no_grad()
    def _take_sparsity_state(self) -> None:
        """Beta (S-STE) and transposable masks from the weights as they are now."""
        betas = None
        if self.config.method == "s-ste":
            betas = self._global_betas()
        for i, (_, layer) in enumerate(self._layers):
            layer.reset_sparsity_state(beta=None if betas is None else betas[i])

    @torch.no_grad()
    def _global_betas(self) -> List[torch.Tensor]:
        """``sum <W, S(W)> / sum <S(W), S(W)>`` per layer, the sums over all shards (one all-reduce)."""
        from .ops.nm import soft_threshold

        cfg = self.config
        sums = []
        for _, layer in self._layers:
            w = local_tensor(layer.weight.detach()).float()
            s = soft_threshold(w, cfg.n, cfg.m)
            sums.append(torch.stack([(w * s).sum(), (s * s).sum()]))
        sums = torch.stack(sums)  # (layers, 2)
        self._all_reduce(sums)
        num, den = sums.unbind(-1)
        beta = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(den))
        return list(beta.unbind(0))

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the shards of an FSDP2 model (nothing to do otherwise)."""
        if not self.sharded:
            return
        weight = self._layers[0][1].weight
        group = weight.device_mesh.get_group() if weight.device_mesh.ndim == 1 else None
        torch.distributed.all_reduce(tensor, group=group)

    def _set_phase(self, phase: str, announce: bool = True) -> None:
        if announce and phase != self.phase:
            log.info("Sparsifier: %s training from optimizer step %d", phase, self.step)
        self.phase = phase
        for _, layer in self._layers:
            layer.sparse_active = self.config.sparse and phase == "sparse"

    def _reseed(self) -> None:
        for _, layer in self._layers:
            layer.reseed(self.step, self._rank)

    @torch.no_grad()
    def _snapshot_masks(self) -> None:
        if self.phase != "sparse" or self.config.transposable:  # a transposable mask counts its own flips
            self._prev_masks = {}
            return
        self._prev_masks = {name: pack_mask(layer.current_mask()) for name, layer in self._layers}

    # ------------------------------------------------------------------------------ the step
    def _pre_hook(self, optimizer, args, kwargs):
        # `args` starts with the optimizer itself; a closure is the next positional or a keyword.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.before_step()
            return None

        def closure_then_rules():
            loss = closure()  # Lightning: backward and clipping happen in here
            self.before_step()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_rules}
        return (args[0], closure_then_rules, *args[2:]), kwargs

    def _post_hook(self, optimizer, args, kwargs) -> None:
        self.after_step()

    @torch.no_grad()
    def before_step(self) -> None:
        """The rules on final, unscaled, clipped gradients, right before the parameter update.

        Called by the optimizer hook; call it by hand only in a loop that does not use one."""
        self._skip_step = False
        bad = self._first_nonfinite()
        if bad is not None:
            self._nonfinite(bad, "gradient")  # raises, or marks the step skipped
            if self._skip_step:
                return
        if self.phase != "sparse":
            return
        cfg = self.config
        alpha = (cfg.srste_decay if cfg.method == "sr-ste" else 0.0) + (cfg.masked_decay or 0.0)
        alpha *= self.decay_scale_at(self.step)
        if not alpha:
            return
        for name, layer in self._layers:
            grad = layer.weight.grad
            if grad is None:
                continue
            g = local_tensor(grad)
            w = local_tensor(layer.weight.detach())
            # The mask of the current weights was stored by the last `after_step` (nothing has
            # changed them since): unpacking it is cheaper than another projection.
            stored = self._prev_masks.get(name) if not self.config.transposable else None
            mask = unpack_mask(stored, w.shape) if stored is not None else layer.mask
            g.add_(decay_term(w, mask).to(g.dtype), alpha=alpha)

    @torch.no_grad()
    def after_step(self) -> None:
        """The rules after the parameter update: step, schedule, masks, generators, metrics."""
        if self._skip_step:
            self._skip_step = False
            return
        self.step += 1
        phase = self.phase_at(self.step)
        if phase != self.phase:
            if phase == "sparse" and self.config.prune_at is not None and self.step == self.sparse_from_step():
                self._prune_once()
            self._set_phase(phase)
            if phase == "sparse":
                self._take_sparsity_state()
        self._apply_ramp()
        self._update_calibration_hooks()
        cfg = self.config
        refresh = cfg.transposable and self.phase == "sparse" and self.step % cfg.mask_update_interval == 0
        report = self.step % self.metrics_every == 0
        # The mask of these weights is needed now for the metrics, or at the next step: by the
        # decays, by `flip_moments`, or as the reference of the next reported flip rate.
        decays = (cfg.method == "sr-ste" and cfg.srste_decay > 0) or bool(cfg.masked_decay)
        keep_mask = (decays or cfg.flip_moments is not None or (self.step + 1) % self.metrics_every == 0) \
            and not cfg.transposable
        if self.phase == "sparse" and not report and not keep_mask:
            self._prev_masks = {}
            if refresh:
                for _, layer in self._layers:
                    layer.refresh_transposable_mask()
            self._check_weights_finite()
            self._reseed()
            return
        stats = []  # per layer: flips, zeros, non-finite weights, numel
        for name, layer in self._layers:
            flipped = layer.refresh_transposable_mask() if refresh else 0
            w_eff, mask = layer.projection() if self.phase == "sparse" else (local_tensor(layer.weight.detach()), None)
            if cfg.transposable:
                # The stored mask changes only when refreshed, and the refresh counts its flips:
                # no second copy of it is kept (state stays at 1 bit per weight).
                flips = torch.tensor(flipped if mask is not None else 0, device=w_eff.device)
            else:
                prev = self._prev_masks.get(name)
                changed = (mask != unpack_mask(prev, mask.shape)) if (mask is not None and prev is not None) else None
                flips = changed.sum() if changed is not None else w_eff.new_zeros((), dtype=torch.long)
                if changed is not None and cfg.flip_moments is not None:
                    self._reset_flipped_moments(layer, changed)
                if mask is not None:
                    self._prev_masks[name] = pack_mask(mask)
            nonfinite = (~torch.isfinite(local_tensor(layer.weight.detach()))).sum()
            stats.append(torch.stack([flips.long(), (w_eff == 0).sum(), nonfinite, torch.tensor(w_eff.numel(), device=w_eff.device)]))
        if self.phase != "sparse":
            self._prev_masks = {}
        self._reseed()
        if not stats:
            return
        stats = torch.stack(stats).to(torch.float64)  # float64: exact counts up to 2^53
        self._all_reduce(stats)
        per_layer = stats.tolist()  # the one host sync of the step
        for (name, _), (_, _, nonfinite, _) in zip(self._layers, per_layer):
            if nonfinite:
                self._weight_error(name, f"{int(nonfinite)} NaN/inf value(s)")
        if not report:
            return
        self.metrics_step = self.step
        total = sum(row[3] for row in per_layer)
        self.metrics = {
            "sparsity/flip_rate": sum(row[0] for row in per_layer) / total if self.phase == "sparse" else 0.0,
            "sparsity/zero_fraction": sum(row[1] for row in per_layer) / total,
            "sparsity/dense_phase": float(self.phase == "dense"),
        }
        if cfg.method == "s-ste":
            self.metrics["sparsity/beta_mean"] = sum(float(layer.beta) for _, layer in self._layers) / len(self._layers)
        if cfg.threshold_ramp is not None:
            self.metrics["sparsity/threshold_ramp"] = self.ramp_at(self.step)

    # ------------------------------------------------------------------------------ schedules
    # Dense warm-up, threshold ramp, decay ramp, moment resets on flips, prune once. Kept apart from
    # the step rules above: each is a function of the step (and of the weights at the switch).

    def _apply_ramp(self) -> None:
        """Give every layer the threshold ramp of the step about to be trained."""
        r = self.ramp_at(self.step) if self.phase == "sparse" else 1.0
        for _, layer in self._layers:
            if layer.ramp != r:
                layer.ramp = r
                layer._mask_version += 1  # W~ changes with r: a cached compressed W~ is stale

    @torch.no_grad()
    def _reset_flipped_moments(self, layer: SparseLinear, flipped: torch.Tensor) -> None:
        """Zero the Adam moments of the weights whose mask entry flipped in this step."""
        state = self._optimizer.state.get(layer.weight) if self._optimizer is not None else None
        if not state:
            return
        keys = ("exp_avg", "exp_avg_sq") if self.config.flip_moments == "reset" else ("exp_avg",)
        for key in keys:
            if key in state:
                local_tensor(state[key]).masked_fill_(flipped, 0)

    def _calibration_window(self) -> Tuple[int, int]:
        end = self.sparse_from_step()
        return max(0, end - self.config.prune_calibration_steps), end

    def _update_calibration_hooks(self) -> None:
        """Wanda's input statistics: hooks on the sparse layers while the calibration window is open."""
        cfg = self.config
        start, end = self._calibration_window() if cfg.prune_at is not None else (0, 0)
        want = cfg.prune_method == "wanda" and start <= self.step < end
        if want and not self._calib_hooks:
            for name, layer in self._layers:
                self._calib_hooks.append(layer.register_forward_pre_hook(self._calibration_hook(name)))
        elif not want and self._calib_hooks:
            for handle in self._calib_hooks:
                handle.remove()
            self._calib_hooks = []

    def _calibration_hook(self, name: str):
        def hook(module, args):
            if not (module.training and torch.is_grad_enabled()):
                return  # validation batches are not calibration data
            with torch.no_grad():
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in)
                sq = (x * x).sum(0)
                acc = self._calib.get(name)
                self._calib[name] = sq if acc is None else acc + sq
        return hook

    @torch.no_grad()
    def _prune_once(self) -> None:
        """``prune_at``: W <- the N:M pruned W (magnitude or Wanda), once, before sparse training starts."""
        from .pruning.methods import magnitude_prune, wanda_prune

        cfg = self.config
        if cfg.prune_method == "wanda":
            missing = [name for name, _ in self._layers if name not in self._calib]
            if missing:
                raise RuntimeError(
                    f"`prune_method`='wanda' saw no training input for {', '.join(missing[:3])} in the "
                    f"{cfg.prune_calibration_steps} step(s) before `prune_at`; the layers must run in training mode."
                )
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # Every data-parallel rank prunes with the same statistics: one all-reduce for all layers.
                flat = torch.cat([self._calib[name] for name, _ in self._layers])
                torch.distributed.all_reduce(flat)
                for (name, _), part in zip(self._layers, flat.split([self._calib[n].numel() for n, _ in self._layers])):
                    self._calib[name] = part
        for name, layer in self._layers:
            w = local_tensor(layer.weight.detach())
            if cfg.prune_method == "wanda":
                pruned, _ = wanda_prune(w, torch.diag(self._calib[name]), cfg.n, cfg.m)
            else:
                pruned, _ = magnitude_prune(w, cfg.n, cfg.m)
            w.copy_(pruned.to(w.dtype))
        self._calib = {}
        log.info("Sparsifier: pruned %d layer(s) to %d:%d (%s) at optimizer step %d",
                 len(self._layers), cfg.n, cfg.m, cfg.prune_method, self.step)

    def _weight_error(self, name: str, what: str) -> None:
        raise FloatingPointError(
            f"Sparse layer `{name}`'s weight holds {what} after optimizer step {self.step}. Lower the learning "
            f"rate, enable gradient clipping, or use `on_nonfinite='skip'` to skip steps with non-finite gradients."
        )

    def _check_weights_finite(self) -> None:
        """NaN/inf in any sparse weight: one min/max pass per layer and one host sync for all."""
        bad = _nonfinite_flags([local_tensor(layer.weight.detach()) for _, layer in self._layers])
        self._all_reduce(bad)
        for (name, _), flag in zip(self._layers, bad.tolist()):
            if flag:
                self._weight_error(name, "NaN/inf value(s)")

    def _first_nonfinite(self) -> Optional[str]:
        """The name of the first layer whose gradient holds NaN/inf (one host sync for all)."""
        tensors, names = [], []
        for name, layer in self._layers:
            t = layer.weight.grad
            if t is not None:
                tensors.append(local_tensor(t))
                names.append(name)
        if not tensors:
            return None
        flags = _nonfinite_flags(tensors)
        self._all_reduce(flags)
        flags = flags.tolist()
        for name, flag in zip(names, flags):
            if flag:
                return name
        return None

    def _nonfinite(self, name: str, what: str) -> None:
        step = self.step + 1
        if self.config.on_nonfinite == "skip":
            warnings.warn(
                f"Sparse layer `{name}`'s {what} holds NaN/inf at optimizer step {step}: the step is skipped "
                f"(on_nonfinite='skip').",
                stacklevel=4,
            )
            self._skip_step = True
            # No gradient, no update: optimizers skip parameters whose .grad is None.
            if self._optimizer is not None:
                for group in self._optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
            return
        raise FloatingPointError(
            f"Sparse layer `{name}`'s {what} holds NaN/inf at optimizer step {step}. Lower the learning rate, "
            f"enable gradient clipping, or set `on_nonfinite='skip'` to skip such steps."
        )

    # ------------------------------------------------------------------------------ checkpoint
    def config_fingerprint(self) -> Dict[str, Any]:
        """The config fields that change the math, as a resume compares them."""
        return {f: _describe(getattr(self.config, f)) for f in MATH_FIELDS}

    def state_dict(self) -> Dict[str, Any]:
        """What a resume needs besides the model's own state dict (which holds weights, beta and
        transposable masks): the step, the phase and the config fingerprint."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "phase": self.phase,
            "max_steps": self.max_steps,
            "swapped": list(self.swapped),
            "config": self.config_fingerprint(),
            "calibration": {k: v.detach().cpu().clone() for k, v in self._calib.items()},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a `state_dict` (also the Lightning callback's format before 0.2).

        Raises:
            ValueError: the checkpoint was trained with a different value of a field that
                changes the math, or with other layers sparse; the message names it.
        """
        if not isinstance(state, dict):
            raise TypeError(f"`state` must be a dict from Sparsifier.state_dict(), got {type(state).__name__}")
        saved = state.get("config") or {k: state[k] for k in ("method", "n", "m") if k in state}
        mine = self.config_fingerprint()
        for field, value in saved.items():
            if field in mine and value != mine[field] and not (field == "targets" and str(value).startswith("<callable")):
                raise ValueError(
                    f"Cannot resume: the checkpoint was trained with sparsity.{field}={value!r}, this run has "
                    f"sparsity.{field}={mine[field]!r}. Resume with the checkpoint's value, or start a new run."
                )
        swapped = state.get("swapped")
        if swapped is not None and list(swapped) != list(self.swapped):
            raise ValueError(
                f"Cannot resume: the checkpoint's sparse layers ({len(swapped)}: {', '.join(swapped[:3])}...) differ from "
                f"this model's ({len(self.swapped)}: {', '.join(self.swapped[:3])}...). Use the checkpoint's `targets`."
            )
        if "step" in state:
            self.step = int(state["step"])
        if state.get("max_steps") is not None and self.max_steps is None:
            self.max_steps = int(state["max_steps"])
        phase = state.get("phase")
        if phase is None and "dense_phase" in state:  # the 0.1 callback format
            phase = "dense" if state["dense_phase"] else "sparse"
        if phase is not None:
            self.phase = phase
        self._calib = {}
        for name, value in (state.get("calibration") or {}).items():
            layer = dict(self._layers).get(name)
            self._calib[name] = value.to(layer.weight.device) if layer is not None else value
        self._restored = True
        self._started = False  # `attach` / `start` apply it
        for _, layer in self._layers:
            layer._mask_version += 1

    def __repr__(self) -> str:
        c = self.config
        return (f"Sparsifier({c.method} {c.n}:{c.m}, {len(self.swapped)} layer(s), step={self.step}, "
                f"phase={self.phase}{', attached' if self._hooks else ''})")
