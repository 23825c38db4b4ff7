"""The 2:4 proximal operator of Kübler et al. (2025) and the proximal-gradient pruner built on it.

The regulariser of one group ``w`` of four weights is the third elementary symmetric polynomial of
the magnitudes,

    R(w) = sum_{i<j<k} |w_i w_j w_k|,

which is zero exactly when at most two entries are non-zero. Its proximal operator
``prox(z) = argmin_w 0.5 ||w - z||^2 + lam R(w)`` has no closed form, but it splits cleanly:

* Signs: flipping ``w_i`` to the sign of ``z_i`` never raises ``(w_i - z_i)^2`` and leaves ``R``
  unchanged, so ``prox(z) = sign(z) * prox(|z|)`` and we may work with ``a = |z| >= 0``, ``w >= 0``.
* Order: if ``a_i > a_j`` but ``w_i < w_j``, swapping ``w_i`` and ``w_j`` keeps ``R`` and lowers the
  quadratic (rearrangement inequality), so the solution is sorted like ``a``.
* Support: the solution has 2, 3 or 4 non-zeros (with fewer than 2, restoring the largest missing
  entry only helps). With two, ``R = 0`` and the best choice keeps the two largest ``a``. With three
  (the three largest, by the order argument) or four, ``R`` is multilinear on the non-negative
  orthant: fixing all coordinates but one leaves ``0.5 (w_i - a_i)^2 + lam w_i c_i`` with
  ``c_i >= 0`` the sum of products of the others, minimised exactly by ``w_i = max(a_i - lam c_i, 0)``.
  Cyclic exact coordinate minimisation started at ``a`` decreases the objective monotonically and
  converges to the local minimiser next to ``a``.

We evaluate the three candidates and keep the one of least objective (fewest non-zeros on ties).
`tests/test_pruning.py` checks the result against a dense multi-start numerical minimisation and
against a plain per-group loop.

Speed. The pruner runs a few hundred proximal iterations per layer (~1100-1300 with the paper's
schedule, ~250-400 with FISTA steps and the faster idle phases that `prune` uses), each a few
hundred element-wise ops over all groups plus one ``[in, in] x [in, out]`` product. `prox_prune`
keeps the weights transposed and member-major (member i of every group is one contiguous block),
finds the sorted magnitudes with a min/max sorting network and each member's rank with six
comparisons instead of `torch.sort`, and on large CPU inputs runs the element-wise work as two
inductor-compiled calls per iteration (`_start`, `_end`): on small layers the per-call overhead
of a compiled function, not the arithmetic, sets the time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..ops._compiled import Compiled
from ..ops.nm import group_view, nm_mask, project_nm

__all__ = ["prox_2to4", "regularizer_2to4", "ProxResult", "prox_prune", "lambda_max"]

# Coordinate minimisation of the 3- and 4-non-zero candidates: a change below the tolerance
# (relative to the largest |z| of the group) counts as converged. Most groups need 10-30 sweeps;
# only groups near the lam where a candidate collapses converge slowly. float64 (used by the
# tests against brute force) runs to near machine precision; float32, used inside the
# thousand-iteration prox loop, stops earlier: 60 sweeps at 1e-6 changed the support of ~2 in
# 16k groups and cut the time of a call by ~3x (512x128 weights, lam=10).
_PROX_SWEEPS = {torch.float64: (1e-10, 1000), torch.float32: (1e-6, 60)}


def regularizer_2to4(w: torch.Tensor) -> torch.Tensor:
    """``R(w) = sum_{i<j<k} |w_i w_j w_k|`` for every group of 4 along the last dim.

    Args:
        w: tensor whose last dim is a multiple of 4.

    Returns:
        Tensor of shape ``w.shape[:-1] + (w.shape[-1] // 4,)``.

    Example:
        >>> regularizer_2to4(torch.tensor([1.0, 2.0, 0.0, 3.0]))
        tensor([6.])
    """
    a = group_view(w, 4).abs()  # (..., G, 4)
    a0, a1, a2, a3 = a.unbind(-1)
    return a0 * a1 * (a2 + a3) + a2 * a3 * (a0 + a1)


def _check_lam(lam) -> float | torch.Tensor:
    if isinstance(lam, bool) or not isinstance(lam, (int, float, torch.Tensor)):
        raise TypeError(f"`lam` must be a non-negative number, got {lam!r} ({type(lam).__name__})")
    if isinstance(lam, torch.Tensor):
        if lam.numel() != 1:
            raise ValueError(f"`lam` must be a scalar, got a tensor of shape {tuple(lam.shape)}")
        lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"`lam` must be a finite number >= 0, got {lam!r}")
    return float(lam)


def prox_2to4(z: torch.Tensor, lam: float) -> torch.Tensor:
    """Proximal operator of ``lam * R`` on every group of 4 consecutive entries of the last dim.

    Returns ``argmin_w 0.5 ||w - z||^2 + lam * R(w)`` group by group, where
    ``R(w) = sum_{i<j<k} |w_i w_j w_k|`` (see the module docstring for the derivation). For large
    ``lam`` the result is 2:4 sparse; for ``lam = 0`` it is ``z``.

    Args:
        z: input tensor, last dim a multiple of 4. Any float dtype; the solve runs in float32 or
            float64 (the wider of ``z.dtype`` and float32) and returns ``z.dtype``.
        lam: regularisation strength, a finite number ``>= 0``.

    Returns:
        Tensor of the shape and dtype of ``z``.

    Example:
        >>> prox_2to4(torch.tensor([3.0, 2.0, 1.0, 0.5]), 10.0)
        tensor([3., 2., 0., 0.])
    """
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"`z` must be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"`z` must be a floating-point tensor, got dtype {z.dtype}")
    lam = _check_lam(lam)
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    g = group_view(z, 4, "z").to(work).reshape(-1, 4)  # (P, 4): every group as a row
    zb = g.T.contiguous()  # (4, P): member-major, the layout `_prox_blocked` works in
    out, _ = _prox_blocked(zb, lam)
    return out.T.reshape(z.shape).to(z.dtype)


def _ranks(a0, a1, a2, a3):
    """Each member's rank in its group by descending magnitude, ties to the lower index (as a
    stable descending sort orders them): ``#{j < k: a_j >= a_k} + #{j > k: a_j > a_k}``, from the
    six pairwise comparisons, as float32 (0..3, exact)."""
    c01, c02, c03 = (a0 >= a1).float(), (a0 >= a2).float(), (a0 >= a3).float()
    c12, c13, c23 = (a1 >= a2).float(), (a1 >= a3).float(), (a2 >= a3).float()
    return 3 - c01 - c02 - c03, c01 + 2 - c12 - c13, c02 + c12 + 1 - c23, c03 + c13 + c23


def _prepare(a0, a1, a2, a3, lam: torch.Tensor):
    """From the magnitudes of each group's members (four flat ``[C]`` tensors): the sorted
    magnitudes ``s0 >= s1 >= s2 >= s3`` and which groups are contested (may not take the
    two-non-zero candidate)."""
    # Magnitudes sorted descending by a sorting network of five compare-exchanges (values only;
    # which of two equal values goes first does not matter here).
    hi01, lo01 = torch.maximum(a0, a1), torch.minimum(a0, a1)
    hi23, lo23 = torch.maximum(a2, a3), torch.minimum(a2, a3)
    s0, mid_hi = torch.maximum(hi01, hi23), torch.minimum(hi01, hi23)
    mid_lo, s3 = torch.maximum(lo01, lo23), torch.minimum(lo01, lo23)
    s1, s2 = torch.maximum(mid_hi, mid_lo), torch.minimum(mid_hi, mid_lo)
    # Screening. At any fixed point of the coordinate updates (`_sweeps3`, `_sweeps4`), x_i <= a_i,
    # hence x_i >= l_i = max(a_i - lam * (products of the other a's), 0). If even those lower
    # bounds force x2 = 0 in the three-candidate and x3 = 0 in the four-candidate, every fixed
    # point of both is the two-candidate, which then wins. Late in the lambda schedule almost
    # every group is settled this way; only the contested ones decide when the sweeps stop.
    l0 = (s0 - lam * s1 * s2).clamp_min(0)
    l1 = (s1 - lam * s0 * s2).clamp_min(0)
    three_collapses = s2 <= lam * l0 * l1
    m0 = (s0 - lam * (s1 * s2 + s1 * s3 + s2 * s3)).clamp_min(0)
    m1 = (s1 - lam * (s0 * s2 + s0 * s3 + s2 * s3)).clamp_min(0)
    m2 = (s2 - lam * (s0 * s1 + s0 * s3 + s1 * s3)).clamp_min(0)
    four_collapses = s3 <= lam * (m0 * m1 + m0 * m2 + m1 * m2)
    return s0, s1, s2, s3, ~(three_collapses & four_collapses)


def _start(z: torch.Tensor, lam: torch.Tensor, rel_tol: float):
    """The first half of the prox of groups laid out ``[4, C]``: sorted magnitudes, contested
    groups, each group's convergence tolerance (relative to its largest magnitude; infinite for the
    uncontested, whose candidates are discarded) and the first `_START_CHUNKS` chunks of coordinate
    sweeps of the three- and four-non-zero candidates, started at the sorted magnitudes. ``[C]``
    outputs."""
    a0, a1, a2, a3 = z.abs().unbind(0)
    s0, s1, s2, s3, contested = _prepare(a0, a1, a2, a3, lam)
    tol = torch.where(contested, rel_tol * s0.clamp_min(torch.finfo(z.dtype).tiny), float("inf"))
    x0, x1, x2, done3 = _sweeps3(s0, s1, s2, s0, s1, s2, lam, tol)
    y0, y1, y2, y3, done4 = _sweeps4(s0, s1, s2, s3, s0, s1, s2, s3, lam, tol)
    for _ in range(_START_CHUNKS - 1):
        x0, x1, x2, done3 = _sweeps3(s0, s1, s2, x0, x1, x2, lam, tol)
        y0, y1, y2, y3, done4 = _sweeps4(s0, s1, s2, s3, y0, y1, y2, y3, lam, tol)
    return s0, s1, s2, s3, contested, tol, x0, x1, x2, done3, y0, y1, y2, y3, done4


def _end(z: torch.Tensor, s0, s1, s2, s3, contested, x0, x1, x2, y0, y1, y2, y3, lam):
    """The second half: per group the best candidate (the two-non-zero one where uncontested), put
    back in ``z``'s layout and signs; and how many groups kept more than two non-zeros."""
    b0, b1, b2, b3 = _pick(s0, s1, s2, s3, x0, x1, x2, y0, y1, y2, y3, lam)
    zero = torch.zeros_like(s0)
    b0, b1 = torch.where(contested, b0, s0), torch.where(contested, b1, s1)
    b2, b3 = torch.where(contested, b2, zero), torch.where(contested, b3, zero)
    return _finish(z, b0, b1, b2, b3), (b2 != 0).sum()


