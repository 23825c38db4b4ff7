"""`prune`: one-shot N:M pruning of a trained model, layer by layer on calibration data.

The driver walks a causal LM's decoder blocks in order. The inputs of block ``i`` are the outputs
of the already-pruned blocks before it, and inside a block the target layers are pruned in the
order the forward pass calls them, grouped by shared input (q/k/v together, then the attention
output, then the MLP input layers, then the MLP output): every layer is fitted to the inputs it will
actually see after pruning. Only one block's activations are kept at a time. Models without a
decoder block list are treated as a single block fed with the calibration batches.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..ops.nm import check_nm
from ..ops.transposable import transposable_mask
from .calibration import (
    GramCollector,
    StopForward,
    Targets,
    find_blocks,
    layer_weight,
    record_call_order,
    select_targets,
    set_layer_weight,
)
from .methods import dead_inputs, local_loss
from .prox import compile_plan, prox_prune, warm_up
from .refine import REFINE_SOLVERS, refine_masked
from .registry import PRUNE_METHODS, PRUNERS

__all__ = ["prune", "PruneReport", "LayerReport", "PRUNE_METHODS"]

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    """What happened to one layer.

    ``rel_error`` is ``||X (W - W^)^T|| / ||X W^T||`` over the calibration inputs the layer saw,
    computed from ``H`` as ``sqrt(tr((W - W^) H (W - W^)^T) / tr(W H W^T))``.
    """

    name: str
    shape: Tuple[int, int]
    tokens: int
    rel_error: float
    rel_error_before_refine: float
    refine_iters: int
    seconds: float
    prox_iters: Optional[int] = None
    prox_hit_cap: Optional[bool] = None


@dataclass
class PruneReport:
    """Per-layer results of `prune`; ``print(report)`` shows a table, ``to_dict()`` is JSON-ready."""

    method: str
    n: int
    m: int
    refine_steps: int
    transposable: bool
    layers: List[LayerReport] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_rel_error(self) -> float:
        """Mean of the per-layer relative reconstruction errors."""
        return sum(l.rel_error for l in self.layers) / max(len(self.layers), 1)

    @property
    def prox_hit_cap(self) -> List[str]:
        """Names of layers where the prox loop hit its cap and was projected onto 2:4."""
        return [l.name for l in self.layers if l.prox_hit_cap]

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["mean_rel_error"] = self.mean_rel_error
        d["prox_hit_cap_layers"] = self.prox_hit_cap
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self) -> str:
        """A fixed-width text table, one line per layer plus a summary line."""
        name_w = max([len(l.name) for l in self.layers] + [5])
        head = f"{'layer':<{name_w}}  {'shape':>11}  {'tokens':>7}  {'rel.err':>8}  {'before':>8}  {'refine':>6}  {'prox it':>7}  {'cap':>3}  {'time s':>7}"
        lines = [head, "-" * len(head)]
        for l in self.layers:
            shape = f"{l.shape[0]}x{l.shape[1]}"
            pit = "" if l.prox_iters is None else str(l.prox_iters)
            cap = "" if l.prox_hit_cap is None else ("yes" if l.prox_hit_cap else "no")
            lines.append(
                f"{l.name:<{name_w}}  {shape:>11}  {l.tokens:>7}  {l.rel_error:>8.4f}  {l.rel_error_before_refine:>8.4f}"
                f"  {l.refine_iters:>6}  {pit:>7}  {cap:>3}  {l.seconds:>7.2f}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{self.method} {self.n}:{self.m}{' transposable' if self.transposable else ''}: {len(self.layers)} layers, "
            f"mean rel.err {self.mean_rel_error:.4f}, {self.seconds:.1f} s"
        )
        for name, why in self.skipped:
            lines.append(f"skipped {name}: {why}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _parse_method(method: str) -> Tuple[str, bool]:
    if not isinstance(method, str):
        raise TypeError(f"`method` must be a string, got {method!r}")
    base, plus, suffix = method.partition("+")
    if base not in PRUNE_METHODS or (plus and suffix != "refine"):
        choices = ", ".join(repr(c) for b in PRUNE_METHODS for c in (b, b + "+refine"))
        raise ValueError(f"Unknown `method`={method!r}; valid choices: {choices}")
    # Prox always ends with the masked refinement (it is part of the method in the paper).
    return base, bool(plus) or base == "prox"


def _as_batches(calibration, device) -> List[Tuple[tuple, dict]]:
    """Calibration batches as ``(args, kwargs)`` for ``model(*args, **kwargs)``."""
    if calibration is None or isinstance(calibration, (str, bytes)):
        raise TypeError(f"`calibration` must be an iterable of token batches, got {calibration!r}")
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]  # one batch [B, T]
    out = []
    for i, b in enumerate(calibration):
        if isinstance(b, torch.Tensor):
            if b.numel() == 0:
                raise ValueError(f"`calibration` batch {i} is empty (shape {tuple(b.shape)})")
            if b.dtype in (torch.int64, torch.int32):
                out.append(((), {"input_ids": b.to(device=device, dtype=torch.long)}))
            else:
                out.append(((b.to(device),), {}))
        elif isinstance(b, dict):
            if "input_ids" not in b:
                raise ValueError(f"`calibration` batch {i} is a dict without 'input_ids' (keys: {sorted(b)})")
            if b["input_ids"].numel() == 0:
                raise ValueError(f"`calibration` batch {i} has empty 'input_ids'")
            kw = {k: v.to(device) for k, v in b.items() if isinstance(v, torch.Tensor) and k != "labels"}
            out.append(((), kw))
        else:
            raise TypeError(
                f"`calibration` batch {i} must be a LongTensor [B, T] or a dict with 'input_ids', got {type(b).__name__}"
            )
    if not out:
        raise ValueError("`calibration` is empty: pass at least one batch of token ids")
    return out


def _model_runner(model: nn.Module):
    # transformers models would otherwise fill a KV cache on every calibration pass.
    hf = getattr(getattr(model, "config", None), "use_cache", None) is not None

    def run(batch):
        args, kwargs = batch
        if hf and not args:
            kwargs = {**kwargs, "use_cache": False}
        return model(*args, **kwargs)

    return run


def _quiet(run, batch):
    try:
        return run(batch)
    except StopForward:
        return None


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches) -> List[Tuple[tuple, dict]]:
    """The positional and keyword inputs of ``block`` for every calibration batch."""
    captured: List[Tuple[tuple, dict]] = []

    def pre_hook(module, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise StopForward

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    run = _model_runner(model)
    try:
        for b in batches:
            _quiet(run, b)
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise ValueError("The first decoder block was not called by the model's forward pass on the calibration batches")
    return captured


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_hidden(inp: Tuple[tuple, dict], hidden: torch.Tensor) -> Tuple[tuple, dict]:
    args, kwargs = inp
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _rel_error(w_hat, w, h) -> float:
    den = float(local_loss(torch.zeros_like(w), w, h))
    num = float(local_loss(w_hat, w, h))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


class _NoBar:
    """Stands in for the tqdm bar when there is none: the per-layer lines still print."""

    def write(self, line: str) -> None:
        print(line, flush=True)

    def set_postfix_str(self, *args, **kwargs):
        pass

    def update(self, *args):
        pass

    def close(self):
        pass


def _progress_bar(total: int, desc: str, show: bool):
    """A tqdm bar over layers; tqdm is not a base dependency (it comes with the app extra)."""
    if not show:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:
        warnings.warn("`progress`=True needs tqdm, which is not installed (pip install tqdm); pruning without "
                      "a progress bar (the per-layer lines still print)", stacklevel=3)
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="layer")


def prune(
    model: nn.Module,
    calibration: Iterable,
    method: str = "prox",
    n: int = 2,
    m: int = 4,
    refine_steps: int = 1000,
    targets: Targets = None,
    transposable: bool = False,
    *,
    refine_solver: str = "cg",
    lambda0: float = 0.01,
    beta: float = 1.025,
    max_prox_iters: int = 3000,
    prox_accelerate: bool = True,
    prox_idle_beta: Optional[float] = 1.2,
    damp: float = 0.01,
    block_size: int = 128,
    transposable_method: Optional[str] = None,
    progress: bool = False,
) -> PruneReport:
    """Prune ``model`` in place to N:M sparsity, layer by layer, and report the local errors.

    Each target layer is fitted to its calibration inputs by minimising the local loss
    ``||X W^T - X W^^T||^2`` with ``W^`` N:M sparse along the input dimension.

    Methods (``method``):
        * ``"magnitude"``: keep the largest ``|W|``.
        * ``"wanda"``: keep the largest ``|W_ij| * ||X_j||``.
        * ``"sparsegpt"``: OBS updates with adaptive N:M masks (``damp``, ``block_size``).
        * ``"prox"``: proximal gradient with the 2:4 regulariser of Kübler et al. (2025), with
          lambda growing geometrically from ``lambda0`` until every group is 2:4 (at most
          ``max_prox_iters`` iterations, then projected; the report says so). 2:4 only.

    Refinement rule: ``refine_steps`` iterations of masked refinement (see `refine_masked`,
    ``refine_solver``) run after ``"prox"`` always (it is part of that method) and after the other
    methods only when ``"+refine"`` is appended (``"wanda+refine"``, ``"sparsegpt+refine"``,
    ``"magnitude+refine"``; ``"prox+refine"`` means ``"prox"``). ``refine_steps=0`` turns
    refinement off everywhere, e.g. for prox without it.

    Args:
        model: a ``transformers`` causal LM (GPT-2, Llama, OPT, ... ; decoder blocks found by
            attribute path or as the largest list of same-class blocks) or any module whose
            target layers are ``nn.Linear`` / ``Conv1D``.
        calibration: iterable of batches: ``LongTensor [B, T]`` token ids, dicts with
            ``"input_ids"`` (other tensor entries such as ``attention_mask`` are passed along), or,
            for non-LM models, float input tensors.
        method: see above.
        n, m: keep ``n`` of every ``m`` weights along the input dimension.
        refine_steps: iteration cap of the masked refinement.
        targets: ``None`` (every Linear/Conv1D in the decoder blocks, so not the LM head or
            embeddings), a regex searched in qualified module names, or ``(module, name) -> bool``.
        transposable: use masks that are N:M along rows and columns of every ``m x m`` tile
            (`sparsetrain.ops.transposable_mask` on the method's score; for prox, on the prox
            result; SparseGPT then updates weights under that fixed mask). Needs both dims
            divisible by ``m``.
        refine_solver: ``"cg"`` (default) or ``"gd"``.
        lambda0, beta, max_prox_iters, prox_accelerate, prox_idle_beta: the prox schedule
            (see `prox_prune`). The defaults take FISTA-accelerated steps with lambda growing by
            1.025 per step (1.2 while no group is being decided); the paper's schedule is
            ``beta=1.01, prox_accelerate=False, prox_idle_beta=None``, with ~4x the iterations
            and a higher perplexity on `benchmarks/prune_quality.py`.
        damp: SparseGPT's damping, a fraction of the mean diagonal of ``H``.
        block_size: SparseGPT's lazy-update block width in columns.
        transposable_method: passed to `transposable_mask` as ``method`` (``None``: its default).
        progress: show a tqdm bar over layers, one line per pruned layer (its error and time), and,
            for prox, a line before its steps are compiled.

    Returns:
        A `PruneReport`.

    Raises:
        ValueError: unknown method, no matching layer, empty calibration data, a target whose
            input dim (or output dim, with ``transposable``) is not a multiple of ``m``.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=2))
        >>> report = prune(model, [torch.randint(0, 256, (2, 16))], method="wanda")
        >>> print(report)  # doctest: +SKIP
    """
    base, do_refine = _parse_method(method)
    pruner = PRUNERS[base]
    options = {k: v for k, v in (("damp", damp), ("block_size", block_size)) if k in pruner.options}
    check_nm(n, m)
    if base == "prox" and (n, m) != (2, 4):
        raise ValueError(f"`method`='prox' implements the 2:4 regulariser only; got n={n}, m={m}")
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"`refine_steps` must be an int >= 0, got {refine_steps!r}")
    if refine_solver not in REFINE_SOLVERS:
        raise ValueError(f"Unknown `refine_solver`={refine_solver!r}; valid choices: {', '.join(map(repr, REFINE_SOLVERS))}")
    if not (isinstance(lambda0, (int, float)) and lambda0 > 0 and math.isfinite(lambda0)):
        raise ValueError(f"`lambda0` must be a finite number > 0, got {lambda0!r}")
    if not (isinstance(beta, (int, float)) and beta > 1 and math.isfinite(beta)):
        raise ValueError(f"`beta` must be a finite number > 1 (lambda must grow), got {beta!r}")
    if prox_idle_beta is not None and not (isinstance(prox_idle_beta, (int, float)) and prox_idle_beta > 1
                                           and math.isfinite(prox_idle_beta)):
        raise ValueError(f"`prox_idle_beta` must be None or a finite number > 1, got {prox_idle_beta!r}")
    if not isinstance(prox_accelerate, bool):
        raise ValueError(f"`prox_accelerate` must be True or False, got {prox_accelerate!r}")
    if isinstance(max_prox_iters, bool) or not isinstance(max_prox_iters, int) or max_prox_iters < 1:
        raise ValueError(f"`max_prox_iters` must be an int >= 1, got {max_prox_iters!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")

    blocks = find_blocks(model)
    chosen, skipped = select_targets(model, targets, within=blocks[0] if blocks else None)
    if not chosen:
        where = f" inside the decoder blocks `{blocks[0]}`" if blocks else ""
        raise ValueError(f"`targets`={targets!r} matched no nn.Linear / Conv1D layer{where} of {type(model).__name__}")
    bad = []
    for name, mod in chosen.items():
        out_f, in_f = layer_weight(mod).shape
        if in_f % m or (transposable and out_f % m):
            bad.append(f"{name} [out={out_f}, in={in_f}]")
    if bad:
        need = "both dimensions" if transposable else "the input dimension"
        raise ValueError(f"{need} of every target must be a multiple of m={m}; not so for: {', '.join(bad)}. "
                         f"Exclude them with `targets`.")

    device = next(model.parameters()).device
    batches = _as_batches(calibration, device)
    report = PruneReport(method=method, n=n, m=m, refine_steps=refine_steps if do_refine else 0,
                         transposable=transposable, skipped=list(skipped))
    t_start = time.perf_counter()
    bar = _progress_bar(len(chosen), f"pruning ({method})", progress)
    # The first compilation of a process takes ~5 s (inductor's disk cache) to minutes (none): small
    # models are pruned eagerly, which is faster then (bitwise the same results, `prox.compile_plan`).
    plan = compile_plan([layer_weight(mod) for mod in chosen.values()]) if base == "prox" else "compiled"
    if plan == "compile":
        if progress:
            bar.write("compiling the prox steps (once per process: seconds with inductor's disk cache, up to "
                      "minutes without)...")
        warm_up()  # here, not inside the first layer's time

    def prune_one(name: str, mod: nn.Module, h: torch.Tensor, tokens: int) -> None:
        t0 = time.perf_counter()
        w = layer_weight(mod).float().clone()  # (out, in) float32, kept apart from the layer it rewrites
        diag = h.diagonal()
        # Wanda-style normalisation; an input that is always zero keeps scale 1 (its H row is 0).
        d = torch.where(diag > 0, diag.clamp_min(0).sqrt(), torch.ones_like(diag))
        # Weights on inputs that are always zero (dead ReLU neurons) never act on data: zeroed, they
        # leave the local loss unchanged and take no N:M slot from a live input (as SparseGPT does).
        v0 = (w * d).masked_fill(dead_inputs(h).unsqueeze(0), 0.0)  # (out, in)
        hn = h / d.unsqueeze(1) / d.unsqueeze(0)  # (in, in), unit diagonal where inputs are alive
        tmask = None
        if transposable and pruner.score is not None:
            tmask = _transposable(pruner.score(w, h, **options), n, m, transposable_method)
        prox_iters = hit_cap = None
        if pruner.prune is not None:
            w_hat, mask = pruner.prune(w, h, n, m, mask=tmask, **options)
        else:  # prox: its schedule runs here, on the normalised problem, and reports its iterations
            res = prox_prune(v0, hn, lambda0=lambda0, beta=beta, max_iters=max_prox_iters,
                             accelerate=prox_accelerate, idle_beta=prox_idle_beta, eager=plan == "eager")
            prox_iters, hit_cap = res.iterations, res.hit_cap
            v, mask = res.weight, res.mask
            if hit_cap:
                log.warning("prox hit its %d-iteration cap on %s; projected onto 2:4", max_prox_iters, name)
            if transposable:
                score = (v != 0).float() * 2 + v0.abs() / v0.abs().max().clamp_min(1e-30)
                mask = _transposable(score, n, m, transposable_method)
                v = v * mask
            w_hat = v / d
        before = _rel_error(w_hat, w, h)
        iters = 0
        if do_refine and refine_steps > 0:
            v, iters = refine_masked(w_hat * d, v0, hn, mask, refine_steps, refine_solver)
            w_hat = v / d
        w_hat = w_hat * mask  # exact zeros outside the mask
        set_layer_weight(mod, w_hat)
        report.layers.append(LayerReport(
            name=name, shape=(int(w.shape[0]), int(w.shape[1])), tokens=int(tokens),
            rel_error=_rel_error(w_hat, w, h), rel_error_before_refine=before, refine_iters=int(iters),
            seconds=time.perf_counter() - t0, prox_iters=prox_iters, prox_hit_cap=hit_cap,
        ))
        if progress:  # a line per layer: the bar alone says nothing during a long layer
            layer = report.layers[-1]
            extra = "" if prox_iters is None else f", {prox_iters} prox iterations"
            bar.write(f"  {name} [{layer.shape[0]}x{layer.shape[1]}]: rel.err {layer.rel_error:.4f}, "
                      f"{layer.seconds:.1f} s{extra}")
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if blocks is not None:
                path, block_list = blocks
                inputs = _capture_block_inputs(model, block_list[0], batches)
                for i, block in enumerate(block_list):
                    prefix = f"{path}.{i}."
                    layers = {k: v for k, v in chosen.items() if k.startswith(prefix)}

                    def run_block(inp, _block=block):
                        return _block(*inp[0], **inp[1])

                    if layers:
                        _prune_sequential(run_block, inputs, layers, prune_one, report)
                    if i + 1 < len(block_list):
                        inputs = [_with_hidden(inp, _hidden(run_block(inp))) for inp in inputs]
            else:
                _prune_sequential(_model_runner(model), batches, chosen, prune_one, report)
    finally:
        bar.close()
        model.train(was_training)
    report.seconds = time.perf_counter() - t_start
    return report


def _transposable(score: torch.Tensor, n: int, m: int, method: Optional[str]) -> torch.Tensor:
    kw = {} if method is None else {"method": method}
    return transposable_mask(score, n, m, **kw).to(torch.bool)


def _prune_sequential(run, inputs, layers: Dict[str, nn.Module], prune_one, report: PruneReport) -> None:
    """Prune ``layers`` group by group, each group calibrated after the previous one was pruned."""
    groups, counts = record_call_order(lambda: _quiet(run, inputs[0]), layers)
    for name, c in counts.items():
        if c == 0:
            report.skipped.append((name, "never called in the forward pass on the calibration data"))
    # Ending each pass right after the group's last layer saves the rest of the block; only safe
    # when no layer is called twice (shared weights would miss their later calls).
    early_stop = all(c <= 1 for c in counts.values())
    for group in groups:
        sub = {name: layers[name] for name in group}
        with GramCollector(sub, stop_after=group[-1] if early_stop else None) as gc:
            for inp in inputs:
                _quiet(run, inp)
        for name in group:
            prune_one(name, layers[name], gc.mean_gram(name), gc.tokens[name])
