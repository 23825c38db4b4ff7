"""Triton kernels against their `sparsetrain.ops` twins.

On CPU the kernels run in Triton's interpreter: `sparsetrain.kernels._launch.DualKernel` picks the
interpreter per launch for CPU tensors, so this file sets nothing at import. (It used to set
``TRITON_INTERPRET=1`` here; pytest imports every test module before deselecting, so that sent the
CUDA launches of the ``gpu`` tests through the interpreter too, and no kernel was ever compiled.)
On CUDA the ``gpu`` tests below compile the kernels and compare them with the torch twins run on
the same device.
"""

import itertools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from sparsetrain import kernels, ops  # noqa: E402
from sparsetrain.kernels import _launch  # noqa: E402
from sparsetrain.kernels.mvue import mvue24_forward  # noqa: E402
from sparsetrain.kernels.transposable import PATTERNS  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 4), (3, 12), (37, 132), (129, 8)]
NM = [(2, 4), (1, 4), (4, 8), (2, 8), (3, 6)]
# The CUDA cases are `gpu` tests: `pytest -m gpu` runs them (compiled), conftest skips them without CUDA.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Only combinations where the columns divide into groups of m.
SHAPE_NM = [(s, n, m) for s in SHAPES for n, m in NM if s[-1] % m == 0]


def _weight(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w.view(-1)[::11] = 0.0  # exact zeros and ties inside groups exercise the tie rule
    w.view(-1)[5::13] = w.view(-1)[4::13][: w.view(-1)[5::13].numel()]
    return w.to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------- projection


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n,m", SHAPE_NM)
def test_project_hard_bit_exact(device, dtype, shape, n, m):
    w = _weight(shape, dtype, device)
    for method in ("hard",):
        w_eff, mask = kernels.project_weight(w, n, m, method)
        assert mask.dtype == torch.bool and w_eff.dtype == dtype
        assert torch.equal(mask, ops.nm_mask(w, n, m))
        assert torch.equal(w_eff, ops.project_nm(w, n, m))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n,m", SHAPE_NM)
def test_project_soft_bit_exact(device, dtype, shape, n, m):
    w = _weight(shape, dtype, device, seed=1)
    beta = ops.sste_scale(w, n, m)
    w_eff, mask = kernels.project_weight(w, n, m, "soft", beta)
    ref = (beta * ops.soft_threshold(w.float(), n, m)).to(dtype)
    assert torch.equal(w_eff, ref)
    assert torch.equal(mask, ops.nm_mask(w, n, m))
    assert not bool(w_eff[~mask].any())  # zero off the mask: compressible as is


def test_project_3d_and_float_beta():
    w = _weight((2, 5, 8), torch.float32)
    w_eff, mask = kernels.project_weight(w, 2, 4, "soft", 1.5)
    assert torch.equal(w_eff, (torch.tensor(1.5) * ops.soft_threshold(w, 2, 4)))
    assert torch.equal(mask, ops.nm_mask(w, 2, 4))


def test_project_errors():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="`mode`='bad'.*'hard'"):
        kernels.project_weight(w, 2, 4, "bad")
    with pytest.raises(ValueError, match="`beta` is required"):
        kernels.project_weight(w, 2, 4, "soft")
    with pytest.raises(ValueError, match="multiple of m=3"):
        kernels.project_weight(w, 1, 3, "hard")
    with pytest.raises(TypeError, match="`weight` must be a floating"):
        kernels.project_weight(w.int(), 2, 4, "hard")
    with pytest.raises(ValueError, match="`n`"):
        kernels.project_weight(w, 4, 4, "hard")


def test_available_is_cuda_only():
    assert kernels.available(torch.zeros(1)) is False
    assert kernels.available(None) is False


# ----------------------------------------------------------------------------- MVUE


