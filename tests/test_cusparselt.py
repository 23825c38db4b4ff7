"""cuSPARSELt backend: selection and error messages; its products on CPU against an emulation of
``torch._cslt_*`` (`fake_cusparselt`) with float64 references, and on GPU against the dense backend."""

import types
import warnings

import pytest
import torch

from fake_cusparselt import CusparseLtContractError, FakeCusparseLt
from sparsetrain import SparseLinear, SparsityConfig, backends, ops
from sparsetrain.backends import cusparselt, dense
from sparsetrain.ops import fp8 as fp8_ops

HAS_CSLT = torch.cuda.is_available() and torch.backends.cusparselt.is_available() \
    and torch.cuda.get_device_capability() >= (8, 0)


def _fake_cuda_weight(shape=(64, 64), dtype=torch.bfloat16):
    """Something `can_use` reads like a CUDA weight, to reach its device/dtype/shape checks on CPU."""
    return types.SimpleNamespace(
        is_cuda=True, device=torch.device("cuda", 0), dtype=dtype, shape=torch.Size(shape),
        dim=lambda: len(shape),
    )


@pytest.fixture
def fake_sm(monkeypatch):
    def set_sm(cap, name="Fake GPU"):
        monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)

    return set_sm


def test_reasons_on_this_machine():
    ok, reason = cusparselt.can_use(torch.zeros(64, 64, dtype=torch.bfloat16))
    assert not ok
    assert ("cuSPARSELt" in reason) or ("CUDA device" in reason)


def test_reason_cpu_weight(monkeypatch):
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    assert cusparselt.can_use(torch.zeros(64, 64)) == (False, "the weight is on cpu; cuSPARSELt needs a CUDA device")


@pytest.mark.parametrize(
    "cap,shape,dtype,match",
    [
        ((7, 5), (64, 64), torch.float16, "sm75; 2:4 sparse tensor cores need sm80"),
        ((8, 0), (64, 64), torch.float32, "dtype float32 is not supported.*bfloat16"),
        ((8, 0), (64, 64), torch.float8_e4m3fn, "FP8 sparse GEMMs .*need sm90"),
        ((8, 9), (64, 64), torch.float8_e4m3fn, r"FP8 sparse GEMMs \(cuSPARSELt e4m3\) need sm90 or newer, Fake GPU is sm89"),
        ((8, 0), (64, 40), torch.bfloat16, r"\(64, 40\) is not a multiple of 16"),
        ((9, 0), (64, 48), torch.float8_e4m3fn, r"\(64, 48\) is not a multiple of 32"),
    ],
)
def test_reasons(fake_sm, cap, shape, dtype, match):
    fake_sm(cap)
    ok, reason = cusparselt.can_use(_fake_cuda_weight(shape, dtype), dtype=dtype)
    assert not ok
    assert __import__("re").search(match, reason), reason


def test_can_use_true_on_fake_sm90(fake_sm):
    fake_sm((9, 0))
    assert cusparselt.can_use(_fake_cuda_weight((128, 256))) == (True, "")
    assert backends.select_backend("auto", _fake_cuda_weight((128, 256)), warn=False) == ("cusparselt", "")


def test_auto_fp8_on_sm89_falls_back_to_dense(fake_sm):
    """cuSPARSELt's e4m3 kernels need Hopper: on an sm89 GPU `auto` keeps FP8 layers dense (whose
    FP8 GEMMs run there) and still takes bf16 layers sparse."""
    fake_sm((8, 9), "NVIDIA L40S")
    w = _fake_cuda_weight((128, 256))
    assert backends.select_backend("auto", w, torch.bfloat16, warn=False) == ("cusparselt", "")
    name, reason = backends.select_backend("auto", w, torch.float8_e4m3fn, warn=False)
    assert name == "dense" and "need sm90" in reason and "L40S is sm89" in reason
    with pytest.raises(ValueError, match="cannot run here: FP8 sparse GEMMs .* need sm90"):
        backends.select_backend("cusparselt", w, torch.float8_e4m3fn)
    fake_sm((9, 0), "NVIDIA H100")
    assert backends.select_backend("auto", w, torch.float8_e4m3fn, warn=False) == ("cusparselt", "")