def _finish(z: torch.Tensor, b0, b1, b2, b3) -> torch.Tensor:
    """The solution ``b`` (per rank, flat) in ``z``'s layout: member i takes the value of its rank (the solution is
    sorted like the magnitudes) and the sign of ``z_i`` (copysign: sign() is ~40x slower)."""
    a0, a1, a2, a3 = z.abs().unbind(0)
    out = []
    for r, zk in zip(_ranks(a0, a1, a2, a3), z.unbind(0)):
        v = torch.where(r == 0, b0, torch.where(r == 1, b1, torch.where(r == 2, b2, b3)))
        out.append(torch.copysign(v, zk))
    return torch.stack(out, 0)


# Sweeps run in chunks of this many between convergence checks: a sweep past convergence only
# moves the iterate closer to the same fixed point, and a chunk is one fused loop when compiled.
_CHUNK = 4
# Below this many groups everything runs eagerly: a compiled call costs ~50 us of guard and
# launch overhead, and 0 or 1 would make dynamo specialise the shape and compile again.
_COMPILE_MIN_GROUPS = 256
# Chunks that `_start` runs before the first convergence check: most contested groups converge
# within 4-8 sweeps, and a further compiled call costs more than 4 sweeps of every group.
_START_CHUNKS = 2


def _sweeps3(a0, a1, a2, x0, x1, x2, lam, tol):
    """``_CHUNK`` sweeps of exact cyclic coordinate minimisation of the three-non-zero candidate;
    returns the iterate and whether the last sweep moved every group by at most its ``tol``."""
    for _ in range(_CHUNK):
        p0, p1, p2 = x0, x1, x2
        x0 = (a0 - lam * x1 * x2).clamp_min(0)
        x1 = (a1 - lam * x0 * x2).clamp_min(0)
        x2 = (a2 - lam * x0 * x1).clamp_min(0)
    change = torch.maximum(torch.maximum((x0 - p0).abs(), (x1 - p1).abs()), (x2 - p2).abs())
    return x0, x1, x2, (change <= tol).all()