def _uniforms(g, dim, method, seed):
    """The uniforms ops.mvue24 draws from a generator seeded with `seed`: (r, P, L/4, Q)."""
    dim = dim % g.dim()
    pre, post = math.prod(g.shape[:dim]), math.prod(g.shape[dim + 1 :])
    shape = (2 if method == "approx" else 1, pre, g.shape[dim] // 4, post)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


MVUE_CASES = [((4,), 0), ((12, 5), 0), ((3, 132), -1), ((2, 8, 3), 1), ((36, 37), 0), ((1, 4), 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", MVUE_CASES)
def test_mvue_exact_given_uniforms_bit_exact(dtype, shape, dim):
    g = _weight(shape, dtype, seed=2)
    ref = ops.mvue24(g, dim, "exact", torch.Generator().manual_seed(7))
    out = mvue24_forward(g, dim, "exact", uniforms=_uniforms(g, dim, "exact", 7))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", MVUE_CASES)
def test_mvue_approx_given_uniforms(dtype, shape, dim):
    g = _weight(shape, dtype, seed=3)
    ref = ops.mvue24(g, dim, "approx", torch.Generator().manual_seed(8))
    out = mvue24_forward(g, dim, "approx", uniforms=_uniforms(g, dim, "approx", 8))
    # Same draws, so the same entries are kept.
    assert torch.equal(out != 0, ref != 0)
    # The kernel sums the 4 terms of each group in index order; torch's vectorised reductions
    # reorder them depending on the tensor's shape, so 1/p may differ in the last float32 bits
    # (a few ulp, observed <= 4). After rounding to bf16/fp16 that is at most one ulp of the dtype.
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=5e-7, atol=0)
    else:
        torch.testing.assert_close(out, ref, rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("method", ["exact", "approx"])
def test_mvue_unbiased_and_two_per_group(method):
    # One group repeated 4096 times: 4096 independent draws in one launch.
    base = torch.tensor([[3.0, -1.0, 0.5, 0.0], [1.0, 1.0, -1.0, 2.0], [10.0, 0.1, -0.2, 0.3]])
    g = base.repeat(4096, 1)  # (12288, 4)
    out = mvue24_forward(g, -1, method, torch.Generator().manual_seed(0))
    assert int((out != 0).sum(-1).max()) <= 2
    draws = out.view(4096, 3, 4)
    p = ops.mvue24_probabilities(base.abs(), method)
    var = base**2 * (1 / p.clamp_min(1e-12) - 1)  # Var of a Horvitz-Thompson entry: g^2 (1/p - 1)
    bound = 5 * (var / 4096).sqrt() + 1e-6  # 5 sigma, seed fixed: not flaky
    assert bool(((draws.mean(0) - base).abs() <= bound).all())
    freq = (draws != 0).float().mean(0)
    assert bool(((freq - p).abs() <= 5 * (p * (1 - p) / 4096).sqrt() + 1e-6).all())


def test_mvue_seeded_and_exact_two_kept():
    g = _weight((16, 24), torch.float32, seed=4)
    a = kernels.mvue24(g, 0, "exact", torch.Generator().manual_seed(5))
    b = kernels.mvue24(g, 0, "exact", torch.Generator().manual_seed(5))
    c = kernels.mvue24(g, 0, "exact", torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    nz_in = (g.view(4, 4, 24) != 0).sum(1)
    nz_out = (a.view(4, 4, 24) != 0).sum(1)
    assert torch.equal(nz_out, nz_in.clamp(max=2))  # exactly min(2, nnz) kept per group


def test_mvue_transposed_out_layout():
    g = _weight((8, 12), torch.bfloat16, seed=6)
    u = _uniforms(g, 0, "exact", 9)
    plain = mvue24_forward(g, 0, "exact", uniforms=u)
    out_t = torch.empty(12, 8, dtype=g.dtype)
    mvue24_forward(g, 0, "exact", uniforms=u, out=out_t.t())
    assert torch.equal(out_t, plain.t())


def test_mvue_errors():
    with pytest.raises(ValueError, match="`method`='x'"):
        kernels.mvue24(torch.zeros(4), method="x")
    with pytest.raises(ValueError, match="not a multiple of 4"):
        kernels.mvue24(torch.zeros(6))
    with pytest.raises(TypeError, match="floating"):
        kernels.mvue24(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="`uniforms` must have shape"):
        mvue24_forward(torch.zeros(8), uniforms=torch.zeros(3, 1))


# ----------------------------------------------------------------------------- transposable


def _brute_force_transposable(score):
    """Every 4x4 tile: the best of all 0/1 tiles with two ones per row and column (float64 sums)."""
    rows = [r for r in itertools.product([0, 1], repeat=4) if sum(r) == 2]
    tiles = [torch.tensor(t, dtype=torch.float64) for t in itertools.product(rows, repeat=4)]
    tiles = torch.stack([t for t in tiles if bool((t.sum(0) == 2).all())])  # (90, 4, 4)
    r, c = score.shape
    s = score.double().view(r // 4, 4, c // 4, 4).permute(0, 2, 1, 3)  # (R, C, 4, 4)
    obj = torch.einsum("abij,kij->abk", s, tiles)
    best = obj.argmax(-1)
    return tiles[best].permute(0, 2, 1, 3).reshape(r, c).bool(), obj.max(-1).values


def test_transposable_pattern_table():
    assert len(PATTERNS) == 90 == len(set(PATTERNS))
    for p in PATTERNS:
        t = torch.tensor([(p >> e) & 1 for e in range(16)]).view(4, 4)
        assert bool((t.sum(0) == 2).all()) and bool((t.sum(1) == 2).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 4), (8, 12), (36, 20), (4, 132)])
def test_transposable_matches_brute_force(dtype, shape):
    score = _weight(shape, dtype, seed=10).abs()
    score = score + torch.rand(shape, generator=torch.Generator().manual_seed(11)).to(dtype) * 0.01
    mask = kernels.transposable24(score)
    ref, best = _brute_force_transposable(score.float())
    assert torch.equal(mask, ref)
    tiles = mask.view(shape[0] // 4, 4, shape[1] // 4, 4)
    assert bool((tiles.sum(1) == 2).all()) and bool((tiles.sum(3) == 2).all())
    twin = ops.transposable_mask(score, 2, 4, method="exact24")
    kept = lambda m: (score.double() * m).view(shape[0] // 4, 4, shape[1] // 4, 4).sum((1, 3))  # noqa: E731
    # Ties between patterns may be broken differently; the kept score must be the same optimum.
    torch.testing.assert_close(kept(mask), kept(twin.bool()), rtol=1e-6, atol=0)


def test_transposable_ties_are_valid_and_first():
    mask = kernels.transposable24(torch.ones(8, 8))
    first = torch.tensor([(PATTERNS[0] >> e) & 1 for e in range(16)], dtype=torch.bool).view(4, 4)
    assert torch.equal(mask, first.repeat(2, 2))


def test_transposable_errors():
    with pytest.raises(ValueError, match="multiples of 4"):
        kernels.transposable24(torch.rand(6, 8))
    with pytest.raises(TypeError, match="floating"):
        kernels.transposable24(torch.ones(4, 4, dtype=torch.int64))


# ----------------------------------------------------------------------------- interpreter robustness


def test_interpreter_independent_of_import_order():
    """Triton imported (by lightning) before TRITON_INTERPRET is set: kernels still run on CPU."""
    code = textwrap.dedent(
        """
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import triton, triton.language as tl  # imported first, compile mode
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        from sparsetrain import kernels
        g = torch.randn(8, 8)
        a = kernels.mvue24(g, 0, "exact", torch.Generator().manual_seed(0))
        b = kernels.mvue24(g, 0, "exact", torch.Generator().manual_seed(0))
        assert torch.equal(a, b) and int((a.view(2, 4, 8) != 0).sum(1).max()) <= 2
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_launch_mode_per_tensor_not_per_import(monkeypatch):
    """CPU tensors are interpreted; other devices compile unless TRITON_INTERPRET=1 asks otherwise."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    meta = torch.empty(4, device="meta")  # stands in for a CUDA tensor: not on the CPU
    assert _launch.launch_mode(torch.zeros(4)) == "interpreted"
    assert _launch.launch_mode(meta, 3) == "compiled"
    assert _launch.launch_mode(meta, torch.zeros(1)) == "interpreted"  # any CPU operand
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _launch.launch_mode(meta) == "interpreted"


def test_interpret_flag_without_knobs(monkeypatch):
    """Triton < 3.4 has no `triton.knobs`: the flag is then read from the environment."""
    import triton

    monkeypatch.delattr(triton, "knobs", raising=False)
    monkeypatch.setitem(sys.modules, "triton.knobs", None)  # `from triton import knobs` -> ImportError
    with pytest.raises(ImportError):
        from triton import knobs  # noqa: F401
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _launch._interpret_requested() is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _launch._interpret_requested() is False


def test_kernel_launch_on_cpu_records_interpreted():
    from sparsetrain.kernels import nm_project

    kernels.project_weight(torch.randn(4, 8), 2, 4, "hard")
    assert nm_project._nm_project.last_mode == "interpreted"


# ----------------------------------------------------------------------------- compiled, on CUDA
# Tolerances of the compiled kernels against their torch twins on the same device:
# - projection (hard and soft): bit-exact. The kernel only selects, subtracts and multiplies once,
#   each an IEEE-rounded PTX instruction with nothing to contract into an FMA.
# - MVUE given the same uniforms: the kept entries (the mask) bit-equal; values within 4 float32
#   ulp (rtol 2**-21) in float32, one ulp of the dtype (rtol = eps) in bf16/fp16, because Triton
#   lowers an fp32 division to the approximate `div.full.f32` (<= 2 ulp) and may contract a*b+c.
# - transposable 2:4: a valid mask whose kept score is the brute-force optimum (ties may differ).


def _compiled(kernel_module_attr):
    mod_name, attr = kernel_module_attr
    import importlib

    return getattr(importlib.import_module(f"sparsetrain.kernels.{mod_name}"), attr).last_mode


@pytest.fixture
def cuda_compiled():
    if _launch._interpret_requested():
        pytest.fail("TRITON_INTERPRET=1 is set: the gpu tests must compile the kernels; unset it")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n,m", [((256, 512), 2, 4), ((37, 132), 2, 4), ((64, 96), 3, 6), ((128, 256), 4, 8)])
def test_cuda_project_compiled_bit_exact(cuda_compiled, dtype, shape, n, m):
    w = _weight(shape, dtype, "cuda", seed=12)
    for method in ("ste", "s-ste"):
        beta = ops.sste_scale(w, n, m) if method == "s-ste" else None
        w_eff, mask = kernels.project_weight(w, n, m, "soft" if method == "s-ste" else "hard", beta)
        assert _compiled(("nm_project", "_nm_project")) == "compiled"
        ref = ops.project_nm(w, n, m) if method == "ste" else (beta * ops.soft_threshold(w.float(), n, m)).to(dtype)
        assert torch.equal(mask, ops.nm_mask(w, n, m)), method
        assert torch.equal(w_eff, ref), method


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["exact", "approx"])
@pytest.mark.parametrize("shape,dim", [((1024, 384), 0), ((96, 2048), -1), ((8, 64, 12), 1)])
def test_cuda_mvue_compiled_matches_twin(cuda_compiled, dtype, method, shape, dim):
    g = _weight(shape, dtype, "cuda", seed=13)
    u = _uniforms(g, dim, method, 14).cuda()
    out = mvue24_forward(g, dim, method, uniforms=u)
    assert _compiled(("mvue", "_mvue24")) == "compiled"
    # The twin with the same uniforms: ops.mvue24 draws exactly these from a CPU generator.
    ref = ops.mvue24(g.cpu(), dim, method, torch.Generator().manual_seed(14)).cuda()
    assert torch.equal(out != 0, ref != 0)
    rtol = 2.0**-21 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(out, ref, rtol=rtol, atol=0)


@pytest.mark.gpu
def test_cuda_mvue_statistics_and_seed(cuda_compiled):
    g = torch.tensor([[3.0, -1.0, 0.5, 0.0]], device="cuda").repeat(1 << 16, 1).to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = kernels.mvue24(g, -1, "exact", gen).float()
    assert _compiled(("mvue", "_mvue24")) == "compiled"
    assert int((out != 0).sum(-1).max()) <= 2
    # 65536 draws: each mean within 5 standard errors of the entry (Var = g^2 (1/p - 1)).
    p = ops.mvue24_probabilities(g[0].float().abs().cpu(), "exact").cuda()
    se = (g[0].float() ** 2 * (1 / p.clamp_min(1e-12) - 1) / g.shape[0]).sqrt()
    assert bool(((out.mean(0) - g[0].float()).abs() <= 5 * se + 1e-3).all())
    gen2 = torch.Generator(device="cuda").manual_seed(0)
    assert torch.equal(kernels.mvue24(g, -1, "exact", gen2).float(), out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_transposable_compiled_optimal(cuda_compiled, dtype):
    shape = (64, 96)
    score = _weight(shape, dtype, seed=15).abs()
    score = score + torch.rand(shape, generator=torch.Generator().manual_seed(16)).to(dtype) * 0.01
    mask = kernels.transposable24(score.cuda())
    assert _compiled(("transposable", "_transposable24")) == "compiled"
    _, best = _brute_force_transposable(score.float())
    tiles = mask.cpu().view(shape[0] // 4, 4, shape[1] // 4, 4)
    assert bool((tiles.sum(1) == 2).all()) and bool((tiles.sum(3) == 2).all())
    kept = (score.double() * mask.cpu()).view(shape[0] // 4, 4, shape[1] // 4, 4).sum((1, 3))
    torch.testing.assert_close(kept, best, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- the layer's choice


@pytest.mark.parametrize("method", ["ste", "sr-ste", "s-ste"])
def test_layer_uses_kernels_when_available(monkeypatch, method):
    """With `available` true (here: the interpreter on CPU), the layer's forward, backward and mask
    update run the kernels and give the torch reference's results bit for bit."""
    from sparsetrain import SparseLinear, SparsityConfig

    cfg = SparsityConfig(method=method, mvue="exact", seed=3)
    torch.manual_seed(0)
    ref = SparseLinear(32, 16, config=cfg)
    lay = SparseLinear(32, 16, config=cfg)
    lay.load_state_dict(ref.state_dict())
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
    y_ref = ref(x)
    y_ref.pow(2).sum().backward()
    calls = []
    for name in ("project_weight", "mvue24"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    monkeypatch.setattr(kernels, "available", lambda t: isinstance(t, torch.Tensor))
    y = lay(x)
    y.pow(2).sum().backward()
    assert torch.equal(y, y_ref)
    assert "project_weight" in calls and "mvue24" in calls
    # The MVUE draw comes from the kernel's own RNG: same support size, not the same entries.
    assert lay.weight.grad.shape == ref.weight.grad.shape and torch.isfinite(lay.weight.grad).all()
    torch.testing.assert_close(lay.bias.grad, ref.bias.grad)
    with torch.no_grad():
        lay.weight.add_(0.01)
        ref.weight.add_(0.01)
    assert torch.equal(lay.mask, ref.mask)
    assert torch.equal(lay.effective_weight() == 0, ref.effective_weight() == 0)


def test_layer_transposable_refresh_uses_kernel(monkeypatch):
    from sparsetrain import SparseLinear, SparsityConfig

    cfg = SparsityConfig(method="sr-ste", transposable=True, transposable_method="exact24")
    torch.manual_seed(0)
    ref = SparseLinear(16, 16, config=cfg)
    lay = SparseLinear(16, 16, config=cfg)
    lay.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for layer in (ref, lay):
            layer.weight.mul_(torch.linspace(0.5, 2.0, 256).view(16, 16))
    calls = []
    real = kernels.transposable24
    monkeypatch.setattr(kernels, "transposable24", lambda s: calls.append(s.shape) or real(s))
    monkeypatch.setattr(kernels, "available", lambda t: isinstance(t, torch.Tensor))
    flips = lay.refresh_transposable_mask()
    monkeypatch.setattr(kernels, "available", lambda t: False)
    assert flips == ref.refresh_transposable_mask()
    assert calls == [(16, 16)] and torch.equal(lay.mask, ref.mask)