def test_select_backend_auto_falls_back_with_one_warning(fake_sm):
    fake_sm((7, 0), "Tesla V100")
    backends._WARNED.clear()
    w = _fake_cuda_weight((64, 64), torch.float16)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):  # e.g. three layers
            name, reason = backends.select_backend("auto", w)
    assert name == "dense" and "sm70" in reason
    assert len(rec) == 1 and "using the dense backend because Tesla V100 is sm70" in str(rec[0].message)


def test_select_backend_forced_is_an_error():
    with pytest.raises(ValueError, match="`backend`='cusparselt' cannot run here: .*Use backend='auto' or 'dense'"):
        backends.select_backend("cusparselt", torch.zeros(64, 64))


def test_select_backend_dense_and_unknown():
    assert backends.select_backend("dense", torch.zeros(3, 5)) == ("dense", "")
    with pytest.raises(ValueError, match="Unknown `backend`='gpu'; valid choices: 'auto', 'dense', 'cusparselt'"):
        backends.select_backend("gpu", torch.zeros(4, 4))
    assert backends.get_backend("cusparselt") is cusparselt


def test_linear_refuses_cpu():
    with pytest.raises(ValueError, match="`backend`='cusparselt' cannot run this layer"):
        cusparselt.linear(torch.zeros(4, 64), torch.zeros(64, 64), None)


def test_export_errors_on_cpu():
    with pytest.raises(ValueError, match="Cannot export `w` as a semi-structured sparse tensor"):
        cusparselt.semi_structured_weight(torch.zeros(64, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="last dim multiple of 4"):
        cusparselt.semi_structured_weight(torch.zeros(64, 6))


def test_export_rejects_dense_weight(fake_sm, monkeypatch):
    fake_sm((8, 0))
    monkeypatch.setattr(cusparselt, "can_use", lambda w, x=None, dtype=None: (True, ""))
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        cusparselt.semi_structured_weight(torch.ones(16, 16, dtype=torch.float16))


# ------------------------------------------------------------------------------------ GPU


def _layer_inputs(t, d_in, d_out, dtype, transposable=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, d_in, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(d_out, d_in, device="cuda", dtype=dtype, generator=g)
    if transposable:
        from sparsetrain import kernels

        mask = kernels.transposable24(w.abs())
    else:
        mask = ops.nm_mask(w, 2, 4)
    w_eff = (w * mask).requires_grad_(True)
    b = torch.randn(d_out, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    return x, w_eff, b


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CSLT, reason="needs an sm80+ GPU with cuSPARSELt")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 37, 256])
@pytest.mark.parametrize("transposable", [False, True])
def test_matches_dense_backend(dtype, t, transposable):
    x, w, b = _layer_inputs(t, 128, 64, dtype, transposable)
    cache = {"key": 0}
    y = cusparselt.linear(x, w, b, cache=cache, transposable=transposable)
    gy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), gy)
    x2, w2, b2 = (t_.detach().clone().requires_grad_(True) for t_ in (x, w, b))
    y_ref = dense.linear(x2, w2, b2)
    dx_r, dw_r, db_r = torch.autograd.grad(y_ref, (x2, w2, b2), gy)
    tol = dict(rtol=2e-2, atol=2e-2 * 128**0.5)  # bf16/fp16 products of length 128 in other orders
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_r, **tol)
    torch.testing.assert_close(dw, dw_r, **tol)
    torch.testing.assert_close(db, db_r, **tol)
    assert "cusparselt" in cache  # compressed once, reused while the key holds
    first = cache["cusparselt"]["w"]
    cusparselt.linear(x, w, b, cache=cache, transposable=transposable)
    assert cache["cusparselt"]["w"] is first


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CSLT, reason="needs an sm80+ GPU with cuSPARSELt")
def test_mvue_weight_grad_unbiased():
    x, w, b = _layer_inputs(64, 64, 32, torch.bfloat16)
    gy = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    exact = (gy.float().t() @ x.detach().float())
    gen = torch.Generator(device="cuda").manual_seed(0)
    acc = torch.zeros_like(exact)
    n = 400
    for _ in range(n):
        y = cusparselt.linear(x, w, b, mvue="exact", generator=gen, cache={"key": 0})
        acc += torch.autograd.grad(y, w, gy)[0].float()
    # Mean of 400 unbiased estimates: the error shrinks like 1/sqrt(400) of the estimator spread.
    err = (acc / n - exact).abs().max() / exact.abs().max()
    assert float(err) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CSLT, reason="needs an sm80+ GPU with cuSPARSELt")
