"""Per-tensor scaled FP8 casts against formulas, and `scaled_mm` against the simulated product."""

import pytest
import torch

from sparsetrain.ops import fp8


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
    from sparsetrain.backends import dense

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
