"""2:4 (N:M) sparse activations: the op against a plain-Python mask and autograd on a fixed mask.

The reference builds the mask with `reference.loop_mask` (a selection loop over each token's
groups) and differentiates ``(x * mask_const) @ W^T + b`` with ordinary autograd, where the mask is
a constant: its gradients are exactly ``mask * (dY W)``, ``dY^T (x * mask)`` and ``sum dY``.
"""

import random

import pytest
import torch

from reference import loop_mask
from sparsetrain.methods import effective_weight
from sparsetrain.ops.activation import activation_mask, activation_sparse_linear, parse_nm, sparsify_activation


def relu2_like(shape, seed, zero_frac=0.6, dtype=torch.float64):
    """Squared-ReLU-like inputs: many exact zeros (so ties among zeros), some +-ties, random signs."""
    rnd = random.Random(seed)
    numel = 1
    for s in shape:
        numel *= s
    vals = []
    for _ in range(numel):
        u = rnd.random()
        if u < zero_frac:
            vals.append(0.0)
        elif u < zero_frac + 0.1:
            vals.append(rnd.choice([0.5, -0.5, 1.0]))
        else:
            vals.append(rnd.gauss(0, 1))
    return torch.tensor(vals, dtype=dtype).reshape(shape)


def reference(x, w, b, n, m):
    """(y, dx, dw, db) for dy = the fixed cotangent `g`, from a loop mask and plain autograd."""
    rows = x.detach().reshape(-1, x.shape[-1]).tolist()
    mask = torch.tensor(loop_mask(rows, n, m)).reshape(x.shape)
    x_ = x.detach().clone().requires_grad_(True)
    w_ = w.detach().clone().requires_grad_(True)
    b_ = None if b is None else b.detach().clone().requires_grad_(True)
    y = (x_ * mask) @ w_.t()
    if b_ is not None:
        y = y + b_
    return mask, y, x_, w_, b_


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 16), (1, 8), (2, 1, 3, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_match_reference(n, m, shape, bias):
    if shape[-1] % m:
        pytest.skip("features not a multiple of m")
    x = relu2_like(shape, seed=sum(shape) + n)
    out = 6
    w = torch.randn(out, shape[-1], dtype=torch.float64)
    b = torch.randn(out, dtype=torch.float64) if bias else None
    g = torch.randn(*shape[:-1], out, dtype=torch.float64)

    mask, y_ref, x_r, w_r, b_r = reference(x, w, b, n, m)
    (y_ref * g).sum().backward()

    xs = x.clone().requires_grad_(True)
    ws = w.clone().requires_grad_(True)
    bs = None if b is None else b.clone().requires_grad_(True)
    y = activation_sparse_linear(xs, ws, bs, n, m)
    (y * g).sum().backward()

    assert torch.equal(activation_mask(x, n, m), mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xs.grad, x_r.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ws.grad, w_r.grad, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(bs.grad, b_r.grad, rtol=1e-12, atol=1e-12)
    # The closed formulas, spelled out: dX is zero off the mask, dW only sees kept inputs.
    assert bool((xs.grad[~mask] == 0).all())
    dx_formula = mask * (g.reshape(-1, out) @ w).reshape(shape)
    torch.testing.assert_close(xs.grad, dx_formula, rtol=1e-12, atol=1e-12)


def test_float32_matches_reference():
    x = relu2_like((33, 64), seed=5, dtype=torch.float32)
    w = torch.randn(40, 64)
    b = torch.randn(40)
    g = torch.randn(33, 40)
    mask, y_ref, x_r, w_r, b_r = reference(x, w, b, 2, 4)
    (y_ref * g).sum().backward()
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    y = activation_sparse_linear(xs, ws, bs)
    (y * g).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(xs.grad, x_r.grad)
    torch.testing.assert_close(ws.grad, w_r.grad)
    torch.testing.assert_close(bs.grad, b_r.grad)


def test_gradcheck_float64():
    # Distinct magnitudes per group (no ties), so the mask is constant under gradcheck's steps.
    torch.manual_seed(0)
    mag = (torch.randperm(5 * 3 * 8).double() + 1) / 10  # distinct |x|, gaps of 0.1 >> gradcheck's eps
    sign = torch.where(torch.rand(5 * 3 * 8) < 0.5, -1.0, 1.0).double()
    x = (mag * sign).reshape(5, 3, 8).requires_grad_(True)
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: activation_sparse_linear(x, w, b), (x, w, b))


def test_with_24_weights_the_weight_rule_applies_on_top():
    """STE weights: dW (dense) = dY^T X~ straight through the projection; forward uses P(W)."""
    x = relu2_like((9, 16), seed=11)
    w = torch.randn(8, 16, dtype=torch.float64)
    g = torch.randn(9, 8, dtype=torch.float64)
    w_proj = torch.tensor(loop_mask(w.tolist(), 2, 4)) * w
    mask, y_ref, x_r, w_r, _ = reference(x, w_proj, None, 2, 4)
    (y_ref * g).sum().backward()

    wp = w.clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    y = activation_sparse_linear(xs, effective_weight(wp, "ste", 2, 4), None)
    (y * g).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xs.grad, x_r.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wp.grad, w_r.grad, rtol=1e-12, atol=1e-12)  # STE: dW = dW~


def test_sparsify_keeps_nonfinite_and_drops_nothing_else():
    x = torch.tensor([[float("inf"), 1.0, 2.0, 3.0], [0.0, float("nan"), -5.0, 1.0]])
    xt, mask = sparsify_activation(x)
    assert mask.tolist() == [[True, False, False, True], [False, True, True, False]]
    assert xt[0, 0] == float("inf") and xt[0, 3] == 3.0 and xt[0, 1] == 0.0 and xt[0, 2] == 0.0
    assert torch.isnan(xt[1, 1]) and xt[1, 2] == -5.0 and xt[1, 0] == 0.0 and xt[1, 3] == 0.0


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"last dimension of `x` \(6"):
        activation_sparse_linear(torch.zeros(2, 6), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="`weight` must be"):
        activation_sparse_linear(torch.zeros(2, 8), torch.zeros(3, 4))
    for bad in ("3:2", "2-4", "0:4", "2:4:8", "a:b", ""):
        with pytest.raises(ValueError, match="`activation_sparsity`"):
            parse_nm(bad)
    with pytest.raises(TypeError, match="`activation_sparsity`"):
        parse_nm(24)
    assert parse_nm("2:4") == (2, 4) and parse_nm(" 4:8 ") == (4, 8) and parse_nm(None) is None


def test_compiles_as_one_opaque_node():
    """torch.compile runs the op (custom op + fake impl) and gives the same values and grads."""
    x = relu2_like((6, 16), seed=2, dtype=torch.float32)
    w = torch.randn(5, 16)
    fn = torch.compile(lambda x, w: activation_sparse_linear(x, w).square().sum(), backend="aot_eager", fullgraph=True)
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    fn(xs, ws).backward()
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    activation_sparse_linear(xr, wr).square().sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(ws.grad, wr.grad)