def test_semi_structured_export_matches_dense():
    lin = torch.nn.Linear(128, 64, bias=False).half().cuda()
    with torch.no_grad():
        lin.weight.mul_(ops.nm_mask(lin.weight, 2, 4))
    x = torch.randn(32, 128, device="cuda", dtype=torch.float16)
    ref = lin(x)
    cusparselt.to_semi_structured(lin)
    torch.testing.assert_close(lin(x), ref, rtol=1e-2, atol=1e-2)


def _rt64(v, d):
    """Independent per-tensor scaled FP8 round trip in float64: amax maps to the format's max."""
    v = v.detach().double()
    s = torch.finfo(d).max / v.abs().max()
    return (v * s).to(d).double() / s


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CSLT and torch.cuda.get_device_capability() >= (9, 0)), reason="needs an sm90+ GPU")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposable", [False, True])
def test_fp8_sparse_matches_float64(out_dtype, transposable):
    """The e4m3 sparse forward with a per-row alpha, out_dtype and transpose_result (a combination
    PyTorch's own tests do not cover), and the backward, against float64 products of the same
    quantised operands."""
    t, d_in, d_out = 96, 256, 128
    x, w, b = _layer_inputs(t, d_in, d_out, out_dtype, transposable)
    y = cusparselt.linear(x, w, b, fp8=True, cache={"key": 0}, transposable=transposable)
    gy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), gy)
    e4m3, e5m2 = fp8_ops.FORWARD_DTYPE, fp8_ops.BACKWARD_DTYPE
    xq, wq, gq = _rt64(x, e4m3), _rt64(w, e4m3), _rt64(gy, e5m2)
    _close(y, xq @ wq.t() + b.detach().double(), out_dtype, d_in)  # `_close`: see the emulated tests below
    _close(dx, gq @ wq, out_dtype, d_out)
    _close(dw, gq.t() @ xq, out_dtype, t)


# ------------------------------------------------------------------ CPU, emulated cuSPARSELt
# The backend's products run against `fake_cusparselt`, which computes each product in float32
# and refuses what the real op would reject or misread. References below are float64 products.


@pytest.fixture
def cslt(monkeypatch, fake_sm):
    """The emulated ops installed, and `can_use` judging CPU tensors as if on an sm90 GPU."""
    fake_sm((9, 0), "Emulated H100")
    fake = FakeCusparseLt().install(monkeypatch)
    real_can_use = cusparselt.can_use

    def can_use(weight, x=None, dtype=None):
        return real_can_use(_fake_cuda_weight(tuple(weight.shape), weight.dtype), None, dtype)

    monkeypatch.setattr(cusparselt, "can_use", can_use)
    cusparselt._ALG_CACHE.clear()
    backends._WARNED.clear()
    yield fake
    cusparselt._ALG_CACHE.clear()


def _cpu_inputs(t, d_in, d_out, dtype, transposable=False, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d_in, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(d_out, d_in, generator=g)
    mask = ops.transposable_mask(w.abs(), 2, 4, method="exact24") if transposable else ops.nm_mask(w, 2, 4)
    w_eff = (w * mask).to(dtype).requires_grad_(True)
    b = torch.randn(d_out, generator=g).to(dtype).requires_grad_(True) if bias else None
    return x, w_eff, b


def _f64(t):
    return None if t is None else t.detach().double()


def _close(got, ref, dtype, k):
    # One rounding of a float32-accumulated length-k product to bf16/fp16, plus bf16 inputs'
    # products accumulated in another order: relative eps of the dtype, scaled by sqrt(k).
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), ref, rtol=2 * eps, atol=2 * eps * k**0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 37, 256])
@pytest.mark.parametrize("transposable", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_emulated_products_match_reference(cslt, dtype, t, transposable, bias):
    d_in, d_out = 64, 48
    x, w, b = _cpu_inputs(t, d_in, d_out, dtype, transposable, bias=bias)
    y = cusparselt.linear(x, w, b, cache={"key": 0}, transposable=transposable)
    gy = torch.randn(t, d_out, generator=torch.Generator().manual_seed(9)).to(dtype)
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), gy)
    y_ref = _f64(x) @ _f64(w).t() + (_f64(b) if bias else 0)
    assert y.shape == (t, d_out) and y.dtype == dtype
    _close(y, y_ref, dtype, d_in)
    _close(grads[0], _f64(gy) @ _f64(w), dtype, d_out)
    _close(grads[1], _f64(gy).t() @ _f64(x), dtype, t)
    if bias:
        _close(grads[2], _f64(gy).sum(0), dtype, t)
    # What ran sparse: the forward always; the input gradient only with a transposable mask.
    sparse_dx = [p for p in cslt.products if p["m"] == d_in]
    assert len(sparse_dx) == (1 if transposable else 0)
    assert cslt.compressed == [(d_out, d_in)] + ([(d_in, d_out)] if transposable else [])
    fwd = cslt.products[0]
    assert fwd["transpose_result"] and fwd["m"] == d_out and fwd["bias"] == bias


