"""The GPU suite: correctness probes, ``gpu`` tests, layer, kernel and end-to-end timings, as JSON.

The first run on a GPU machine is ``bash benchmarks/gpu_suite.sh`` from the repository root (about 8
minutes on an H100/H200 with the default budget). sparsetrain need not be installed: this script
puts the repository root on the import path.

Usage::

    python benchmarks/gpu_suite.py [--budget-s 420] [--quick] [--skip-tests] [--peak-gbps N] [--out DIR]
    python benchmarks/gpu_suite.py --smoke-cpu --out DIR    # the whole code path on CPU, tiny shapes
    python benchmarks/gpu_suite.py --rehearse               # the smoke run in a venv shaped like the GPU machine

Writes ``<out>/gpu_suite_<device>.json`` (``..._quick.json`` with ``--quick``, ``gpu_suite_cpu_smoke.json``
with ``--smoke-cpu``), rewritten after every section (``"complete": false`` until the end), so a
run cut short keeps what it measured. Without a CUDA device (and without ``--smoke-cpu``) it says
so, writes nothing and exits 0.

Sections, in order of value; ``--budget-s`` skips a section or row that would not fit in the time
left (listed under ``skipped``), so the run stops cleanly:

1. ``probes``: each GPU path once against a float64 dense reference: cuSPARSELt forward, input
   gradient (transposable W~^T) and MVUE weight gradient in bf16 and fp16; the FP8 sparse forward
   (e4m3, per-row alpha, ``out_dtype`` bf16/fp16, ``transpose_result``; sm90+) and the FP8 dense
   GEMMs; the compiled Triton kernels against their torch twins; semi-structured export.
2. ``ffn_target``: the FFN at the target shape (d=4096, ff=16384, 16384 tokens), S-STE+MVUE first.
3. ``gpu_tests``: ``pytest -m gpu tests/`` (its timeout is the budget left).
4. ``kernels``: the Triton kernels' achieved GB/s against the device's memory bandwidth.
5. ``end_to_end``: GPT-2 training steps (forward, backward, AdamW step), dense vs S-STE+MVUE.
6. ``layers``: the other shapes: forward+backward of SparseLinear vs nn.Linear, per method, for
   ``module`` ``"linear"`` (the up-projection ``d -> ff``) and ``"ffn"`` (``Linear(d, ff) -> GELU ->
   Linear(ff, d)``), with the backend each SparseLinear actually used, so a silent fall-back to
   ``dense`` shows. ``ms`` keeps the weights fixed (a cuSPARSELt layer compresses W~ once and
   reuses it); ``ms_recompress`` updates them in place before each call, as an optimizer step does.
   Rows of the target section are in ``layers`` too.

Targets (H100, bf16): FFN forward+backward >= 1.3x dense at d=4096/ff=16384 and 16384 tokens;
kernels >= 70% of memory bandwidth; GPT-2 training step >= 1.1x dense. Rows a target applies to
carry it with ``meets_target``; ``targets`` sums them up.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# `python benchmarks/gpu_suite.py` puts benchmarks/ on the path, not the root: on a machine where
# sparsetrain is not installed every import of it would fail. The copy next to this file is the
# one measured, so it goes first.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Default time budget: ~7 minutes of sections, so that with interpreter start-up, imports and
# Triton compilation the call fits in 8 minutes on an H100/H200.
DEFAULT_BUDGET_S = 420.0
# (name, d_model, d_ff): the FFN shapes of the issue, and the target shape last.
FFN_SHAPES = [
    ("gpt2-124m", 768, 3072),
    ("gpt2-774m", 1280, 5120),
    ("gpt2-1.5b", 1600, 6400),
    ("llama-7b", 4096, 11008),
    ("d4096-ff16384", 4096, 16384),
]
TOKENS = [4096, 16384]
METHODS = {  # name -> SparsityConfig fields
    "ste": {"method": "ste"},
    "s-ste": {"method": "s-ste"},
    "s-ste+mvue": {"method": "s-ste", "mvue": "exact"},
    "transposable": {"method": "sr-ste", "transposable": True},
}
GPT2_SIZES = {
    "gpt2-124m": {"n_embd": 768, "n_layer": 12, "n_head": 12},
    "gpt2-774m": {"n_embd": 1280, "n_layer": 36, "n_head": 20},
}
# Peak HBM bandwidth in GB/s by device-name fragment (vendor data sheets), first match wins.
PEAK_GBPS = {"GH200": 4000, "H200": 4800, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350,
             "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "4090": 1008}

# The issue's targets, and where each applies.
FFN_TARGET = {"target": 1.3, "module": "ffn", "d": 4096, "ff": 16384, "tokens": 16384, "primary": "s-ste+mvue"}
KERNEL_TARGET = {"target": 0.7}
E2E_TARGET = {"target": 1.1, "models": ("gpt2-124m", "gpt2-774m"), "variant": "s-ste+mvue"}
# Issue 21: a squared-ReLU FFN (d -> ff -> d) forward+backward, its down-projection's input 2:4
# (docs/sparse-activations.md), against the dense FFN; and one GPT-2 training step with both.
ACT_TARGETS = {"act24": 1.2, "both": 1.5}
ACT_VARIANTS = {  # name -> SparsityConfig fields for the FFN's two layers ("dense": plain nn.Linear)
    "weights24": {"method": "s-ste"},
    "act24": {"method": "dense", "activation_sparsity": "2:4"},
    "both": {"method": "s-ste", "activation_sparsity": "2:4"},
}


# ------------------------------------------------------------------------------------------------
# Where and how things are timed
# ------------------------------------------------------------------------------------------------


def cuda_timer(fn: Callable[[], object], warmup: int, reps: int, inner: int = 1) -> float:
    """Median milliseconds per call of ``fn``, CUDA-event timed over ``reps`` blocks of ``inner`` calls.

    A short ``torch.cuda._sleep`` is queued before each block so the CPU can enqueue the block while
    the GPU is busy: short kernels are then timed back to back, not at the CPU's launch rate.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(2_000_000)  # ~1 ms at typical clocks
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def cpu_timer(fn: Callable[[], object], warmup: int, reps: int, inner: int = 1) -> float:
    """Median milliseconds per call of ``fn`` by ``time.perf_counter`` (CPU work is synchronous)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


@dataclasses.dataclass
class Env:
    """The device, dtype and timer every section runs with."""

    device: str
    dtype: torch.dtype
    timer: Callable[..., float]
    warmup: int
    reps: int
    kernel_inner: int = 1
    peak_gbps: float | None = None
    peak_gbps_source: str | None = None
    l2_bytes: int | None = None

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def time(self, fn, *, warmup: int | None = None, reps: int | None = None, inner: int = 1) -> float:
        return self.timer(fn, self.warmup if warmup is None else warmup, self.reps if reps is None else reps, inner)

    def reset_peak_memory(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> int | None:
        """Peak bytes allocated since `reset_peak_memory` (CUDA only; None on CPU)."""
        return int(torch.cuda.max_memory_allocated()) if self.is_cuda else None

    def free(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def _device_peak_gbps(override: float | None):
    """``(GB/s, source)`` of the current CUDA device's memory bandwidth, or ``(None, None)``."""
    if override:
        return float(override), "--peak-gbps"
    name = torch.cuda.get_device_name()
    for frag, gbps in PEAK_GBPS.items():
        if frag in name:
            return float(gbps), f"table ({frag!r})"
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:  # double data rate: 2 transfers per clock
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "device properties (memory clock x bus width)"
    return None, None


def cuda_env(warmup: int, reps: int, dtype=torch.bfloat16, peak_gbps: float | None = None) -> Env:
    gbps, source = _device_peak_gbps(peak_gbps)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return Env("cuda", dtype, cuda_timer, warmup, reps, kernel_inner=10, peak_gbps=gbps, peak_gbps_source=source,
               l2_bytes=getattr(props, "L2_cache_size", None))


