"""Per-tensor scaled FP8 casts against formulas, `scaled_mm` against the simulated product, and the
dense backend's FP8 products against references built from round-tripped operands."""

import pytest
import torch

from sparsetrain.backends import dense
from sparsetrain.ops import fp8
from sparsetrain.ops.mvue import mvue24

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _rt(t, dtype):
    """``t`` round-tripped through per-tensor scaled ``dtype``, in float32."""
    return fp8.fp8_cast_roundtrip(t.float(), dtype)


@pytest.mark.parametrize("dtype", [fp8.FORWARD_DTYPE, fp8.BACKWARD_DTYPE])
def test_scale_maps_amax_to_max_finite(dtype):
    x = torch.tensor([0.5, -3.0, 1.25])
    scale = fp8.fp8_scale(x, dtype)
    assert scale.dtype == torch.float32 and scale.dim() == 0
    assert scale.item() == pytest.approx(torch.finfo(dtype).max / 3.0, rel=1e-7)


def test_recipe_dtypes():
    assert fp8.FORWARD_DTYPE == torch.float8_e4m3fn
    assert fp8.BACKWARD_DTYPE == torch.float8_e5m2


@pytest.mark.parametrize("dtype", [fp8.FORWARD_DTYPE, fp8.BACKWARD_DTYPE])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_matches_formula(dtype, xdtype):
    x = (torch.randn(37, 12, generator=torch.Generator().manual_seed(0)) * 5).to(xdtype)
    got = fp8.fp8_cast_roundtrip(x, dtype)
    assert got.dtype == xdtype and got.shape == x.shape
    x32 = x.float()
    s = torch.finfo(dtype).max / x32.abs().max()
    ref = ((x32 * s).to(dtype).float() / s).to(xdtype)  # independent: no clamp needed in range
    assert torch.equal(got, ref)
    # Relative error of a normal e4m3 (e5m2) value is at most 2^-4 (2^-3), plus the output rounding.
    mant = 3 if dtype == fp8.FORWARD_DTYPE else 2
    big = x32.abs() > x32.abs().max() / 64  # far above the subnormal range after scaling
    rel = ((got.float() - x32).abs() / x32.abs())[big]
    assert float(rel.max()) <= 2.0 ** -(mant + 1) + torch.finfo(xdtype).eps


def test_roundtrip_extremes_keep_amax_and_zero():
    x = torch.tensor([0.0, 1e-3, -7.0])
    got = fp8.fp8_cast_roundtrip(x, fp8.FORWARD_DTYPE)
    assert got[0] == 0 and got[2] == -7.0  # amax maps to 448 exactly and back
    assert torch.equal(fp8.fp8_cast_roundtrip(torch.zeros(4), fp8.FORWARD_DTYPE), torch.zeros(4))


def test_errors():
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        fp8.fp8_scale(torch.ones(2), torch.float16)
    with pytest.raises(TypeError, match="`x` must be a floating"):
        fp8.fp8_scale(torch.ones(2, dtype=torch.int32), fp8.FORWARD_DTYPE)
    with pytest.raises(ValueError, match="chainable"):
        fp8.scaled_mm(torch.ones(2, 3), torch.ones(2, 3))


def test_scaled_mm_cpu_is_the_simulated_product():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 16, generator=g), torch.randn(16, 4, generator=g)
    got = fp8.scaled_mm(a, b, fp8.BACKWARD_DTYPE, fp8.FORWARD_DTYPE)
    ref = fp8.fp8_cast_roundtrip(a, fp8.BACKWARD_DTYPE) @ fp8.fp8_cast_roundtrip(b, fp8.FORWARD_DTYPE)
    torch.testing.assert_close(got, ref)


def test_dense_backend_simulates_fp8():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g)
    y = dense.linear(x, w, None, fp8=True)
    ref = fp8.fp8_cast_roundtrip(x, fp8.FORWARD_DTYPE) @ fp8.fp8_cast_roundtrip(w, fp8.FORWARD_DTYPE).t()
    torch.testing.assert_close(y, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not fp8.fp8_gemm_supported("cuda"), reason="needs an sm89+ GPU")
def test_scaled_mm_real_matches_simulation():
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(64, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    b = torch.randn(128, 32, device="cuda", generator=g, dtype=torch.bfloat16)
    got = fp8.scaled_mm(a, b, out_dtype=torch.float32)
    ref = fp8.fp8_cast_roundtrip(a.float(), fp8.FORWARD_DTYPE) @ fp8.fp8_cast_roundtrip(b.float(), fp8.FORWARD_DTYPE)
    # Same rounded operands; only the accumulation order differs (fp32 accumulators).
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)