def test_emulated_3d_input_noncontiguous_and_expanded_grad(cslt):
    dtype = torch.bfloat16
    _, w, b = _cpu_inputs(8, 64, 32, dtype)
    big = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(3)).to(dtype)
    x = big[:, :, ::2].requires_grad_(True)  # a strided view; 16 tokens need no padding copy
    y = cusparselt.linear(x, w, b, cache={"key": 0}, transposable=False)
    assert y.shape == (2, 8, 32)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))  # y.sum()'s gradient is an expanded (stride 0) tensor
    _close(y, (_f64(x) @ _f64(w).t() + _f64(b)), dtype, 64)
    ones = torch.ones(16, 32, dtype=torch.float64)
    _close(dx.reshape(16, 64), ones @ _f64(w), dtype, 32)
    _close(dw, ones.t() @ _f64(x).reshape(16, 64), dtype, 16)


def test_emulated_transposable_grad_with_expanded_dy(cslt):
    _, w, b = _cpu_inputs(8, 64, 32, torch.bfloat16, transposable=True)
    x = torch.randn(16, 64).to(torch.bfloat16).requires_grad_(True)
    y = cusparselt.linear(x, w, b, cache=None, transposable=True)
    (dx,) = torch.autograd.grad(y.sum(), (x,))  # dY is expanded: 16 tokens need no padding copy
    _close(dx, torch.ones(16, 32, dtype=torch.float64) @ _f64(w), torch.bfloat16, 32)


@pytest.mark.parametrize("method", ["exact", "approx"])
def test_emulated_mvue_weight_grad(cslt, method):
    t, d_in, d_out = 45, 64, 32
    x, w, b = _cpu_inputs(t, d_in, d_out, torch.bfloat16)
    gy = torch.randn(t, d_out, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    y = cusparselt.linear(x, w, b, mvue=method, generator=torch.Generator().manual_seed(7), cache={"key": 0})
    dw = torch.autograd.grad(y, w, gy)[0]
    # Reference: the torch MVUE of dY, tokens zero-padded to 64 (the cuSPARSELt K multiple), with
    # the same seed, times X.
    gyp = torch.cat([gy, gy.new_zeros(64 - t, d_out)])
    g = ops.mvue24(gyp, dim=0, method=method, generator=torch.Generator().manual_seed(7))
    _close(dw, _f64(g)[:t].t() @ _f64(x), torch.bfloat16, t)
    assert (d_out, 64) in cslt.compressed  # MVUE(dY)^T went through the sparse GEMM
    # Padding rows stay zero: all-zero groups are kept at zero by MVUE.
    assert not g[t:].any()


def test_emulated_mvue_is_unbiased(cslt):
    t, d_in, d_out = 32, 32, 16
    x, w, _ = _cpu_inputs(t, d_in, d_out, torch.float16, bias=False)
    gy = torch.randn(t, d_out, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    gen = torch.Generator().manual_seed(0)
    n = 800
    acc = torch.zeros(d_out, d_in, dtype=torch.float64)
    sq = torch.zeros_like(acc)
    for _ in range(n):
        y = cusparselt.linear(x, w, None, mvue="exact", generator=gen, cache={"key": 0})
        est = torch.autograd.grad(y, w, gy)[0].double()
        acc += est
        sq += est**2
    mean, var = acc / n, sq / n - (acc / n) ** 2
    exact = _f64(gy).t() @ _f64(x)
    # Each entry's mean is within 5 standard errors (plus fp16 rounding) of the exact product.
    bound = 5 * (var / n).sqrt() + 2e-3 * exact.abs().max()
    assert bool(((mean - exact).abs() <= bound).all())


@pytest.mark.parametrize("transposable", [False, True])
def test_emulated_fp8_forward_and_backward(cslt, transposable):
    dtype = torch.bfloat16
    t, d_in, d_out = 40, 64, 64
    x, w, b = _cpu_inputs(t, d_in, d_out, dtype, transposable)
    y = cusparselt.linear(x, w, b, fp8=True, cache={"key": 0}, transposable=transposable)
    gy = torch.randn(t, d_out, generator=torch.Generator().manual_seed(6)).to(dtype)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), gy)
    e4m3, e5m2 = fp8_ops.FORWARD_DTYPE, fp8_ops.BACKWARD_DTYPE

    def rt(v, d):  # independent per-tensor scaled round trip: amax -> max finite
        v = v.detach().double()
        s = torch.finfo(d).max / v.abs().max()
        return (v * s).to(d).double() / s

    xq, wq, gq = rt(x, e4m3), rt(w, e4m3), rt(gy, e5m2)
    _close(y, xq @ wq.t() + _f64(b), dtype, d_in)
    _close(dx, gq @ wq, dtype, d_out)
    _close(dw, gq.t() @ xq, dtype, t)
    _close(db, _f64(gy).sum(0), dtype, t)  # the bias gradient is exact, as in the dense backend
    fwd = cslt.products[0]
    assert fwd["dtype"] == e4m3 and fwd["out"] == dtype and fwd["alpha"] in (1, d_out)
    assert len(cslt.products) == (2 if transposable else 1)  # + the sparse input gradient


