"""The cuSPARSELt path of sparse activations against emulated ``torch._cslt_*`` (`fake_cusparselt`).

References are float64 products built from a plain-Python loop mask (`reference.loop_mask`), so
they share nothing with the path under test. The fake computes in float32 and rounds once, as
cuSPARSELt does, and refuses operands that are not 2:4 along their rows.
"""

import pytest
import torch

from fake_cusparselt import Patcher, emulate_sm90_on_cpu
from reference import loop_mask
from sparsetrain import ops
from sparsetrain.backends import cusparselt, cusparselt_activation


@pytest.fixture
def cslt():
    patcher = Patcher()
    fake = emulate_sm90_on_cpu(patcher, cusparselt)
    cusparselt._ALG_CACHE.clear()
    cusparselt_activation._LAYOUT_MATCHES.clear()
    yield fake
    patcher.undo()
    cusparselt._ALG_CACHE.clear()
    cusparselt_activation._LAYOUT_MATCHES.clear()


def _inputs(t, d_in, d_out, dtype, weight_mask=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Squared-ReLU-like: mostly exact zeros, so many groups hold fewer than 2 non-zeros.
    x = (torch.relu(torch.randn(t, d_in, generator=g) - 0.5) ** 2).to(dtype).requires_grad_(True)
    w = torch.randn(d_out, d_in, generator=g)
    if weight_mask == "nm":
        w = w * ops.nm_mask(w, 2, 4)
    elif weight_mask == "transposable":
        w = w * ops.transposable_mask(w.abs(), 2, 4, method="exact24")
    w = w.to(dtype).requires_grad_(True)
    b = torch.randn(d_out, generator=g).to(dtype).requires_grad_(True)
    return x, w, b


def _close(got, ref, dtype, k):
    eps = torch.finfo(dtype).eps  # one rounding of a float32-accumulated length-k product
    torch.testing.assert_close(got.double(), ref, rtol=2 * eps, atol=2 * eps * k**0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 37, 64])