def _sweeps4(a0, a1, a2, a3, y0, y1, y2, y3, lam, tol):
    """As `_sweeps3` for the four-non-zero candidate (``c_i``: pairwise products of the others)."""
    for _ in range(_CHUNK):
        p0, p1, p2, p3 = y0, y1, y2, y3
        y0 = (a0 - lam * (y1 * y2 + y1 * y3 + y2 * y3)).clamp_min(0)
        y1 = (a1 - lam * (y0 * y2 + y0 * y3 + y2 * y3)).clamp_min(0)
        y2 = (a2 - lam * (y0 * y1 + y0 * y3 + y1 * y3)).clamp_min(0)
        y3 = (a3 - lam * (y0 * y1 + y0 * y2 + y1 * y2)).clamp_min(0)
    change = torch.maximum(torch.maximum((y0 - p0).abs(), (y1 - p1).abs()),
                           torch.maximum((y2 - p2).abs(), (y3 - p3).abs()))
    return y0, y1, y2, y3, (change <= tol).all()


def _pick(a0, a1, a2, a3, x0, x1, x2, y0, y1, y2, y3, lam):
    """The candidate of least objective per group: two non-zeros ``(a0, a1)``, three ``x`` or four
    ``y``; the fewest non-zeros wins ties (strict comparisons, 2 first)."""
    obj2 = 0.5 * (a2 ** 2 + a3 ** 2)
    obj3 = 0.5 * ((x0 - a0) ** 2 + (x1 - a1) ** 2 + (x2 - a2) ** 2 + a3 ** 2) + lam * x0 * x1 * x2
    r4 = y0 * y1 * (y2 + y3) + y2 * y3 * (y0 + y1)
    obj4 = 0.5 * ((y0 - a0) ** 2 + (y1 - a1) ** 2 + (y2 - a2) ** 2 + (y3 - a3) ** 2) + lam * r4
    use3 = obj3 < obj2
    use4 = obj4 < torch.where(use3, obj3, obj2)
    zero = torch.zeros_like(a0)
    return tuple(torch.where(use4, w4, torch.where(use3, w3, w2))
                 for w2, w3, w4 in ((a0, x0, y0), (a1, x1, y1), (zero, x2, y2), (zero, zero, y3)))