def test_emulated_refuses_non_24_operand(cslt):
    """The emulation can fail: compressing a dense weight is refused (real cuSPARSELt would drop values)."""
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    with pytest.raises(CusparseLtContractError, match="not 2:4"):
        cusparselt.linear(x, w, None)
    _, w24, _ = _cpu_inputs(8, 64, 32, torch.bfloat16)
    with pytest.raises(CusparseLtContractError, match="not 2:4"):  # W~^T of a non-transposable mask
        cusparselt.linear(x, w24, None, transposable=True)


@pytest.mark.parametrize("case,expected", [("wrong", 0), ("slower", 0), ("faster", 5)])
def test_emulated_algorithm_search_is_verified(cslt, monkeypatch, case, expected):
    cslt.search_result = 5
    if case == "wrong":
        cslt.wrong_algs.add(5)
    times = iter([1.0, 0.5] if case == "faster" else [1.0, 2.0] if case == "slower" else [1.0, 0.5])
    monkeypatch.setattr(cusparselt, "_time_ms", lambda fn, reps=5: (fn(), next(times))[1])
    x, w, b = _cpu_inputs(16, 64, 32, torch.bfloat16)
    y = cusparselt.linear(x, w, b, cache={"key": 0})
    _close(y, _f64(x) @ _f64(w).t() + _f64(b), torch.bfloat16, 64)
    assert list(cusparselt._ALG_CACHE.values()) == [expected]
    assert cslt.products[-1]["alg_id"] == expected


def test_emulated_algorithm_cache_key_covers_the_plan(cslt):
    """An algorithm found for one plan is not reused by a product differing in bias, alpha,
    out_dtype, dtype, layout or shape: each distinct plan gets its own search."""
    cslt.search_result = 0
    g = torch.Generator().manual_seed(0)
    w = ops.project_nm(torch.randn(64, 64, generator=g), 2, 4)
    x = torch.randn(64, 32, generator=g)
    wc16, wcb = torch._cslt_compress(w.half()), torch._cslt_compress(w.bfloat16())
    wq = torch._cslt_compress(w.to(torch.float8_e4m3fn))
    xq = x.to(torch.float8_e4m3fn)
    calls = [
        (wcb, x.bfloat16(), {}),
        (wcb, x.bfloat16(), {"bias": torch.zeros(64, dtype=torch.bfloat16)}),
        (wcb, x.bfloat16(), {"transpose_result": True}),
        (wcb, x.bfloat16().t().contiguous().t(), {}),  # column-major dense operand
        (wc16, x.half(), {}),
        (wq, xq, {"out_dtype": torch.bfloat16}),
        (wq, xq, {"out_dtype": torch.float16}),
        (wq, xq, {"out_dtype": torch.bfloat16, "alpha": torch.ones(1)}),
        (wq, xq, {"out_dtype": torch.bfloat16, "alpha": torch.ones(64)}),
    ]
    for wc, xd, kw in calls:
        cusparselt._sparse_mm(wc, xd, **kw)
    assert len(cslt.searches) == len(calls) == len(cusparselt._ALG_CACHE)
    for wc, xd, kw in calls:  # the same plans again: all cached, no new search
        cusparselt._sparse_mm(wc, xd, **kw)
    assert len(cslt.searches) == len(calls)