@pytest.mark.parametrize("weight_mask", [None, "nm", "transposable"])
def test_products_match_loop_reference(cslt, dtype, t, weight_mask):
    d_in, d_out = 64, 48
    x, w, b = _inputs(t, d_in, d_out, dtype, weight_mask)
    transposable = weight_mask == "transposable"
    y = cusparselt_activation.activation_linear(x, w, b, cache={"key": 0}, transposable=transposable)
    gy = torch.randn(t, d_out, generator=torch.Generator().manual_seed(9)).to(dtype)
    dx, dw, db = torch.autograd.grad(y, [x, w, b], gy)

    mask = torch.tensor(loop_mask(x.detach().double().tolist(), 2, 4))
    xt = x.detach().double() * mask
    w64, g64 = w.detach().double(), gy.double()
    assert y.shape == (t, d_out) and y.dtype == dtype
    _close(y, xt @ w64.t() + b.detach().double(), dtype, d_in)
    _close(dx, mask * (g64 @ w64), dtype, d_out)
    assert bool((dx[~mask] == 0).all())
    _close(dw, g64.t() @ xt, dtype, t)
    _close(db, g64.sum(0), dtype, t)
    # What ran sparse: the forward with X~ (tokens padded to 16) as the structured operand, and the
    # input gradient only when the weight mask is transposable.
    tp = -(-t // 16) * 16
    fwd = cslt.products[0]
    assert (fwd["m"], fwd["k"], fwd["n"], fwd["transpose_result"], fwd["bias"]) == (tp, d_in, d_out, False, False)
    assert cslt.compressed[0] == (tp, d_in)
    assert len(cslt.products) == (2 if transposable else 1)
    if transposable:
        assert cslt.compressed[1:] == [(d_out, d_in), (d_in, d_out)]  # W~ and W~^T, cached per step


def test_mvue_weight_gradient_is_sparse_and_unbiased(cslt):
    dtype = torch.bfloat16
    x, w, b = _inputs(32, 64, 32, dtype, "nm", seed=3)
    gy = torch.randn(32, 32, generator=torch.Generator().manual_seed(4)).to(dtype)
    mask = torch.tensor(loop_mask(x.detach().double().tolist(), 2, 4))
    expect = gy.double().t() @ (x.detach().double() * mask)
    gen = torch.Generator().manual_seed(0)
    total, total_sq = torch.zeros_like(expect), torch.zeros_like(expect)
    reps = 400
    for _ in range(reps):
        y = cusparselt_activation.activation_linear(x, w, None, mvue="exact", generator=gen)
        d = torch.autograd.grad(y, w, gy)[0].double()
        total += d
        total_sq += d * d
    # MVUE products: the weight gradient ran as a sparse product with the token dim compressed.
    assert any(p["m"] == 32 and p["k"] == 32 and p["n"] == 64 for p in cslt.products)
    # Unbiased: every entry's mean over 400 draws is within 5 standard errors of the exact
    # gradient, plus the bf16 rounding of one length-32 product (a deterministic, not random, error).
    mean = total / reps
    se = ((total_sq / reps - mean**2).clamp_min(0) / reps).sqrt()
    rounding = 2 * torch.finfo(dtype).eps * (expect.abs() + 32**0.5)
    assert bool(((mean - expect).abs() <= 5 * se + rounding).all())
    assert float(se.max()) > 0  # the draws did vary: the gradient really was sampled


def test_refusals():
    with pytest.raises(ValueError, match="cannot run this layer's sparse activations"):
        cusparselt_activation.activation_linear(torch.zeros(4, 64), torch.zeros(32, 64), None)
    ok, reason = cusparselt_activation.can_use(torch.zeros(32, 64), n=4, m=8)
    assert not ok and "2:4 only" in reason


def test_fake_refuses_an_unmasked_activation(cslt):
    """Sanity of the harness: compressing the dense X itself is refused, so the test above proves
    the path hands cuSPARSELt the masked X~."""
    from fake_cusparselt import CusparseLtContractError

    x = torch.ones(16, 64, dtype=torch.bfloat16)
    with pytest.raises(CusparseLtContractError, match="not 2:4"):
        torch._cslt_compress(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [37, 256])
def test_fused_compression_feeds_the_product(cslt, dtype, t):
    """``in`` a multiple of 128 and a cuSPARSELt whose buffers are `ops.cslt_layout`'s: the forward
    hands the fused pass's buffer (tokens padded to 128) to the product, with no compression call
    besides the one-time layout check, and all three products still match the loop reference."""
    cslt.packed = True
    d_in, d_out = 128, 48
    x, w, b = _inputs(t, d_in, d_out, dtype)
    y = cusparselt_activation.activation_linear(x, w, b)
    gy = torch.randn(t, d_out, generator=torch.Generator().manual_seed(9)).to(dtype)
    dx, dw, db = torch.autograd.grad(y, [x, w, b], gy)
    mask = torch.tensor(loop_mask(x.detach().double().tolist(), 2, 4))
    xt, w64, g64 = x.detach().double() * mask, w.detach().double(), gy.double()
    _close(y, xt @ w64.t() + b.detach().double(), dtype, d_in)
    _close(dx, mask * (g64 @ w64), dtype, d_out)
    _close(dw, g64.t() @ xt, dtype, t)
    assert cslt.compressed == [(256, 256)]  # the layout check only
    assert cusparselt_activation._LAYOUT_MATCHES == {("cpu", dtype): True}
    fwd = cslt.products[0]
    assert (fwd["m"], fwd["k"], fwd["n"]) == (-(-t // 128) * 128, d_in, d_out)


def test_layout_mismatch_falls_back_to_two_passes(cslt, caplog):
    """A cuSPARSELt whose buffer is not ours (the fake's opaque one): one warning, then the masked
    X~ is compressed by ``_cslt_compress`` as before, and the result is unchanged."""
    dtype = torch.bfloat16
    x, w, b = _inputs(40, 128, 32, dtype)
    with caplog.at_level("WARNING"):
        y = cusparselt_activation.activation_linear(x, w, b)
        y2 = cusparselt_activation.activation_linear(x, w, b)
    assert sum("does not match this cuSPARSELt's layout" in r.message for r in caplog.records) == 1
    assert cslt.compressed == [(256, 256), (48, 128), (48, 128)]  # the check, then one per call
    mask = torch.tensor(loop_mask(x.detach().double().tolist(), 2, 4))
    _close(y, (x.detach().double() * mask) @ w.detach().double().t() + b.detach().double(), dtype, 128)
    assert torch.equal(y, y2)


def test_layout_check_that_raises_falls_back(cslt, caplog, monkeypatch):
    """A layout check that cannot run (here the fused pass raises) means two passes, not a crash."""
    from sparsetrain.ops import cslt_layout

    def broken(x):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(cslt_layout, "sparsify_pack24", broken)
    x, w, b = _inputs(16, 128, 32, torch.float16)
    with caplog.at_level("WARNING"):
        y = cusparselt_activation.activation_linear(x, w, b)
    assert any("the check failed: RuntimeError: no kernel image" in r.getMessage() for r in caplog.records)
    mask = torch.tensor(loop_mask(x.detach().double().tolist(), 2, 4))
    _close(y, (x.detach().double() * mask) @ w.detach().double().t() + b.detach().double(), torch.float16, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_mask", [None, "nm", "transposable"])
def test_gpu_products_match_loop_reference(weight_mask):
    """On a real GPU with cuSPARSELt: the same products and bounds as the emulated test above."""
    if not cusparselt.can_use(torch.zeros(64, 64, device="cuda", dtype=torch.bfloat16))[0]:
        pytest.skip("cuSPARSELt cannot run here")
    dtype, t, d_in, d_out = torch.bfloat16, 200, 256, 128
    x, w, b = _inputs(t, d_in, d_out, dtype, weight_mask)
    x, w, b = (v.detach().cuda().requires_grad_(True) for v in (x, w, b))
    y = cusparselt_activation.activation_linear(x, w, b, cache={"key": 0}, transposable=weight_mask == "transposable")
    gy = torch.randn(t, d_out, generator=torch.Generator().manual_seed(9)).to(dtype).cuda()
    dx, dw, db = torch.autograd.grad(y, [x, w, b], gy)
    mask = torch.tensor(loop_mask(x.detach().double().cpu().tolist(), 2, 4))
    xt = x.detach().double().cpu() * mask
    w64, g64 = w.detach().double().cpu(), gy.double().cpu()
    _close(y.cpu(), xt @ w64.t() + b.detach().double().cpu(), dtype, d_in)
    _close(dx.cpu(), mask * (g64 @ w64), dtype, d_out)
    _close(dw.cpu(), g64.t() @ xt, dtype, t)
    _close(db.cpu(), g64.sum(0), dtype, t)


@pytest.mark.gpu
def test_gpu_layer_uses_cusparselt_for_sparse_inputs():
    import sparsetrain as st

    if not cusparselt.can_use(torch.zeros(64, 64, device="cuda", dtype=torch.bfloat16))[0]:
        pytest.skip("cuSPARSELt cannot run here")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)).cuda().bfloat16()
    st.sparsify(net, st.SparsityConfig(method="ste", targets=r"^2$", activation_targets=r"^2$", activation_sparsity="2:4"))
    x = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)
    y = net(x)
    assert net[2].backend_name == "cusparselt"
    h = net[1](net[0](x)).double()
    mask = torch.tensor(loop_mask(h.cpu().tolist(), 2, 4)).cuda()
    ref = (h * mask) @ net[2].effective_weight().double().t() + net[2].bias.double()
    _close(y, ref, torch.bfloat16, 256)