def _dense_fp8_run(x, w, b, dy, **kw):
    """Forward + backward of ``dense.linear(..., fp8=True)``: ``(y, dX, dW, db)``."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    y = dense.linear(x, w, b, fp8=True, **kw)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def _inputs(dtype, t_shape, n_in, n_out, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*t_shape, n_in, generator=g).to(dtype)
    w = torch.randn(n_out, n_in, generator=g).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    dy = (torch.randn(*t_shape, n_out, generator=g) * 1e-2).to(dtype)
    return x, w, b, dy


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_fp8_products_match_roundtrip_references(dtype, bias):
    x, w, b, dy = _inputs(dtype, (2, 5), 24, 12, bias)
    y, dx, dw, db = _dense_fp8_run(x, w, b, dy)
    x2, dy2 = x.reshape(-1, 24).float(), dy.reshape(-1, 12).float()
    xr, wr, dyr = _rt(x2, E4M3), _rt(w, E4M3), _rt(dy2, E5M2)
    y_ref = xr @ wr.t() + (b.float() if bias else 0.0)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    torch.testing.assert_close(y, y_ref.to(dtype).reshape(2, 5, 12))
    torch.testing.assert_close(dx, (dyr @ wr).to(dtype).reshape(2, 5, 24))
    torch.testing.assert_close(dw, (dyr.t() @ xr).to(dtype))
    if bias:
        # db is exact: the sum of the un-quantised dY, not of its e5m2 rounding.
        assert db.dtype == dtype
        torch.testing.assert_close(db, dy2.sum(0).to(dtype))
        assert not torch.allclose(dy2.sum(0), dyr.sum(0), rtol=0, atol=0)  # the distinction is visible


def test_dense_fp8_mvue_weight_gradient():
    x, w, _, dy = _inputs(torch.float32, (10,), 16, 8, False, seed=3)  # 10 tokens: padded to 12
    _, dx, dw, _ = _dense_fp8_run(x, w, None, dy, mvue="exact", generator=torch.Generator().manual_seed(7))
    pad = torch.zeros(2, 8)
    g = mvue24(torch.cat([_rt(dy, E5M2), pad]), dim=0, method="exact", generator=torch.Generator().manual_seed(7))
    xr = _rt(torch.cat([x, torch.zeros(2, 16)]), E4M3)
    torch.testing.assert_close(dw, _rt(g, E5M2).t() @ xr)
    torch.testing.assert_close(dx, _rt(dy, E5M2) @ _rt(w, E4M3))  # dX takes no MVUE
    assert not torch.allclose(dw, _rt(dy, E5M2).t() @ _rt(x, E4M3))  # MVUE did sparsify dY


@pytest.fixture
def fake_scaled_mm(monkeypatch):
    """Pretend to be an sm89+ GPU: `_scaled_mm` checks cuBLASLt's contract and records each call."""
    real = torch._scaled_mm
    calls = []

    def fake(mat1, mat2, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        m, k = mat1.shape
        n = mat2.shape[1]
        assert mat1.dtype in fp8.FP8_DTYPES and mat2.dtype in fp8.FP8_DTYPES
        assert not (mat1.dtype == mat2.dtype == E5M2), "no e5m2 x e5m2 kernel"
        assert mat1.stride() == (k, 1), f"mat1 must be row-major, got stride {mat1.stride()}"
        assert mat2.stride() == (1, k), f"mat2 must be column-major, got stride {mat2.stride()}"
        assert m % 16 == 0 and k % 16 == 0 and n % 16 == 0
        for s in (scale_a, scale_b):
            assert s.dtype == torch.float32 and s.numel() == 1 and s.device == mat1.device
        assert scale_result is None
        if bias is not None:
            assert out_dtype in (torch.bfloat16, torch.float16) and bias.dtype == out_dtype
        # torch's own shape/layout rules (the meta kernel checks them as for CUDA).
        meta = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in (mat1, mat2)]
        real(*meta, scale_a.to("meta"), scale_b.to("meta"), bias=None if bias is None else bias.to("meta"),
             out_dtype=out_dtype)
        calls.append((mat1.dtype, mat2.dtype, out_dtype, bias is not None))
        out = (mat1.float() * scale_a) @ (mat2.float() * scale_b)
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype or mat1.dtype)

    monkeypatch.setattr(fp8, "fp8_gemm_supported", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", fake)
    return calls


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_fp8_calls_scaled_mm_for_all_three_products(fake_scaled_mm, dtype, bias):
    x, w, b, dy = _inputs(dtype, (2, 16), 48, 32, bias, seed=4)
    with pytest.MonkeyPatch.context() as mp:  # the simulated results, without the fake GPU
        mp.setattr(fp8, "fp8_gemm_supported", lambda device: False)
        sim = _dense_fp8_run(x, w, b, dy)
    assert not fake_scaled_mm
    got = _dense_fp8_run(x, w, b, dy)
    fused = bias and dtype != torch.float32  # a float32 output takes the bias after the GEMM
    assert fake_scaled_mm == [
        (E4M3, E4M3, dtype, fused),  # y = X W^T
        (E5M2, E4M3, dtype, False),  # dX = dY W
        (E5M2, E4M3, dtype, False),  # dW = dY^T X
    ]
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    for a, r in zip(got, sim):
        if r is None:
            assert a is None
        else:
            torch.testing.assert_close(a, r, **tol)


def test_dense_fp8_mvue_goes_through_scaled_mm(fake_scaled_mm):
    x, w, _, dy = _inputs(torch.float32, (32,), 16, 16, False, seed=5)
    got = _dense_fp8_run(x, w, None, dy, mvue="exact", generator=torch.Generator().manual_seed(1))
    assert [c[:2] for c in fake_scaled_mm] == [(E4M3, E4M3), (E5M2, E4M3), (E5M2, E4M3)]
    g = mvue24(_rt(dy, E5M2), dim=0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got[2], _rt(g, E5M2).t() @ _rt(x, E4M3), rtol=1e-5, atol=1e-5)


def test_scaled_mm_pads_sizes_off_multiples_of_16(fake_scaled_mm):
    x, w, b, dy = _inputs(torch.float32, (10,), 24, 12, True, seed=6)
    y, dx, dw, db = _dense_fp8_run(x, w, b, dy)
    # All three products ran as FP8 GEMMs on zero-padded operands (the fake checks multiples of 16).
    assert [c[:2] for c in fake_scaled_mm] == [(E4M3, E4M3), (E5M2, E4M3), (E5M2, E4M3)]
    assert y.shape == (10, 12) and dx.shape == (10, 24) and dw.shape == (12, 24)
    torch.testing.assert_close(db, dy.sum(0))
    xr, wr, dyr = _rt(x, E4M3), _rt(w, E4M3), _rt(dy, E5M2)
    torch.testing.assert_close(y, xr @ wr.t() + b)
    torch.testing.assert_close(dx, dyr @ wr)
    torch.testing.assert_close(dw, dyr.t() @ xr)
    # e5m2 x e5m2 has no kernel: simulated even on multiples of 16.
    a = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    fp8.scaled_mm(a, a.t(), E5M2, E5M2)
    assert len(fake_scaled_mm) == 3


def test_scaled_mm_real_path_layouts(fake_scaled_mm):
    """Transposed and non-contiguous operands reach `_scaled_mm` as row-major x column-major."""
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(64, 32, generator=g), torch.randn(48, 64, generator=g)
    bias = torch.randn(48, generator=g)
    ref = _rt(a.t(), E5M2) @ _rt(b.t(), E4M3) + bias
    a_strided = torch.zeros(64, 64)
    a_strided[:, ::2] = a  # a view with row stride 64 and column stride 2
    for aa, bb in [(a.t(), b.t()), (a.t().contiguous(), b.t().contiguous()), (a_strided[:, ::2].t(), b.t())]:
        torch.testing.assert_close(fp8.scaled_mm(aa, bb, E5M2, E4M3, bias=bias), ref, rtol=1e-5, atol=1e-5)
    assert len(fake_scaled_mm) == 3
    with pytest.raises(ValueError, match="`bias` must have shape"):
        fp8.scaled_mm(a.t(), b.t(), bias=bias[:5])


@pytest.mark.gpu
@pytest.mark.skipif(not fp8.fp8_gemm_supported("cuda"), reason="needs an sm89+ GPU")
def test_dense_fp8_real_gemms_on_cuda(monkeypatch):
    real, calls = torch._scaled_mm, []

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 16, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(32, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    b = torch.randn(32, device="cuda", generator=g, dtype=torch.bfloat16)
    dy = torch.randn(4, 16, 32, device="cuda", generator=g, dtype=torch.bfloat16) * 1e-2
    y, dx, dw, db = _dense_fp8_run(x, w, b, dy)
    assert calls == [E4M3, E5M2, E5M2]  # all three products ran as real FP8 GEMMs
    x2, dy2 = x.reshape(-1, 128).float(), dy.reshape(-1, 32).float()
    xr, wr, dyr = _rt(x2, E4M3), _rt(w, E4M3), _rt(dy2, E5M2)
    # Same rounded operands; fp32 accumulation in another order, then the bf16 output rounding.
    tol = {"rtol": 2e-2, "atol": 1e-2}
    torch.testing.assert_close(y, (xr @ wr.t() + b.float()).bfloat16().reshape(4, 16, 32), **tol)
    torch.testing.assert_close(dx, (dyr @ wr).bfloat16().reshape(4, 16, 128), rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(dw, (dyr.t() @ xr).bfloat16(), **tol)
    torch.testing.assert_close(db, dy2.sum(0).bfloat16())