def test_emulated_compressed_weight_follows_dtype(cslt):
    """Same cache key (the weight's values did not change), new GEMM dtype: the weight is compressed
    again in that dtype, never multiplied as the stale one."""
    x, w, b = _cpu_inputs(32, 64, 48, torch.bfloat16)
    cache = {"key": 0}
    cusparselt.linear(x, w, b, cache=cache)
    xh, wh, bh = (t.detach().half() for t in (x, w, b))
    y = cusparselt.linear(xh, wh, bh, cache=cache)
    assert y.dtype == torch.float16 and cslt.compressed == [(48, 64), (48, 64)]
    _close(y, _f64(xh) @ _f64(wh).t() + _f64(bh), torch.float16, 64)
    cusparselt.linear(xh, wh, bh, cache=cache)
    assert len(cslt.compressed) == 2  # reused within the new dtype


def _sparse_layer(backend, *, transposable=False, mvue=None, fp8=False, seed=0, shape=(64, 48)):
    method = "sr-ste" if transposable else "s-ste"
    cfg = SparsityConfig(method=method, backend=backend, mvue=mvue, fp8=fp8, transposable=transposable, seed=1)
    torch.manual_seed(seed)
    return SparseLinear(*shape, config=cfg, dtype=torch.bfloat16)


@pytest.mark.parametrize("transposable", [False, True])
def test_emulated_layer_compresses_once_per_step(cslt, transposable):
    layer = _sparse_layer("cusparselt", transposable=transposable, mvue="exact")
    ref = _sparse_layer("dense", transposable=transposable, mvue="exact")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 25, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    w_shapes = {(48, 64), (64, 48)}  # MVUE(dY)^T is (48, 128): 100 tokens padded to 128

    def weight_compressions():
        return sum(s in w_shapes for s in cslt.compressed)

    per_step = 2 if transposable else 1
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for micro in range(2):  # gradient accumulation: W~ is compressed once for both micro-batches
        y = layer(x)
        y.float().pow(2).mean().backward()
        assert weight_compressions() == per_step, micro
    assert layer.backend_name == "cusparselt"
    _close(y, _f64(ref(x)), torch.bfloat16, 64)
    opt.step()
    layer(x)
    assert weight_compressions() == 2 * per_step  # the step changed W: compressed again
    if transposable:
        layer.refresh_transposable_mask()
    layer(x)
    # A refreshed transposable mask changes W~ and invalidates the cache; plain masks do not.
    assert weight_compressions() == (3 * per_step if transposable else 2 * per_step)


def test_emulated_layer_gradients_match_dense_backend(cslt):
    layer = _sparse_layer("cusparselt")
    ref = _sparse_layer("dense")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    for lyr in (layer, ref):
        lyr(x).float().sin().sum().backward()
    torch.testing.assert_close(layer.weight.grad.float(), ref.weight.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer.bias.grad.float(), ref.bias.grad.float(), rtol=2e-2, atol=2e-2)


def test_emulated_auto_fp8_needs_multiples_of_32(cslt):
    # 48 rows: enough for a bf16 sparse GEMM (multiple of 16), not for an e4m3 one (32).
    layer = _sparse_layer("auto", fp8=True, shape=(64, 48))
    x = torch.randn(16, 64).to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"not a multiple of 32.*float8_e4m3fn"):
        layer(x)
    assert layer.backend_name == "dense"
    ok = _sparse_layer("auto", fp8=True, shape=(64, 64))
    ok(x)
    assert ok.backend_name == "cusparselt"
    with pytest.raises(ValueError, match="not a multiple of 32"):
        _sparse_layer("cusparselt", fp8=True, shape=(64, 48))(x)
    # FP8 GEMMs return bf16/fp16: a float32 input falls back (auto) rather than failing.
    f32 = _sparse_layer("auto", fp8=True, shape=(64, 64)).float()
    with pytest.warns(UserWarning, match="dtype float32 is not supported"):
        f32(x.float())
    assert f32.backend_name == "dense"


