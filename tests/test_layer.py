"""SparseLinear: forward and each method's gradient against closed formulas; MVUE gradients;
autocast; torch.compile; errors; state dict layout."""

import pytest
import torch
import torch.nn as nn

from sparsetrain import SparseLinear, SparsityConfig
from sparsetrain.nn._packing import pack_mask

from reference import loop_mask, loop_soft


def make(method, in_f=16, out_f=6, seed=0, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f).double()
    return lin, SparseLinear.from_dense(lin, SparsityConfig(method=method, **kw))


def ref_weight(w, method, n=2, m=4):
    vals = w.tolist()
    if method in ("ste", "sr-ste"):
        return torch.tensor(loop_mask(vals, n, m), dtype=w.dtype) * w
    s = torch.tensor(loop_soft(vals, n, m), dtype=w.dtype)
    beta = (w * s).sum() / (s * s).sum()
    return beta * s


@pytest.mark.parametrize("method", ["ste", "sr-ste", "s-ste"])
def test_forward_and_gradients_match_formulas(method):
    lin, layer = make(method)
    w0 = lin.weight.detach().clone()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    r = torch.randn(3, 5, 6, dtype=torch.float64)
    y = layer(x)
    w_ref = ref_weight(w0, method)
    assert torch.allclose(y, x @ w_ref.t() + lin.bias, atol=1e-12)
    assert torch.allclose(layer.effective_weight(), w_ref, atol=1e-12)
    (y * r).sum().backward()
    x2, r2 = x.reshape(-1, 16), r.reshape(-1, 6)
    # dL/dW~: straight through for every method (S-STE: not times beta). SR-STE's decay is not in
    # autograd (it runs once per optimizer step in the engine: tests/test_engine.py).
    grad_ref = r2.t() @ x2
    assert torch.allclose(layer.weight.grad, grad_ref, atol=1e-12)
    assert torch.allclose(layer.bias.grad, r2.sum(0), atol=1e-12)


def test_input_gradient_uses_effective_weight():
    _, layer = make("ste")
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, 6, dtype=torch.float64)
    (layer(x) * r).sum().backward()
    assert torch.allclose(x.grad, r @ ref_weight(layer.weight.detach(), "ste"), atol=1e-12)


@pytest.mark.parametrize("method", ["ste", "s-ste"])
@pytest.mark.parametrize("mvue", ["exact", "approx"])
def test_mvue_weight_gradient_unbiased_input_gradient_exact(method, mvue):
    _, layer = make(method, mvue=mvue, seed=1)
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)  # 12 tokens: 3 groups of 4
    r = torch.randn(2, 6, 6, dtype=torch.float64)
    exact = r.reshape(-1, 6).t() @ x.detach().reshape(-1, 16)
    draws = []
    for _ in range(3000):
        layer.zero_grad()
        x.grad = None
        (layer(x) * r).sum().backward()
        draws.append(layer.weight.grad.clone())
        assert torch.allclose(x.grad, r @ layer.effective_weight(), atol=1e-12)  # dX stays exact
        assert torch.allclose(layer.bias.grad, r.reshape(-1, 6).sum(0), atol=1e-12)
    d = torch.stack(draws)
    bound = 5 * d.std(0) / len(draws) ** 0.5 + 1e-9
    assert ((d.mean(0) - exact).abs() <= bound).all()
    assert not torch.allclose(d[0], exact)  # it really is a sampled estimate


def test_mvue_pads_token_count_not_multiple_of_4():
    _, layer = make("ste", mvue="exact")
    x = torch.randn(5, 16, dtype=torch.float64)  # 5 tokens
    layer(x).sum().backward()
    assert layer.weight.grad.shape == (6, 16) and torch.isfinite(layer.weight.grad).all()