_START = Compiled(_start, "prox_prune", "several times slower")
_END = Compiled(_end, "prox_prune", "several times slower")
_SWEEPS3 = Compiled(_sweeps3, "prox_prune", "several times slower")
_SWEEPS4 = Compiled(_sweeps4, "prox_prune", "several times slower")


def _uses_compiled(z: torch.Tensor) -> bool:
    return z.device.type == "cpu" and z.numel() >= 4 * _COMPILE_MIN_GROUPS


_ALL = (_START, _END, _SWEEPS3, _SWEEPS4)


def compile_pending(v0: torch.Tensor) -> bool:
    """Whether `prox_prune` on ``v0`` would use element-wise steps not compiled yet in this process.

    Compiling them takes ~5 s when inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, by
    default ``/tmp/torchinductor_<user>``) already holds the kernels, and ~30 s to two minutes
    on a busy 2-core machine when it does not.
    """
    return _uses_compiled(v0) and any(not c.disabled and c.fn is None for c in _ALL)


# Up to this many weights in layers whose steps are not compiled yet, `prune` stays eager: the
# compile costs more than it saves. Measured with one thread on the loaded 2-core machine: eager
# adds ~0.3 s per layer plus ~11 us per weight to the compiled time (128x128: 0.52 vs 0.12 s;
# 512x512: 4.4 vs 1.5 s; 1024x1024: 19.7 vs 8.4 s), and compiling costs ~5 s with inductor's disk
# cache, 25-45 s without. `benchmarks/results/prune_first_use.json`: a 2x128 GPT-2 (0.39M
# weights) pruned in 7.2 s eagerly against 31.2 s compiling first with a cold cache; a 1x384 one
# (1.8M weights) in 38 s eagerly, 50 s compiling first (cold), 26 s with a warm cache. A compile
# in a background thread did not help there: its Python work holds the GIL against the eager
# loop's many small ops (51 s, in an earlier run of the same benchmark).
EAGER_MAX_WEIGHTS = 2_000_000