@pytest.fixture
def fake_semi_structured(monkeypatch):
    """`to_sparse_semi_structured` on CPU: checks what cuSPARSELt's from_dense checks, keeps the values."""
    converted = []

    def convert(w):
        assert w.dim() == 2 and w.is_contiguous() and w.dtype in (torch.float16, torch.bfloat16)
        assert w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0, w.shape
        assert bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()), "not 2:4 along the last dim"
        converted.append(tuple(w.shape))
        return w.clone()

    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", convert)
    return converted


def test_emulated_semi_structured_export_of_gpt2(cslt, fake_semi_structured):
    from transformers import GPT2Config, GPT2LMHeadModel

    import sparsetrain as st

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=32)
    model = GPT2LMHeadModel(cfg).eval()
    names = st.sparsify(model, SparsityConfig(method="s-ste", targets="all", backend="dense"))
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits.float()
    out = st.export(model, semi_structured=True)
    # GPT-2's Conv1D layers come back as nn.Linear: their W~ is 2:4 along the last (input) dim.
    for name in names:
        assert type(out.get_submodule(name)) is torch.nn.Linear, name
        assert not out.get_submodule(name).weight.requires_grad
    assert len(fake_semi_structured) == len(names) == 8
    with torch.no_grad():
        got = out(ids).logits.float()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)  # bf16: addmm vs linear order


def test_emulated_semi_structured_export_keeps_odd_layers_dense(cslt, fake_semi_structured):
    import sparsetrain as st

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 40))
    st.sparsify(model, SparsityConfig(targets="all", backend="dense"))
    model = model.to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"kept 1 layer\(s\) dense: 2 \(weight shape \(40, 48\) is not a multiple of 16"):
        out = st.export(model, semi_structured=True)
    assert fake_semi_structured == [(48, 64)]
    assert isinstance(out[2], torch.nn.Linear) and out[2].weight.shape == (40, 48)


def test_semi_structured_export_errors_on_cpu():
    import sparsetrain as st

    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    st.sparsify(model, SparsityConfig(targets="all"))
    with pytest.raises(ValueError, match=r"semi_structured=True\) cannot run here: .*(cuSPARSELt|CUDA device)"):
        st.export(model, semi_structured=True)


def test_emulated_semi_structured_export_refuses_float32(cslt, fake_semi_structured):
    import sparsetrain as st

    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    st.sparsify(model, SparsityConfig(targets="all", backend="dense"))
    with pytest.raises(ValueError, match="cannot run here: dtype float32 is not supported"):
        st.export(model, semi_structured=True)
    assert fake_semi_structured == []


def test_emulated_cache_follows_dtype_changes(cslt):
    """`.half()` keeps the weight's `_version`: the compressed W~ must be rebuilt, not reused."""
    layer = _sparse_layer("cusparselt")
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(4))
    layer(x.to(torch.bfloat16))
    first = len(cslt.compressed)
    layer.half()
    assert layer._backend_cache == {}  # `.to()` / `.half()` clear the cache
    y = layer(x.to(torch.float16))
    assert len(cslt.compressed) > first
    ref = _sparse_layer("dense").half()
    ref.load_state_dict(layer.state_dict())
    _close(y, _f64(ref(x.to(torch.float16))), torch.float16, 64)


def test_emulated_cache_follows_autocast_dtype(cslt):
    """No `.to()` at all: a float32 layer under autocast bf16, then fp16, compresses W~ for each."""
    cfg = SparsityConfig(method="s-ste", backend="cusparselt", seed=1)
    torch.manual_seed(0)
    layer = SparseLinear(64, 48, config=cfg)
    ref = SparseLinear(64, 48, config=cfg.replace(backend="dense"))
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(5))
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            y = layer(x)
        assert y.dtype == dtype
        with torch.autocast("cpu", dtype=dtype):
            _close(y, _f64(ref(x)), dtype, 64)
