"""cuSPARSELt backend: selection and error messages on CPU; products against the dense backend on GPU."""

import types
import warnings

import pytest
import torch

from sparsetrain import backends, ops
from sparsetrain.backends import cusparselt, dense

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
        ((8, 0), (64, 64), torch.float8_e4m3fn, "FP8 sparse GEMMs need sm89"),
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