def test_mvue_seeded_layers_reproduce():
    grads = []
    for _ in range(2):
        torch.manual_seed(9)
        lin = nn.Linear(16, 6)
        sl = SparseLinear.from_dense(lin, SparsityConfig(mvue="exact", seed=42))
        sl(torch.ones(8, 16)).sum().backward()
        grads.append(sl.weight.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mvue", [None, "exact"])
def test_autocast(dtype, mvue):
    torch.manual_seed(0)
    layer = SparseLinear(32, 16, config=SparsityConfig(method="s-ste", mvue=mvue, seed=0))
    x = torch.randn(8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = x.detach() @ layer.effective_weight().t() + layer.bias.detach()
    assert torch.allclose(y.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("mvue", [None, "exact"])
def test_torch_compile_matches_eager(mvue):
    torch.manual_seed(0)
    model = nn.Sequential(
        SparseLinear(16, 32, config=SparsityConfig(method="sr-ste", mvue=mvue, seed=1)),
        nn.GELU(),
        SparseLinear(32, 8, config=SparsityConfig(method="s-ste", mvue=mvue, seed=2)),
    )
    x = torch.randn(8, 16)
    for layer in (model[0], model[2]):
        layer.set_step_state(sparse=True, step=0)
    eager_out = model(x)
    eager_out.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for layer in (model[0], model[2]):
        layer.set_step_state(sparse=True, step=0)  # the same MVUE draws again
    compiled = torch.compile(model)
    out = compiled(x)
    out.sum().backward()
    assert torch.allclose(out, eager_out, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        assert torch.allclose(p.grad, g, atol=1e-5)


def test_state_dict_layout_maps_back_to_linear():
    lin, layer = make("s-ste")
    sd = layer.state_dict()
    # No mask: for a non-transposable method it follows from the weights.
    assert set(sd) == {"weight", "bias", "beta"}
    assert sd["beta"].dim() == 0
    fresh = nn.Linear(16, 6).double()
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not missing and sorted(unexpected) == ["beta"]
    assert torch.equal(fresh.weight, lin.weight)
    # from_dense reuses the Linear's Parameters (optimizer state keeps pointing at them)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    # a reload restores beta into a new layer
    other = SparseLinear(16, 6, config=SparsityConfig(method="s-ste"), dtype=torch.float64)
    other.load_state_dict(sd)
    assert torch.equal(other.beta, layer.beta) and torch.equal(other.effective_weight(), layer.effective_weight())


def test_transposable_mask_is_stored_packed():
    cfg = SparsityConfig(method="ste", transposable=True)
    layer = SparseLinear(16, 8, config=cfg)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "beta", "mask_packed"}
    assert sd["mask_packed"].dtype == torch.uint8 and sd["mask_packed"].numel() == 16 * 8 // 8  # 1 bit per weight
    # A loaded mask is used as it is: a pattern no solver would pick proves it was not recomputed.
    old_mask = torch.zeros(8, 16, dtype=torch.bool)
    old_mask[:, ::2] = True
    other = SparseLinear(16, 8, config=cfg)
    other.load_state_dict(dict(sd, mask_packed=pack_mask(old_mask)))
    assert torch.equal(other.mask, old_mask)
    assert torch.equal(other.effective_weight(), sd["weight"] * old_mask)


def test_to_dense_roundtrip():
    lin, layer = make("ste")
    d = layer.to_dense()
    assert type(d) is nn.Linear and torch.equal(d.weight, lin.weight) and d.weight is not lin.weight
    e = layer.to_dense(effective=True)
    assert torch.equal(e.weight, ref_weight(lin.weight.detach(), "ste"))


def test_beta_frozen_after_start():
    _, layer = make("s-ste")
    beta0 = layer.beta.clone()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    layer(torch.randn(2, 16, dtype=torch.float64))
    assert torch.equal(layer.beta, beta0)


def test_errors():
    with pytest.raises(ValueError, match=r"`in_features`=10 is not a multiple of m=4"):
        SparseLinear(10, 4)
    with pytest.raises(ValueError, match=r"Unknown `method`='sste'; valid choices: 'dense', 'ste', 'sr-ste', 's-ste'"):
        SparsityConfig(method="sste")
    with pytest.raises(ValueError, match=r"Unknown `mvue`='yes'; valid choices: None, 'exact', 'approx'"):
        SparsityConfig(mvue="yes")
    with pytest.raises(ValueError, match="0 < n < m"):
        SparsityConfig(n=4, m=4)
    with pytest.raises(ValueError, match="0 < n < m"):
        SparsityConfig(n=0)
    with pytest.raises(ValueError, match="`dense_finetune_from`"):
        SparsityConfig(dense_finetune_from=1.5)
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`blocks.3.fc.weight` holds 1 non-finite"):
        SparseLinear.from_dense(lin, SparsityConfig(), name="blocks.3.fc")


def test_default_seeds_leave_the_global_generator_alone():
    torch.manual_seed(123)
    layers = [SparseLinear(8, 4, config=SparsityConfig(mvue="exact"), name=f"blocks.{i}.fc") for i in range(3)]
    after_weights = torch.rand(3)
    torch.manual_seed(123)
    [torch.nn.Linear(8, 4) for _ in range(3)]  # the same parameter draws, no seed draws
    assert torch.equal(torch.rand(3), after_weights)
    assert len({layer.seed for layer in layers}) == 3  # each layer its own MVUE stream


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 16), (7, 13)])
def test_mask_packing_is_one_bit_per_entry(shape):
    from sparsetrain.nn._packing import pack_mask, unpack_mask

    mask = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) > 0.5
    packed = pack_mask(mask)
    flat = mask.reshape(-1).tolist()
    # reference: byte i holds entries 8i..8i+7, entry 8i+k in bit k
    expect = [sum(1 << k for k in range(8) if 8 * i + k < len(flat) and flat[8 * i + k]) for i in range((len(flat) + 7) // 8)]
    assert packed.dtype == torch.uint8 and packed.tolist() == expect
    assert torch.equal(unpack_mask(packed, shape), mask)