def compile_plan(weights) -> str:
    """How `prune` runs the prox on layers of these weights: ``"compiled"`` (compiled already, or
    no layer large enough to use it), ``"eager"`` (compiling would cost more than it saves: up to
    `EAGER_MAX_WEIGHTS` weights in layers that would use it) or ``"compile"`` (compile first)."""
    pending = [w for w in weights if compile_pending(w)]
    if not pending:
        return "compiled"
    return "eager" if sum(w.numel() for w in pending) <= EAGER_MAX_WEIGHTS else "compile"


def warm_up() -> None:
    """Compile the prox's element-wise steps by running them on a small problem (a few seconds
    once compiled). The extra sweep chunks run only for slowly converging groups, so they are
    called directly, without grad as the prox calls them (a change of grad mode recompiles)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    prox_prune(torch.randn(48, 64, generator=g), x.T @ x / 256, beta=1.3, accelerate=True)
    a = [torch.rand(1024, generator=g) for _ in range(4)]
    lam, tol = torch.tensor(0.5), torch.full((1024,), 1e-6)
    with torch.no_grad():
        _SWEEPS3(*a[:3], *[t.clone() for t in a[:3]], lam, tol)  # distinct tensors, as in use
        _SWEEPS4(*a, *[t.clone() for t in a], lam, tol)


def _call(compiled: Compiled, fn, use: bool, *args):
    """``compiled(*args)`` where ``use`` and compilation works here, else ``fn(*args)``."""
    out = compiled(*args) if use else None
    return out if out is not None else fn(*args)


def _prox_blocked(z: torch.Tensor, lam: float, eager: bool = False) -> tuple[torch.Tensor, int]:
    """The prox of ``lam * R`` for groups laid out member-major: ``z`` is ``[4, C]`` and group ``c``
    is ``z[:, c]``.

    This layout makes each group member a contiguous block, so every step below is one vectorised
    op over all groups (in a ``[P, 4]`` layout they are stride-4 accesses, and `torch.sort` of rows
    of 4 costs more than all the arithmetic). Instead of sorting, a sorting network of min/max ops
    gives the sorted magnitudes, and each member's rank in its group sends the solution back.

    Every group is swept, contested or not: gathering the contested ones out and scattering their
    solutions back cost more than sweeping the rest. Only the contested ones decide when the sweeps
    stop (the others' tolerance is infinite) and the uncontested take the two-non-zero candidate.
    On large CPU inputs this is two compiled calls (`_start`, `_end`), plus one per extra chunk of
    sweeps for the slow groups; the dynamo guard of each call costs more than its arithmetic on a
    small layer, so the number of calls sets the speed.

    Returns:
        ``(prox, dense)``: the prox in the layout and dtype of ``z``, and the number of its groups
        with more than two non-zeros.
    """
    if lam == 0.0:
        return z.clone(), int(((z != 0).sum(0) > 2).sum())
    with torch.no_grad():  # one grad mode for every caller: a compiled function recompiles on a change
        return _prox_blocked_impl(z, lam, eager)


def _prox_blocked_impl(z: torch.Tensor, lam: float, eager: bool) -> tuple[torch.Tensor, int]:
    big = _uses_compiled(z) and not eager
    lam_t = torch.tensor(lam, dtype=z.dtype, device=z.device)  # 0-d: a float would recompile per lam
    rel_tol, max_sweeps = _PROX_SWEEPS[torch.float64 if z.dtype == torch.float64 else torch.float32]
    s0, s1, s2, s3, contested, tol, x0, x1, x2, done3, y0, y1, y2, y3, done4 = _call(_START, _start, big, z, lam_t, rel_tol)
    chunks = max(-(-max_sweeps // _CHUNK) - _START_CHUNKS, 0)  # the first ones ran in `_start`
    for _ in range(chunks):
        if bool(done3):
            break
        x0, x1, x2, done3 = _call(_SWEEPS3, _sweeps3, big, s0, s1, s2, x0, x1, x2, lam_t, tol)
    for _ in range(chunks):
        if bool(done4):
            break
        y0, y1, y2, y3, done4 = _call(_SWEEPS4, _sweeps4, big, s0, s1, s2, s3, y0, y1, y2, y3, lam_t, tol)
    out, dense = _call(_END, _end, big, z, s0, s1, s2, s3, contested, x0, x1, x2, y0, y1, y2, y3, lam_t)
    return out, int(dense)


def lambda_max(h: torch.Tensor, iters: int = 50, margin: float = 1.05) -> float:
    """An upper estimate of the largest eigenvalue of a symmetric PSD ``h`` by power iteration.

    ``iters`` matrix-vector products (O(in^2) each) replace a full ``eigvalsh`` (O(in^3)): at
    in = 2048 that is ~0.02 s instead of ~1.5 s. The Rayleigh quotient approaches lambda_max from
    below, so it is raised by ``margin`` and capped by the trace (an upper bound for a PSD matrix);
    a step of 1 / estimate then stays below the 2 / lambda_max where gradient steps diverge.

    Example:
        >>> lambda_max(torch.diag(torch.tensor([1.0, 3.0, 2.0]))) >= 3.0
        True
    """
    hd = h.detach().double()
    n = hd.shape[0]
    if n == 0:
        return 0.0
    g = torch.Generator(device=hd.device).manual_seed(0)
    x = torch.randn(n, dtype=torch.float64, generator=g, device=hd.device)
    est = 0.0
    for _ in range(iters):
        y = hd @ x
        norm = float(y.norm())
        if norm == 0.0:
            break
        est = float(x @ y) / float(x @ x)
        x = y / norm
    trace = float(hd.diagonal().clamp_min(0).sum())
    return min(est * margin, trace) if est > 0 else trace


@dataclass
class ProxResult:
    """Outcome of `prox_prune`: the 2:4 weights and how the proximal gradient loop ended."""

    weight: torch.Tensor
    mask: torch.Tensor
    iterations: int
    hit_cap: bool
    final_lambda: float


# `prox_prune`'s ``idle_beta`` applies once at most this fraction of the groups is still dense.
IDLE_FRACTION = 0.01


def _count_dense_groups(v: torch.Tensor) -> int:
    """Number of groups of 4 with more than two non-zeros."""
    return int(((group_view(v, 4) != 0).sum(-1) > 2).sum())


def prox_prune(
    v0: torch.Tensor,
    h: torch.Tensor,
    lambda0: float = 0.01,
    beta: float = 1.01,
    max_iters: int = 3000,
    step: Optional[float] = None,
    accelerate: bool = False,
    idle_beta: Optional[float] = None,
    eager: bool = False,
) -> ProxResult:
    """Proximal gradient on ``0.5 tr((V - V0) H (V - V0)^T) + lam_k R(V)`` until every group is 2:4.

    ``V0`` and ``H`` are expected in the Wanda-normalised coordinates (``H`` with unit diagonal),
    where ``lambda0 = 0.01, beta = 1.01`` are the paper's defaults. Each iteration takes a gradient
    step of size ``step`` (``1 / L`` with ``L`` the largest eigenvalue of ``H`` if not given) and
    applies ``prox_2to4`` with ``step * lam_k`` (``L`` by power iteration, `lambda_max`);
    ``lam_k = lambda0 * beta**k`` grows until the
    result is 2:4. If ``max_iters`` is reached first, the iterate is projected onto 2:4 (the two
    largest magnitudes of each group) and ``hit_cap`` is set.

    With ``accelerate`` the gradient step is taken from the extrapolated point
    ``V_k + (k - 1) / (k + 2) * (V_k - V_{k-1})`` (FISTA's momentum; the paper takes it from
    ``V_k``). The plain step moves slowly along the directions where ``H`` is small, which are the
    ones the regulariser can use for free; momentum moves along them ~sqrt(condition) times
    faster. On the layers of `benchmarks/prune_quality.py` that lowered the refined local loss by
    10-20% while lambda grows 3-5x faster (``beta`` 1.03-1.05 instead of 1.01).

    ``idle_beta`` (``None``: ``beta`` throughout) is lambda's growth while the prox decides
    nothing: as long as every group still has more than two non-zeros (at the paper's
    ``lambda0`` the first ~30% of the iterations) and once at most `IDLE_FRACTION` of them
    still do (the last few groups can take another ~10%). On the layers of the pruning
    benchmark, with ``accelerate``: ``beta=1.03, idle_beta=1.2`` ran ~half the iterations of
    ``beta=1.03`` alone at a refined local loss 4-8% higher; ``beta=1.02, idle_beta=1.2`` about as
    many as ``beta=1.03, idle_beta=1.1`` at a 3-4% lower loss. `prune` uses ``beta=1.025,
    idle_beta=1.2``: ~10% fewer iterations than 1.02 at a ~3% higher loss.

    Args:
        v0: dense weights ``[out, in]``, ``in`` a multiple of 4.
        h: ``[in, in]`` symmetric positive semi-definite input Gram matrix.
        lambda0, beta: the geometric schedule of the regularisation strength.
        max_iters: iteration cap.
        step: gradient step size; ``None`` uses ``1 / lambda_max(h)``.
        accelerate: FISTA momentum (see above); ``False`` is the paper's plain proximal gradient.
        idle_beta: lambda's growth outside the phase where groups are decided (see above).
        eager: never use the compiled steps (the same results; `compile_plan` says when that is faster).

    Returns:
        A `ProxResult`; ``mask`` keeps exactly two entries per group (the non-zeros of ``weight``
        first, then the largest ``|v0|``), so a later masked refinement may revive a weight in a
        group the prox emptied beyond 2:4.

    Example:
        >>> v0 = torch.randn(8, 16); x = torch.randn(64, 16)
        >>> res = prox_prune(v0, x.T @ x / 64)
        >>> bool(((res.weight.reshape(8, 4, 4) != 0).sum(-1) <= 2).all())
        True
    """
    if step is None:
        step = 1.0 / max(lambda_max(h), 1e-12)
    out_f, in_f = v0.shape
    groups = in_f // 4
    # Member-major layout, transposed: column 4g + i of V becomes row i * G + g of V^T ([in, out]),
    # so member i of every group is the contiguous block V^T[i*G:(i+1)*G] and the prox reads
    # V^T as [4, G * out] with no reshuffle. H is permuted alike (and is symmetric), which leaves
    # the gradient H (V - V0)^T one matrix product.
    perm = torch.arange(in_f, device=v0.device).view(groups, 4).T.reshape(-1)
    vb0 = v0[:, perm].T.contiguous()  # (in, out), member-major rows
    hb = h[perm][:, perm].contiguous()
    v = vb0.clone()
    lam = float(lambda0)
    it = 0
    n_dense = _count_dense_groups(v0)
    done = n_dense == 0
    total = out_f * groups
    v_prev = v
    # The prox's input, [4, G * out]: written by the matmul through a view, but itself not a view
    # (a compiled function guards a view through its base's shape, and would recompile per layer
    # shape instead of once).
    z = torch.empty(4, groups * out_f, dtype=v0.dtype, device=v0.device)
    while not done and it < max_iters:
        # The point the gradient step starts from: V_k, or FISTA's extrapolation of it.
        y = torch.add(v, v - v_prev, alpha=(it - 1) / (it + 2)) if accelerate and it >= 2 else v
        # z = Y - step * H (Y - V0): a gradient step on the local loss (transposed), in one addmm.
        torch.addmm(y, hb, y - vb0, alpha=-step, out=z.view(in_f, out_f))
        v_prev = v
        v, n_dense = _prox_blocked(z, step * lam, eager)
        v = v.view(in_f, out_f)
        done = n_dense == 0
        it += 1
        if not done:
            idle = idle_beta is not None and (n_dense == total or n_dense <= IDLE_FRACTION * total)
            lam *= idle_beta if idle else beta
    v = torch.empty_like(v0).index_copy_(1, perm, v.T)  # back to [out, in] in the natural column order
    hit_cap = not done
    if hit_cap:
        v = project_nm(v, 2, 4)
    # Exactly two kept positions per group: the survivors first, then the largest |v0| (a score
    # below 1 for zeros, at least 2 for survivors).
    score = (v != 0).to(v.dtype) * 2 + v0.abs() / v0.abs().max().clamp_min(1e-30)
    mask = nm_mask(score, 2, 4)
    return ProxResult(weight=v * mask, mask=mask, iterations=it, hit_cap=hit_cap, final_lambda=lam)