def cpu_env(warmup: int, reps: int, dtype=torch.float32) -> Env:
    return Env("cpu", dtype, cpu_timer, warmup, reps)


def _error(err: BaseException) -> str:
    """``repr(err)`` and where it was raised, short enough for a JSON row."""
    tb = traceback.extract_tb(err.__traceback__)
    frames = [f for f in tb if "sparsetrain" in f.filename][-1:]  # the innermost package frame...
    frames += [f for f in tb[-1:] if f not in frames]  # ...and where it was raised
    where = "".join(f" at {Path(f.filename).name}:{f.lineno}" for f in frames)
    return (repr(err)[:380] + where)[:500]


def _meets(value, target) -> bool | None:
    return None if value is None else bool(value >= target)


def _free(env: Env, row: dict) -> None:
    """`Env.free`, with a failure recorded in ``row`` instead of raised: after a sticky CUDA error
    the synchronize in it raises, and that must not discard the rows measured so far."""
    try:
        env.free()
    except Exception as err:  # noqa: BLE001 - recorded; the caller goes on (and will likely fail again)
        row["free_error"] = _error(err)


class BudgetExhausted(Exception):
    """The next section or row would not fit in the time left; the suite stops there cleanly."""


@dataclasses.dataclass
class Budget:
    """Seconds the run may take from its start; sections and rows check it before they begin."""

    seconds: float
    start: float | None = None  # time.monotonic() at creation

    def __post_init__(self):
        if self.start is None:
            self.start = time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def check(self, estimate_s: float, what: str) -> None:
        """Raise `BudgetExhausted` when ``what`` (about ``estimate_s`` seconds) would not fit."""
        if self.left() < estimate_s:
            raise BudgetExhausted(
                f"{what}: needs ~{estimate_s:.0f} s, {max(self.left(), 0.0):.0f} s left of --budget-s {self.seconds:g}"
            )


# ------------------------------------------------------------------------------------------------
# The gpu tests
# ------------------------------------------------------------------------------------------------


def run_gpu_tests(timeout_s: float = 3600) -> dict:
    """``pytest -m gpu tests/`` in a subprocess that imports this copy of sparsetrain.

    ``TRITON_INTERPRET`` is removed from its environment so the kernels compile on CUDA. Without
    CUDA every ``gpu`` test is skipped, which still checks that every test module imports here.
    """
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", str(ROOT / "tests")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {"returncode": None, "summary": f"timed out after {timeout_s:.0f} s", "output_tail": out[-4000:]}
    lines = res.stdout.strip().splitlines()
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return {"returncode": res.returncode, "summary": (lines[-1:] or [""])[0], "failed": failed[:40],
            "s": round(time.perf_counter() - t0, 1), "output_tail": (res.stdout + res.stderr)[-4000:]}


# ------------------------------------------------------------------------------------------------
# Correctness probes: each GPU path once, against float64
# ------------------------------------------------------------------------------------------------
# Tolerances: a bf16/fp16 result of a float32-accumulated length-k product, compared with float64
# products of the same (rounded) operands: |got - ref| <= 2 eps (|ref| + sqrt(k)), eps of the
# output dtype (one rounding of the output, accumulation order). Triton twins: see `probe_kernels`.


def _compare(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, k: int) -> dict:
    """``ok`` and the worst error relative to the bound above."""
    eps = torch.finfo(dtype).eps
    err = (got.detach().double().cpu() - ref.cpu()).abs()
    bound = 2 * eps * (ref.cpu().abs() + k**0.5)
    return {"ok": bool((err <= bound).all()), "max_abs_err": float(err.max()), "max_err_over_bound": float((err / bound).max())}


def _probe_operands(t: int, d_in: int, d_out: int, dtype, device, transposable: bool = False, seed: int = 0):
    """``(x, w_eff, b)`` in ``dtype`` on ``device``; ``w_eff`` 2:4 (transposable if asked)."""
    from sparsetrain import ops

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g)
    mask = ops.transposable_mask(w.abs(), 2, 4, method="exact24") if transposable else ops.nm_mask(w, 2, 4)
    b = torch.randn(d_out, generator=g)
    return tuple(v.to(device=device, dtype=dtype) for v in (x, w * mask, b))


def _f64(v: torch.Tensor) -> torch.Tensor:
    return v.detach().double().cpu()


def _rt64(v: torch.Tensor, fp8_dtype) -> torch.Tensor:
    """Per-tensor scaled FP8 round trip in float64, written independently of `ops.fp8`."""
    v = _f64(v)
    scale = torch.finfo(fp8_dtype).max / v.abs().max()
    return (v * scale).to(fp8_dtype).double() / scale


def probe_cusparselt(device: str, dtype) -> list:
    """Forward (bias, ``transpose_result``), sparse input gradient (W~^T compressed) and sparse MVUE
    weight gradient of the cuSPARSELt backend, each against float64."""
    from sparsetrain.backends import cusparselt

    t, d_in, d_out = 256, 256, 128
    x, w, b = _probe_operands(t, d_in, d_out, dtype, device, transposable=True)
    x.requires_grad_(True)
    w.requires_grad_(True)
    gy = torch.randn(t, d_out, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    gen = torch.Generator(device=device).manual_seed(5)
    y = cusparselt.linear(x, w, b, mvue="exact", generator=gen, cache={"key": 0}, transposable=True)
    dx, dw = torch.autograd.grad(y, (x, w), gy)
    # The MVUE draws again from a generator in the same state: the same 2:4 gradient.
    g_t = cusparselt._mvue_tokens_t(cusparselt._pad_rows(gy, cusparselt._TOKEN_MULTIPLE), "exact",
                                    torch.Generator(device=device).manual_seed(5))[:, :t]
    name = str(dtype).replace("torch.", "")
    return [
        {"probe": "cusparselt_forward", "dtype": name, **_compare(y, _f64(x) @ _f64(w).t() + _f64(b), dtype, d_in)},
        {"probe": "cusparselt_dX_transposable", "dtype": name, **_compare(dx, _f64(gy) @ _f64(w), dtype, d_out)},
        {"probe": "cusparselt_dW_mvue", "dtype": name, **_compare(dw, _f64(g_t) @ _f64(x), dtype, t)},
    ]


def probe_fp8_sparse(device: str, dtype) -> list:
    """The FP8 sparse forward: e4m3 operands, a per-row alpha vector, ``out_dtype`` and
    ``transpose_result=True`` in one cuSPARSELt call (needs sm90+)."""
    from sparsetrain.backends import cusparselt
    from sparsetrain.ops import fp8 as fp8_ops

    name = str(dtype).replace("torch.", "")
    row = {"probe": "fp8_sparse_forward", "dtype": name,
           "call": "e4m3 x e4m3, alpha per row, out_dtype, transpose_result=True"}
    if device.startswith("cuda") and torch.cuda.get_device_capability() < (9, 0):
        return [{**row, "skipped": "cuSPARSELt FP8 needs sm90+"}]
    t, d_in, d_out = 128, 256, 128
    x, w, b = _probe_operands(t, d_in, d_out, dtype, device, seed=2)
    y = cusparselt.linear(x, w, b, fp8=True, cache={"key": 0})
    e4m3 = fp8_ops.FORWARD_DTYPE
    return [{**row, **_compare(y, _rt64(x, e4m3) @ _rt64(w, e4m3).t() + _f64(b), dtype, d_in)}]


def probe_fp8_dense(device: str, dtype) -> list:
    """The dense FP8 GEMMs (``torch._scaled_mm`` on sm89+): e4m3 x e4m3 (forward) and e5m2 x e4m3
    (backward), against float64 products of the round-tripped operands."""
    from sparsetrain.ops import fp8 as fp8_ops

    e4m3, e5m2 = fp8_ops.FORWARD_DTYPE, fp8_ops.BACKWARD_DTYPE
    g = torch.Generator().manual_seed(3)
    a, bm = torch.randn(96, 160, generator=g).to(device, dtype), torch.randn(160, 80, generator=g).to(device, dtype)
    real = fp8_ops.fp8_gemm_supported(torch.device(device))
    rows = []
    for label, a_dtype in (("e4m3_x_e4m3", e4m3), ("e5m2_x_e4m3", e5m2)):
        got = fp8_ops.scaled_mm(a, bm, a_dtype, e4m3, out_dtype=dtype)
        ref = _rt64(a, a_dtype) @ _rt64(bm, e4m3)
        rows.append({"probe": f"fp8_dense_{label}", "dtype": str(dtype).replace("torch.", ""),
                     "real_fp8_gemm": real, **_compare(got, ref, dtype, 160)})
    return rows


def probe_kernels(device: str) -> list:
    """The Triton kernels (compiled on CUDA, interpreted on CPU) against their torch twins on the
    same device. Projection: bit-exact values and masks. MVUE given the twin's uniforms: the same
    kept entries, values within 4 float32 ulp, i.e. one bf16 ulp after rounding (compiled, an fp32
    division is the approximate ``div.full.f32``). Transposable 2:4: a valid mask whose kept
    score equals the twin's (the exact optimum; ties may be broken differently)."""
    from sparsetrain import kernels, ops
    from sparsetrain.kernels import mvue as kmvue
    from sparsetrain.kernels import nm_project, transposable

    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(4)
    rows_, cols = (256, 256) if device.startswith("cuda") else (64, 128)  # the interpreter is slow
    w = torch.randn(rows_, cols, generator=g).to(device, dtype)
    rows = []
    for method in ("ste", "s-ste"):
        beta = ops.sste_scale(w, 2, 4) if method == "s-ste" else None
        w_eff, mask = kernels.project_weight(w, 2, 4, "soft" if method == "s-ste" else "hard", beta)
        ref = ops.project_nm(w, 2, 4) if method == "ste" else (beta * ops.soft_threshold(w.float(), 2, 4)).to(dtype)
        rows.append({"probe": f"triton_project_{method}", "mode": nm_project._nm_project.last_mode,
                     "ok": bool(torch.equal(mask, ops.nm_mask(w, 2, 4)) and torch.equal(w_eff, ref)),
                     "mismatches": int((w_eff != ref).sum())})
    for method in ("exact", "approx"):
        k = 2 if method == "approx" else 1
        u = torch.rand((k, 1, rows_ // 4, cols), generator=torch.Generator().manual_seed(6))  # what ops.mvue24 draws
        out = kmvue.mvue24_forward(w, 0, method, uniforms=u.to(device))
        ref = ops.mvue24(w.cpu(), 0, method, torch.Generator().manual_seed(6))
        same_support = bool(torch.equal(out.cpu() != 0, ref != 0))
        rel = ((out.cpu().float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-30)).max()
        rows.append({"probe": f"triton_mvue_{method}", "mode": kmvue._mvue24.last_mode,
                     "ok": same_support and float(rel) <= torch.finfo(dtype).eps,
                     "same_support": same_support, "max_rel_err": float(rel)})
    score = w.float().abs()[:64, :128]  # (64, 128): 16 x 32 tiles of 4 x 4
    mask = kernels.transposable24(score)
    twin = ops.transposable_mask(score.cpu(), 2, 4, method="exact24").bool()
    tiles = mask.cpu().view(16, 4, 32, 4)

    def kept(m):  # (16, 32): the score each tile keeps
        return (score.cpu().double() * m).view(16, 4, 32, 4).sum((1, 3))

    valid = bool((tiles.sum(1) == 2).all() and (tiles.sum(3) == 2).all())
    gap = float((kept(twin) - kept(mask.cpu())).abs().max())
    rows.append({"probe": "triton_transposable24", "mode": transposable._transposable24.last_mode,
                 "ok": valid and gap <= 1e-9 * float(kept(twin).abs().max()), "valid": valid, "kept_score_gap": gap})
    return rows


def probe_cslt_pack(device: str, dtype) -> list:
    """The fused 2:4 compression of activations (`ops.cslt_layout`; Triton on CUDA) against
    ``torch._cslt_compress``: byte-equal buffers on a random operand (unique encoding), and the
    product with our buffer on a squared-ReLU operand (many zeros) against float64. Also whether the
    backend's own once-per-process check now trusts the fused path."""
    from sparsetrain.backends import cusparselt_activation
    from sparsetrain.ops import cslt_layout

    g = torch.Generator().manual_seed(11)
    x = torch.randn(512, 768, generator=g).to(device, dtype)
    xt, _, buf = cslt_layout.sparsify_pack24(x)
    ref = torch._cslt_compress(xt)
    same_size = isinstance(ref, torch.Tensor) and ref.shape == buf.shape
    diff = (ref.view(torch.int16) != buf.view(torch.int16)).nonzero().flatten() if same_size else None
    row = {"probe": "cslt_pack24", "dtype": str(dtype).replace("torch.", ""), "same_size": same_size,
           "buffer_numel": buf.numel(), "cslt_numel": ref.numel() if isinstance(ref, torch.Tensor) else None,
           "mismatched_elements": None if diff is None else diff.numel(),
           "first_mismatch": None if diff is None or diff.numel() == 0 else int(diff[0]),
           "values_end": 512 * 384}
    cusparselt_activation._LAYOUT_MATCHES.pop((str(torch.device(device)), dtype), None)
    row["backend_uses_fused"] = cusparselt_activation.packed_layout_matches(device, dtype)
    xr = (torch.relu(torch.randn(256, 512, generator=g) - 0.5) ** 2).to(device, dtype)
    b = torch.randn(512, 136, generator=g).to(device, dtype)
    xt2, _, buf2 = cslt_layout.sparsify_pack24(xr)
    row.update(_compare(torch._cslt_sparse_mm(buf2, b), _f64(xt2) @ _f64(b), dtype, 512))
    row["ok"] = bool(row["ok"] and same_size and row["mismatched_elements"] == 0 and row["backend_uses_fused"])
    return [row]


def probe_semi_structured(device: str, dtype) -> list:
    """`to_semi_structured` (torch.sparse semi-structured weight) on a 2:4 Linear, against float64."""
    from torch import nn

    from sparsetrain.backends import cusparselt

    x, w, b = _probe_operands(64, 256, 128, dtype, device, seed=7)
    lin = nn.Linear(256, 128, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    cusparselt.to_semi_structured(lin)
    with torch.no_grad():
        y = lin(x)
    return [{"probe": "semi_structured_export", "dtype": str(dtype).replace("torch.", ""),
             **_compare(y, _f64(x) @ _f64(w).t() + _f64(b), dtype, 256)}]


@contextlib.contextmanager
def _cpu_emulation():
    """On CPU (``--smoke-cpu``): the cuSPARSELt probes run against `tests/fake_cusparselt.py`, an
    emulation that refuses what the real ops would reject, so their code path is rehearsed."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from fake_cusparselt import Patcher, emulate_sm90_on_cpu

        from sparsetrain.backends import cusparselt, cusparselt_activation

        patcher = Patcher()
        saved_algs = dict(cusparselt._ALG_CACHE)
        saved_layout = dict(cusparselt_activation._LAYOUT_MATCHES)
        try:
            # packed: 16-bit operands of multiples of 128 compress to flat buffers, as on a GPU
            emulate_sm90_on_cpu(patcher, cusparselt).packed = True
            yield
        finally:
            patcher.undo()
            cusparselt._ALG_CACHE.clear()
            cusparselt._ALG_CACHE.update(saved_algs)
            cusparselt_activation._LAYOUT_MATCHES.clear()
            cusparselt_activation._LAYOUT_MATCHES.update(saved_layout)
    finally:
        sys.path.remove(str(ROOT / "tests"))


def run_probes(env: Env, rows: list, budget: Budget, estimate_s: float) -> None:
    """Append one row per probe to ``rows``; a failing probe records its error and the rest go on."""
    probes = [
        ("kernels", lambda: probe_kernels(env.device)),
        *[(f"cusparselt {d}", lambda d=d: probe_cusparselt(env.device, d)) for d in (torch.bfloat16, torch.float16)],
        *[(f"fp8 sparse {d}", lambda d=d: probe_fp8_sparse(env.device, d)) for d in (torch.bfloat16, torch.float16)],
        ("fp8 dense", lambda: probe_fp8_dense(env.device, torch.bfloat16)),
        *[(f"semi-structured {d}", lambda d=d: probe_semi_structured(env.device, d)) for d in (torch.bfloat16, torch.float16)],
        *[(f"cslt pack24 {d}", lambda d=d: probe_cslt_pack(env.device, d)) for d in (torch.bfloat16, torch.float16)],
    ]
    emulated = not env.is_cuda
    with _cpu_emulation() if emulated else contextlib.nullcontext():
        for name, fn in probes:
            budget.check(estimate_s, f"probe {name}")
            try:
                new = fn()
            except Exception as err:  # noqa: BLE001 - a probe that raises is a finding; the rest go on
                new = [{"probe": name, "ok": False, "error": _error(err)}]
            for row in new:
                row["emulated"] = emulated and not row["probe"].startswith("triton")
                rows.append(row)
                print(json.dumps(row), flush=True)
            _free(env, new[-1])


# ------------------------------------------------------------------------------------------------
# Layers: one Linear (the up-projection) and the FFN block
# ------------------------------------------------------------------------------------------------


def _torchao_semi_sparse_linear():
    """torchao's ``SemiSparseLinear`` class, or ``(None, why)`` when it cannot be imported."""
    errors = []
    for mod in ("torchao.sparsity.training", "torchao.sparsity.prototype.training"):
        try:
            module = __import__(mod, fromlist=["SemiSparseLinear"])
            return module.SemiSparseLinear, None
        except Exception as err:  # noqa: BLE001 - not installed, or installed but broken against this torch
            errors.append(f"{mod}: {err!r}"[:200])
    return None, "; ".join(errors)


def build_block(module: str, method: str, d: int, ff: int, env: Env, ao_cls=None):
    """``(block, sparse_layers)``: the ``"linear"`` (``d -> ff``) or ``"ffn"`` block for ``method``.

    ``method`` is ``"dense"`` (nn.Linear), ``"torchao"`` (torchao's SemiSparseLinear) or a key of
    `METHODS` (SparseLinear, built on the device so transposable masks are solved there).
    """
    from torch import nn

    from sparsetrain import SparseLinear, SparsityConfig

    def linear(i, o):
        if method == "dense":
            return nn.Linear(i, o, device=env.device, dtype=env.dtype)
        if method == "torchao":
            return ao_cls.from_dense(nn.Linear(i, o, device=env.device, dtype=env.dtype))
        cfg = SparsityConfig(backend="auto", **METHODS[method])
        return SparseLinear(i, o, True, config=cfg, device=env.device, dtype=env.dtype)

    if module == "linear":
        block = linear(d, ff)
    elif module == "ffn":
        block = nn.Sequential(linear(d, ff), nn.GELU(approximate="tanh"), linear(ff, d))
    else:
        raise ValueError(f"unknown module {module!r}")
    return block, [m for m in block.modules() if isinstance(m, SparseLinear)]


def _backend_info(layers) -> dict:
    """The backends the SparseLinear layers used (read after a forward), and why ``auto`` fell back."""
    from sparsetrain import backends

    if not layers:
        return {}
    # A layer picks its backend in its first forward; before that `backend_name` is only a default.
    names = [layer.backend_name if getattr(layer, "_backend_key", True) is not None else "undecided" for layer in layers]
    info = {"backend": names[0] if len(set(names)) == 1 else "mixed", "backends": names}
    if "dense" in names:
        layer = layers[names.index("dense")]
        if layer.config.backend == "auto":
            _, reason = backends.select_backend("auto", layer.weight, layer.weight.dtype, warn=False)
            if reason:
                info["fallback_reason"] = reason
    return info


def ffn_target(row: dict) -> float | None:
    """The speedup target for a layer row, or None where the issue sets none."""
    t = FFN_TARGET
    if row.get("method") == "dense" or (row.get("module"), row.get("d"), row.get("ff"), row.get("tokens")) != (
        t["module"], t["d"], t["ff"], t["tokens"]
    ):
        return None
    return t["target"]


def _time_block(env: Env, block, x: torch.Tensor, gy: torch.Tensor, bump_weights: bool = False):
    """``(ms, peak bytes)`` of ``block(x).backward(gy)``, gradients cleared before each call.

    With ``bump_weights`` every call first updates the weights in place (``w.mul_(1)``), as an
    optimizer step would: a cuSPARSELt layer then compresses W~ again in each call instead of
    reusing the compressed weight of the previous one. Dense pays the same in-place update.
    """
    params = list(block.parameters())

    def step():
        if bump_weights:
            with torch.no_grad():
                for p in params:
                    p.mul_(1)
        x.grad = None
        for p in params:
            p.grad = None
        block(x).backward(gy)

    for _ in range(env.warmup):
        step()
    # Reset after the warm-up: the first calls hold cuSPARSELt's algorithm search buffers and
    # Triton's compilation, which are not the layer's working memory.
    env.reset_peak_memory()
    ms = env.time(step, warmup=0)
    return ms, env.peak_memory()


def _layer_rows(env: Env, rows: list, shape: tuple, t: int, modules, methods, ao_cls,
                budget: Budget | None = None, row_s: float = 0.0) -> None:
    """Append the rows of one (shape, tokens) to ``rows``, one method at a time.

    Each row first checks that ``row_s`` seconds are left in ``budget`` (`BudgetExhausted` if not).
    """
    name, d, ff = shape
    torch.manual_seed(0)
    x = torch.randn(t, d, device=env.device, dtype=env.dtype, requires_grad=True)
    for module in modules:
        gy = torch.randn(t, ff if module == "linear" else d, device=env.device, dtype=env.dtype)
        dense = {}
        for method in ("dense", *methods):
            if budget is not None:
                budget.check(row_s, f"layers {module} {name} tokens={t} {method}")
            row = {"module": module, "shape": name, "d": d, "ff": ff, "tokens": t,
                   "dtype": str(env.dtype).replace("torch.", ""), "method": method}
            layers, block = [], None
            try:
                block, layers = build_block(module, method, d, ff, env, ao_cls)
                row["ms"], row["peak_mem_bytes"] = _time_block(env, block, x, gy)
                row["ms_recompress"], _ = _time_block(env, block, x, gy, bump_weights=True)
            except Exception as err:  # noqa: BLE001 - record and continue: one method must not sink the suite
                row["error"] = _error(err)
            try:
                row.update(_backend_info(layers))
            except Exception as err:  # noqa: BLE001 - recorded in the row
                row["backend_info_error"] = _error(err)
            if method in ("dense", "torchao"):
                row["backend"] = "torch.nn.Linear" if method == "dense" else "torchao.SemiSparseLinear"
            if method == "dense":
                dense = row
            else:
                for key in ("ms", "ms_recompress", "peak_mem_bytes"):
                    row[f"dense_{key}"] = dense.get(key)
                for key, speedup in (("ms", "speedup"), ("ms_recompress", "speedup_recompress")):
                    ok = row.get(key) and row[f"dense_{key}"]
                    row[speedup] = row[f"dense_{key}"] / row[key] if ok else None
                target = ffn_target(row)
                if target is not None:
                    row["target_speedup"] = target
                    row["meets_target"] = _meets(row["speedup"], target)
            del block, layers
            _free(env, row)  # before the row is printed, so a failure shows in it
            rows.append(row)
            print(json.dumps(row), flush=True)


def bench_layers(env: Env, cases, methods=tuple(METHODS), rows: list | None = None,
                 budget: Budget | None = None, row_s: float = 0.0) -> list:
    """One row per (module, shape, tokens, method), the dense baseline included as method ``dense``.

    ``cases`` is a list of ``(shape, tokens, modules)``. torchao's ``SemiSparseLinear`` (method
    ``torchao``) runs alongside on CUDA when it imports. Rows are appended to ``rows`` as they are
    measured (so a section that dies keeps them); `BudgetExhausted` propagates.
    """
    ao_cls, ao_why = _torchao_semi_sparse_linear()
    if ao_cls is not None and env.is_cuda:
        methods = (*methods, "torchao")
    else:
        print(f"layers: torchao SemiSparseLinear not compared ({ao_why or 'it needs CUDA'})", flush=True)
    rows = [] if rows is None else rows
    for shape, t, modules in cases:
        try:
            _layer_rows(env, rows, shape, t, modules, methods, ao_cls, budget, row_s)
        except BudgetExhausted:
            raise
        except Exception as err:  # noqa: BLE001 - e.g. out of memory for the inputs: next shape
            row = {"shape": shape[0], "d": shape[1], "ff": shape[2], "tokens": t, "error": _error(err)}
            _free(env, row)
            rows.append(row)
            print(json.dumps(row), flush=True)
        else:
            _free(env, rows[-1] if rows else {})
    return rows


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


def kernel_cases(w: torch.Tensor, gen: torch.Generator) -> dict:
    """name -> (fn, bytes read, bytes written) for each Triton kernel on ``w``."""
    from sparsetrain import kernels

    es, n = w.element_size(), w.numel()
    beta = torch.tensor(1.1, device=w.device)
    score = w.abs()
    cases = {
        # read w; write w_eff and a 1-byte mask
        "project_ste": (lambda: kernels.project_weight(w, 2, 4, "hard"), n * es, n * (es + 1)),
        "project_sste": (lambda: kernels.project_weight(w, 2, 4, "soft", beta), n * es, n * (es + 1)),
        # read g; write the 2:4 estimate
        "mvue_exact_dim0": (lambda: kernels.mvue24(w, 0, "exact", gen), n * es, n * es),
        "mvue_approx_dim0": (lambda: kernels.mvue24(w, 0, "approx", gen), n * es, n * es),
        # read |w|; write a 1-byte mask
        "transposable24": (lambda: kernels.transposable24(score), n * es, n),
    }
    if w.shape[0] % 128 == 0 and w.shape[1] % 128 == 0 and w.dtype in (torch.float16, torch.bfloat16):
        # 2:4 activations for cuSPARSELt: read x; write X~, a 1-byte mask and the 9/16-size buffer
        cases["sparsify_pack24"] = (lambda: kernels.sparsify_pack24(w), n * es, n * (2 * es + 1) + n * es * 9 // 16)
        if w.is_cuda:  # the two-pass path it replaces, side by side: mask kernel, then _cslt_compress
            cases["sparsify_then_cslt_compress"] = (
                lambda: torch._cslt_compress(kernels.sparsify_activation(w)[0]),
                2 * n * es, n * (es + 1) + n * es * 9 // 16)
    return cases


def bench_kernels(env: Env, sizes, rows: list | None = None, budget: Budget | None = None, row_s: float = 0.0) -> list:
    rows = [] if rows is None else rows
    for rows_, cols in sizes:
        if budget is not None:
            budget.check(row_s, f"kernels {rows_}x{cols}")
        try:
            torch.manual_seed(0)
            w = torch.randn(rows_, cols, device=env.device, dtype=env.dtype)
            gen = torch.Generator(device=env.device).manual_seed(0)
            cases = kernel_cases(w, gen)
        except Exception as err:  # noqa: BLE001 - recorded in the row; the suite goes on
            row = {"kernel": "setup", "shape": [rows_, cols], "error": _error(err)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        for kname, (fn, nread, nwritten) in cases.items():
            row = {"kernel": kname, "shape": [rows_, cols], "dtype": str(env.dtype).replace("torch.", ""),
                   "interpreted": not env.is_cuda, "bytes": nread + nwritten,
                   "fits_in_l2": nread <= env.l2_bytes if env.l2_bytes else None}
            try:
                ms = env.time(fn, inner=env.kernel_inner)
                gbps = (nread + nwritten) / ms / 1e6
                frac = gbps / env.peak_gbps if env.peak_gbps else None
                row.update(ms=ms, GBps=gbps, peak_GBps=env.peak_gbps, fraction_of_peak=frac)
            except Exception as err:  # noqa: BLE001 - recorded in the row; the suite goes on
                row.update(error=_error(err), fraction_of_peak=None)
            row["target_fraction"] = KERNEL_TARGET["target"]
            row["meets_target"] = _meets(row["fraction_of_peak"], KERNEL_TARGET["target"])
            rows.append(row)
            print(json.dumps(row), flush=True)
        del w, cases
        _free(env, rows[-1])
    return rows


# ------------------------------------------------------------------------------------------------
# End to end: GPT-2 training steps
# ------------------------------------------------------------------------------------------------


def _time_training(env: Env, model, opt, ids: torch.Tensor, steps: int, warmup: int) -> dict:
    """Median ms of one training step (forward, backward, optimizer step), peak memory, last loss."""
    losses = []

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    env.reset_peak_memory()
    ms = env.time(step, warmup=warmup, reps=steps)
    return {"ms": ms, "peak_mem_bytes": env.peak_memory(), "final_loss": float(losses[-1])}


def bench_end_to_end(env: Env, models: dict, steps: int, batch=(8, 1024), warmup: int = 3, rows: list | None = None,
                     budget: Budget | None = None, model_s: dict | None = None) -> list:
    """Time forward + backward + AdamW step of GPT-2 models, dense vs S-STE+MVUE.

    The optimizer step is in the loop on purpose: it changes the weights, so a cuSPARSELt layer
    compresses its W~ once per step, as in training.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    import sparsetrain

    rows = [] if rows is None else rows
    for name, size in models.items():
        if budget is not None:
            budget.check((model_s or {}).get(name, 0.0), f"end_to_end {name}")
        cfg = GPT2Config(**size)
        row = {"model": name, "config": dict(size), "batch": list(batch), "steps": steps,
               "dtype": str(env.dtype).replace("torch.", "")}
        for variant in ("dense", E2E_TARGET["variant"]):
            res, model, opt = {}, None, None
            try:
                torch.manual_seed(0)
                model = GPT2LMHeadModel(cfg).to(env.device, env.dtype)
                layers = []
                if variant != "dense":
                    sparsetrain.sparsify(model, sparsetrain.SparsityConfig(method="s-ste", mvue="exact", seed=0))
                    layers = [layer for _, layer in sparsetrain.sparse_layers(model)]
                    res["sparse_layers"] = len(layers)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                ids = torch.randint(0, cfg.vocab_size, tuple(batch), device=env.device)
                res.update(_time_training(env, model, opt, ids, steps, warmup))
                if layers:
                    res["backends"] = dict(Counter(layer.backend_name for layer in layers))
            except Exception as err:  # noqa: BLE001 - recorded in the row; the suite goes on
                res["error"] = _error(err)
            row[variant] = res
            del model, opt
            _free(env, res)
        dense_ms, sparse_ms = row["dense"].get("ms"), row[E2E_TARGET["variant"]].get("ms")
        row["speedup"] = dense_ms / sparse_ms if dense_ms and sparse_ms else None
        if name in E2E_TARGET["models"]:
            row["target_speedup"] = E2E_TARGET["target"]
            row["meets_target"] = _meets(row["speedup"], E2E_TARGET["target"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# Summary and driver
# ------------------------------------------------------------------------------------------------


def _verdict(flags) -> bool | None:
    """All True -> True; any False -> False; nothing evaluated (empty, or a None) -> None."""
    flags = list(flags)
    if any(f is False for f in flags):
        return False
    if not flags or any(f is None for f in flags):
        return None
    return True


class _Relu2(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x).square()


def build_relu2_ffn(variant: str, d: int, ff: int, env: Env):
    """``(ffn, sparse layers)``: ``Linear(d, ff) -> relu^2 -> Linear(ff, d)`` for an `ACT_VARIANTS` key
    (or ``"dense"``), swapped with `sparsify` as a model would be: weights on both layers, the
    activation mask on the input of the second (``activation_targets``)."""
    import sparsetrain

    torch.manual_seed(0)
    ffn = torch.nn.Sequential(torch.nn.Linear(d, ff), _Relu2(), torch.nn.Linear(ff, d)).to(env.device, env.dtype)
    if variant == "dense":
        return ffn, []
    cfg = sparsetrain.SparsityConfig(targets=r"^(0|2)$", activation_targets=r"^2$", backend="auto", seed=0,
                                     **ACT_VARIANTS[variant])
    sparsetrain.sparsify(ffn, cfg)
    return ffn, [layer for _, layer in sparsetrain.sparse_layers(ffn)]


def bench_activations(env: Env, case: tuple, model: dict, batch, steps: int, rows: list | None = None,
                      budget: Budget | None = None, row_s: float = 0.0) -> list:
    """Issue 21's rows: the squared-ReLU FFN forward+backward for dense, 2:4 weights, 2:4 activations
    and both (``case`` = ``(d, ff, tokens)``), each with its speedup over dense and the target of
    `ACT_TARGETS`; then one GPT-2 (``model``, squared ReLU) training step, dense vs both."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import sparsetrain

    rows = [] if rows is None else rows
    d, ff, t = case
    torch.manual_seed(0)
    x = torch.randn(t, d, device=env.device, dtype=env.dtype, requires_grad=True)
    gy = torch.randn(t, d, device=env.device, dtype=env.dtype)
    dense_ms = None
    for variant in ("dense", *ACT_VARIANTS):
        if budget is not None:
            budget.check(row_s, f"activations ffn {variant}")
        row = {"section": "activations", "module": "relu2-ffn", "d": d, "ff": ff, "tokens": t,
               "dtype": str(env.dtype).replace("torch.", ""), "method": variant}
        block, layers = None, []
        try:
            block, layers = build_relu2_ffn(variant, d, ff, env)
            row["ms"], row["peak_mem_bytes"] = _time_block(env, block, x, gy)
            row["backends"] = [layer.backend_name for layer in layers]
            if "activation_sparsity" in ACT_VARIANTS.get(variant, {}) and "cusparselt" in row["backends"]:
                from sparsetrain.backends.cusparselt_activation import compresses_fused

                row["activation_compression"] = "fused" if compresses_fused(ff, env.device, env.dtype) else "two-pass"
        except Exception as err:  # noqa: BLE001 - recorded in the row; the suite goes on
            row["error"] = _error(err)
        if variant == "dense":
            dense_ms = row.get("ms")
        else:
            row["speedup"] = dense_ms / row["ms"] if dense_ms and row.get("ms") else None
            if variant in ACT_TARGETS:
                row["target_speedup"] = ACT_TARGETS[variant]
                row["meets_target"] = _meets(row["speedup"], ACT_TARGETS[variant])
        del block, layers
        _free(env, row)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if budget is not None:
        budget.check(row_s * 4, "activations gpt2 step")
    cfg = GPT2Config(**{**model, "activation_function": "relu2"})
    row = {"section": "activations", "module": "gpt2-relu2-step", "config": dict(model), "batch": list(batch),
           "dtype": str(env.dtype).replace("torch.", "")}
    for variant in ("dense", "both"):
        res, net, opt = {}, None, None
        try:
            torch.manual_seed(0)
            net = GPT2LMHeadModel(cfg).to(env.device, env.dtype)
            if variant != "dense":
                sparsetrain.sparsify(net, sparsetrain.SparsityConfig(seed=0, **ACT_VARIANTS[variant]))
                res["backends"] = dict(Counter(layer.backend_name for _, layer in sparsetrain.sparse_layers(net)))
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
            ids = torch.randint(0, cfg.vocab_size, tuple(batch), device=env.device)
            res.update(_time_training(env, net, opt, ids, steps, 1))
        except Exception as err:  # noqa: BLE001 - recorded in the row
            res["error"] = _error(err)
        row[variant] = res
        del net, opt
        _free(env, res)
    a, b = row["dense"].get("ms"), row["both"].get("ms")
    row["speedup"] = a / b if a and b else None
    rows.append(row)
    print(json.dumps(row), flush=True)
    return rows


def summarize_targets(result: dict) -> dict:
    """The three targets, each with the rows it applies to and ``met`` (None: not evaluated)."""
    layers = result.get("layers") if isinstance(result.get("layers"), list) else []
    kernels = result.get("kernels") if isinstance(result.get("kernels"), list) else []
    e2e = result.get("end_to_end") if isinstance(result.get("end_to_end"), list) else []

    ffn_rows = [r for r in layers if "target_speedup" in r]
    primary = [r for r in ffn_rows if r["method"] == FFN_TARGET["primary"]]
    t = FFN_TARGET
    ffn = {
        "target": t["target"], "measure": "speedup of forward+backward over dense",
        "applies_to": f"module={t['module']} d={t['d']} ff={t['ff']} tokens={t['tokens']}; met by {t['primary']}",
        "results": {r["method"]: r.get("speedup") for r in ffn_rows},
        "met_by": [r["method"] for r in ffn_rows if r.get("meets_target")],
        "met": _verdict(r.get("meets_target") for r in primary),
    }
    # Kernels: rows whose input fits in L2 are read from cache; they do not count when others exist.
    krows = [r for r in kernels if "target_fraction" in r]
    counted = [r for r in krows if r.get("fits_in_l2") is not True] or krows
    kern = {
        "target": KERNEL_TARGET["target"], "measure": "achieved GB/s / peak memory bandwidth",
        "applies_to": "every kernel row (rows whose input fits in L2 ignored when larger ones exist)",
        "peak_GBps": result.get("peak_GBps"),
        "results": {f"{r['kernel']}@{r['shape'][0]}x{r['shape'][1]}": r.get("fraction_of_peak") for r in counted},
        "met": _verdict(r.get("meets_target") for r in counted),
    }
    erows = [r for r in e2e if "target_speedup" in r]
    end = {
        "target": E2E_TARGET["target"], "measure": f"training-step speedup of {E2E_TARGET['variant']} over dense",
        "applies_to": ", ".join(E2E_TARGET["models"]),
        "results": {r["model"]: r.get("speedup") for r in erows},
        "met": _verdict(r.get("meets_target") for r in erows),
    }
    return {"ffn_speedup": ffn, "kernel_fraction_of_peak": kern, "end_to_end_speedup": end}


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("triton", "transformers", "torchao"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken: no version to report
            out[mod] = None
    return out


def _layer_cases(shapes, tokens, target_case) -> list:
    """``(shape, tokens, modules)`` for every shape and token count, without the target case."""
    t_shape, t_tokens, t_modules = target_case
    cases = []
    for shape in shapes:
        for t in tokens:
            modules = tuple(m for m in ("linear", "ffn") if (shape, t) != (t_shape, t_tokens) or m not in t_modules)
            if modules:
                cases.append((shape, t, modules))
    return cases


# Rough seconds on an H100/H200, used only to decide whether a row still fits in the budget
# (estimates, not measurements: replace them with the first run's numbers).
GPU_ESTIMATES = {"probe": 15.0, "layer_row": 8.0, "kernel_row": 3.0, "gpu_tests_min": 60.0, "gpu_tests_max": 300.0,
                 "e2e": {"gpt2-124m": 45.0, "gpt2-774m": 120.0}}
SMOKE_ESTIMATES = {"probe": 0.0, "layer_row": 0.0, "kernel_row": 0.0, "gpu_tests_min": 0.0, "gpu_tests_max": 300.0,
                   "e2e": {}}
_SMOKE_SHAPE = ("smoke-d64-ff256", 64, 256)
SMOKE = {
    "target_case": (_SMOKE_SHAPE, 64, ("ffn",)), "layer_cases": _layer_cases([_SMOKE_SHAPE], [64], (_SMOKE_SHAPE, 64, ("ffn",))),
    "kernel_sizes": [(64, 64)],
    "models": {"gpt2-smoke": {"n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 256, "n_positions": 64,
                              "bos_token_id": 0, "eos_token_id": 0}},
    "batch": (2, 64), "steps": 3, "e2e_warmup": 1, "warmup": 1, "reps": 3, "estimates": SMOKE_ESTIMATES,
    "act_case": (64, 256, 64),
}
_TARGET_CASE = (FFN_SHAPES[-1], FFN_TARGET["tokens"], (FFN_TARGET["module"],))
QUICK = {
    "target_case": _TARGET_CASE, "layer_cases": _layer_cases([FFN_SHAPES[0], FFN_SHAPES[-1]], [16384], _TARGET_CASE),
    "kernel_sizes": [(4096, 4096), (11008, 4096)],
    "models": {"gpt2-124m": GPT2_SIZES["gpt2-124m"]}, "batch": (8, 1024), "steps": 5, "e2e_warmup": 3,
    "warmup": 3, "reps": 10, "estimates": GPU_ESTIMATES, "act_case": (4096, 16384, 16384),
}
FULL = {
    "target_case": _TARGET_CASE, "layer_cases": _layer_cases(FFN_SHAPES, TOKENS, _TARGET_CASE),
    "kernel_sizes": [(4096, 4096), (16384, 16384), (11008, 4096)],
    "models": GPT2_SIZES, "batch": (8, 1024), "steps": 20, "e2e_warmup": 3, "warmup": 3, "reps": 10,
    "estimates": GPU_ESTIMATES, "act_case": (4096, 16384, 16384),
}
# The target section measures the method the target is about first.
TARGET_METHODS = (FFN_TARGET["primary"], *[m for m in METHODS if m != FFN_TARGET["primary"]])
SECTION_ORDER = ("probes", "ffn_target", "gpu_tests", "kernels", "end_to_end", "layers", "activations")


def _write(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(path)  # a run killed mid-write leaves the previous complete file


def run_suite(env: Env, plan: dict, result: dict, path: Path | None = None, budget: Budget | None = None,
              run_tests: bool = True) -> dict:
    """Run the sections of `SECTION_ORDER` with ``env`` and ``plan`` into ``result``.

    The JSON is written after each section (``"complete": false`` until the end), so a run that
    dies part way (a crashed CUDA context, a killed job) leaves what it had measured. A section
    that raises is recorded and the next one runs; when ``budget`` runs out the section stops at
    the row that would not fit, and that row and everything after it are listed in ``skipped``.
    """
    budget = budget or Budget(float("inf"))
    est = plan["estimates"]
    result["complete"] = False
    result.setdefault("skipped", [])
    result.setdefault("sections", {})
    for key in ("probes", "layers", "kernels", "end_to_end", "activations"):
        result.setdefault(key, [])
    _write(path, result)

    def gpu_tests(_rows):
        budget.check(est["gpu_tests_min"], "gpu_tests")
        result["gpu_tests"] = run_gpu_tests(timeout_s=max(1.0, min(est["gpu_tests_max"], budget.left())))
        print("gpu tests:", result["gpu_tests"]["summary"], flush=True)
        if result["gpu_tests"]["returncode"] is None:
            raise BudgetExhausted(f"gpu_tests: {result['gpu_tests']['summary']} (the budget left)")

    sections = {
        "probes": ("probes", lambda rows: run_probes(env, rows, budget, est["probe"])),
        "ffn_target": ("layers", lambda rows: bench_layers(env, [plan["target_case"]], TARGET_METHODS, rows, budget,
                                                           est["layer_row"])),
        "gpu_tests": (None, gpu_tests),
        "kernels": ("kernels", lambda rows: bench_kernels(env, plan["kernel_sizes"], rows, budget, est["kernel_row"])),
        "end_to_end": ("end_to_end", lambda rows: bench_end_to_end(
            env, plan["models"], plan["steps"], plan["batch"], plan["e2e_warmup"], rows, budget, est["e2e"])),
        "layers": ("layers", lambda rows: bench_layers(env, plan["layer_cases"], tuple(METHODS), rows, budget,
                                                       est["layer_row"])),
        "activations": ("activations", lambda rows: bench_activations(
            env, plan["act_case"], next(iter(plan["models"].values())), plan["batch"], plan["steps"], rows, budget,
            est["layer_row"])),
    }
    stopped = None
    for name in SECTION_ORDER:
        key, fn = sections[name]
        if name == "gpu_tests" and not run_tests:
            continue
        if stopped is not None:
            result["sections"][name] = {"status": "skipped", "reason": stopped}
            result["skipped"].append(f"{name}: not started ({stopped})")
            continue
        t0 = time.perf_counter()
        try:
            fn(result[key] if key else None)
            status = {"status": "done"}
        except BudgetExhausted as err:
            stopped = str(err)
            status = {"status": "stopped", "reason": stopped}
            result["skipped"].append(f"{name}: stopped at {err}")
            print(f"budget: {err}; stopping here", flush=True)
        except Exception as err:  # noqa: BLE001 - e.g. the layer API is missing: keep the other sections
            status = {"status": "error", "error": _error(err)}
            print(f"{name}: {err!r}", flush=True)
        result["sections"][name] = {**status, "s": round(time.perf_counter() - t0, 1)}
        _write(path, result)
    result["targets"] = summarize_targets(result)
    result["complete"] = True
    _write(path, result)
    return result


# ------------------------------------------------------------------------------------------------
# Rehearsal: the smoke run in an environment shaped like the GPU machine
# ------------------------------------------------------------------------------------------------

# What the GPU machine's image has (with their dependencies); it has no network, `datasets` is
# not there and sparsetrain is not installed.
GPU_MACHINE_PACKAGES = ("torch", "triton", "lightning", "transformers", "accelerate", "hypothesis", "pytest",
                        "scipy", "matplotlib", "tokenizers")
ABSENT_ON_GPU_MACHINE = ("datasets", "sparsetrain")


def requirement_closure(roots) -> tuple[dict, list]:
    """``({name: Distribution}, missing)``: ``roots`` and everything they require (no extras),
    as installed in this environment."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found, missing, todo = {}, [], list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found or name in missing:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        found[name] = dist
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return found, missing


def _link_distribution(dist, site: Path) -> None:
    """Symlink a distribution's top-level packages, modules and metadata into ``site``."""
    base = Path(dist.locate_file(""))
    tops = {Path(f).parts[0] for f in (dist.files or []) if Path(f).parts and not str(f).startswith("..")}
    tops.discard("__pycache__")
    if not tops:  # no RECORD: the metadata directory and the names top_level.txt gives
        tops = {Path(dist._path).name, *(dist.read_text("top_level.txt") or "").split()}  # noqa: SLF001
    for top in sorted(tops):
        src, dst = base / top, site / top
        if not dst.exists() and (src.exists() or src.with_suffix(".py").exists()):
            dst.symlink_to(src if src.exists() else src.with_suffix(".py"))


def build_gpu_like_venv(venv: Path) -> dict:
    """A venv whose site-packages holds only `GPU_MACHINE_PACKAGES` and their dependencies,
    symlinked from this environment (nothing is downloaded), with ``python3`` but no ``python``."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    dists, missing = requirement_closure(GPU_MACHINE_PACKAGES)
    for name in ABSENT_ON_GPU_MACHINE:
        if name in dists:
            raise RuntimeError(f"{name!r} is a dependency of the GPU machine's packages here; the rehearsal cannot hide it")
    for dist in dists.values():
        _link_distribution(dist, site)
    # The GPU machine documents `python3` only: drop `python`. venv chains its links differently by
    # where it is run from (from pyenv: python -> python3 -> interpreter; from inside another venv:
    # python, python3 -> python3.11 -> interpreter), so every `python3*` now points straight at the
    # interpreter; a venv finds its pyvenv.cfg from the link's own folder, so that is enough.
    bin_dir = venv / "bin"
    real = (bin_dir / "python").resolve()
    links = [p.name for p in bin_dir.glob("python*") if p.is_symlink()]
    for name in links:
        (bin_dir / name).unlink()
    for name in links:
        if name != "python":
            (bin_dir / name).symlink_to(real)
    return {"packages": sorted(dists), "missing_here": sorted(missing)}


# Finds each module without importing it (imports would cost a minute on a busy 2-core machine);
# the smoke run then imports them all for real.
_VENV_CHECK = """
import importlib.util, json
print(json.dumps({name: "ok" if importlib.util.find_spec(name) else "ModuleNotFoundError" for name in %r + %r}))
"""


def rehearse(out_dir: str | None = None) -> int:
    """Run ``gpu_suite.sh --smoke-cpu`` in a fresh venv shaped like the GPU machine; 0 when every
    section ran, every probe passed and every test module imported (``pytest -m gpu`` collected
    everything), 1 otherwise. The JSON goes to ``out_dir`` (a temporary directory by default)."""
    t0 = time.perf_counter()
    problems = []
    with tempfile.TemporaryDirectory(prefix="gpu_suite_rehearsal_") as tmp:
        venv = Path(tmp) / "venv"
        info = build_gpu_like_venv(venv)
        print(f"rehearsal venv: {len(info['packages'])} distributions linked; not installed here: "
              f"{info['missing_here'] or 'none'} ({time.perf_counter() - t0:.0f} s)", flush=True)
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "TRITON_INTERPRET", "PYTHON")}
        env.update(PATH=f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", CUDA_VISIBLE_DEVICES="")
        imports = [p.replace("-", "_") for p in GPU_MACHINE_PACKAGES]
        res = subprocess.run([str(venv / "bin" / "python3"), "-c", _VENV_CHECK % (imports, list(ABSENT_ON_GPU_MACHINE))],
                             capture_output=True, text=True, cwd=tmp, env=env, check=False)
        seen = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {}
        print("rehearsal venv imports:", seen or res.stderr[-2000:], flush=True)
        for name in imports:
            if seen.get(name) != "ok" and name.replace("_", "-") not in info["missing_here"]:
                problems.append(f"`import {name}` fails in the rehearsal venv: {seen.get(name)}")
        for name in ABSENT_ON_GPU_MACHINE:
            if seen.get(name) != "ModuleNotFoundError":
                problems.append(f"`import {name}` must fail in the rehearsal venv, got {seen.get(name)}")
        out = Path(out_dir) if out_dir else Path(tmp) / "out"
        res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--smoke-cpu", "--out", str(out)],
                             capture_output=True, text=True, cwd=ROOT, env=env, check=False, timeout=600)
        log = res.stdout + res.stderr
        path = out / "gpu_suite_cpu_smoke.json"
        if res.returncode != 0 or not path.exists():
            problems.append(f"gpu_suite.sh exited {res.returncode} without a result:\n{log[-3000:]}")
        else:
            problems += check_smoke_result(json.loads(path.read_text()))
    print(f"rehearsal: {time.perf_counter() - t0:.0f} s", flush=True)
    if problems:
        print("REHEARSAL FAILED:", *problems, sep="\n- ", file=sys.stderr)
        return 1
    print("rehearsal passed: every section ran and every test module imported without `datasets` and "
          "without an installed sparsetrain")
    return 0


def _error_keys(obj, where: str = "") -> list:
    """Every key named like an error anywhere in ``obj``, with where it is."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "error" in str(k):
                found.append(f"{where}.{k}: {v}")
            found += _error_keys(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _error_keys(v, f"{where}[{i}]")
    return found


def check_smoke_result(result: dict) -> list:
    """What is wrong with a ``--smoke-cpu`` result (empty when nothing is)."""
    problems = [f"error in the result: {e}"[:600] for e in _error_keys(result)]
    if result.get("complete") is not True:
        problems.append("the run did not complete")
    for name in SECTION_ORDER:
        status = result.get("sections", {}).get(name, {}).get("status")
        if status != "done":
            problems.append(f"section {name!r}: {status or 'missing'}")
    tests = result.get("gpu_tests", {})
    if tests.get("returncode") != 0:
        problems.append(f"`pytest -m gpu tests/` exited {tests.get('returncode')}: {tests.get('summary')}\n"
                        f"{tests.get('output_tail', '')[-2000:]}")
    bad = [r["probe"] for r in result.get("probes", []) if r.get("ok") is not True and "skipped" not in r]
    if bad or not result.get("probes"):
        problems.append(f"probes failed: {bad or 'none ran'}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Sections run in this order: " + ", ".join(SECTION_ORDER) + ". With --budget-s the run stops "
               "cleanly before the first section or row that would not fit in the time left; the JSON lists "
               "them under 'skipped'.",
    )
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, metavar="N",
                   help="seconds this run may take from its start (default %(default)g: about 8 minutes in all on "
                        "an H100/H200, with start-up and Triton compilation); the correctness probes run first, "
                        "then the FFN target shape, the gpu tests, kernels, end-to-end steps and the other shapes")
    p.add_argument("--quick", action="store_true", help="the target FFN shape and a few others, few steps")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="run every section on the CPU at tiny shapes (cuSPARSELt emulated, Triton interpreted, "
                        "gpu tests collected and skipped; no bandwidth figures)")
    p.add_argument("--rehearse", action="store_true",
                   help="build a venv with only the GPU machine's packages (no `datasets`, sparsetrain not "
                        "installed), run `gpu_suite.sh --smoke-cpu` in it, and fail if any section could not run")
    p.add_argument("--skip-tests", action="store_true", help="do not run `pytest -m gpu`")
    p.add_argument("--peak-gbps", type=float, default=None, help="the device's memory bandwidth, if not in the table")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s:g}")
    if args.rehearse:
        return rehearse(args.out if args.out != p.get_default("out") else None)
    t0 = time.perf_counter()
    budget = Budget(args.budget_s)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _stamp import stamp  # the commit is None where the tree was copied without .git

    started = stamp()
    if args.smoke_cpu:
        torch.set_num_threads(1)  # tiny shapes: one thread, no waits on a shared machine's busy cores
        plan = SMOKE
        env = cpu_env(plan["warmup"], plan["reps"])
        result = {"mode": "smoke-cpu", "device": "cpu", "capability": None, "cusparselt": None}
        stem = "gpu_suite_cpu_smoke"
    elif not torch.cuda.is_available():
        print("gpu_suite: no CUDA device on this machine; nothing to benchmark (exiting cleanly).")
        return 0
    else:
        plan = QUICK if args.quick else FULL
        env = cuda_env(plan["warmup"], plan["reps"], peak_gbps=args.peak_gbps)
        device = torch.cuda.get_device_name()
        cusparselt = torch.backends.cusparselt
        result = {"mode": "quick" if args.quick else "full", "device": device,
                  "capability": list(torch.cuda.get_device_capability()),
                  "cusparselt": cusparselt.is_available(),
                  "cusparselt_version": cusparselt.version() if cusparselt.is_available() else None}
        stem = f"gpu_suite_{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_')}" + ("_quick" if args.quick else "")
    result["stamp"] = started
    result.update(_versions())
    result.update(python=sys.executable, dtype=str(env.dtype).replace("torch.", ""), timer=env.timer.__name__,
                  threads=torch.get_num_threads(), peak_GBps=env.peak_gbps, peak_GBps_source=env.peak_gbps_source,
                  l2_cache_bytes=env.l2_bytes, budget_s=args.budget_s)
    path = Path(args.out) / f"{stem}.json"
    if args.skip_tests:
        result["gpu_tests"] = {"skipped": "--skip-tests"}
    run_suite(env, plan, result, path, budget, run_tests=not args.skip_tests)
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    _write(path, result)
    print("targets:", json.dumps({k: v["met"] for k, v in result["targets"].items()}), flush=True)
    if result["skipped"]:
        print("skipped (budget):", *result["skipped"], sep="\n  ", flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
