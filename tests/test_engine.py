"""The per-step engine (`Sparsifier`) in a plain PyTorch loop, against hand-written loops on plain tensors.

The references below never touch sparsetrain: they hold W and b as tensors, build W~ with the
plain-Python `loop_mask`, take dL/dW~ with autograd on W~ itself (straight-through), and write
the decay ``lambda * (1 - mask) * W`` and the SGD update out by hand.
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn

import sparsetrain as st
from reference import loop_mask

LR = 0.1
DECAY = 0.25  # large on purpose: a decay applied k times, or divided by the loss scale, is far off


def _data(seed=0, rows=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 16, generator=g), torch.randn(rows, 8, generator=g)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 8))


def _reference(steps, decay_on_pruned, clip=None, seed=0):
    """SGD on plain tensors: W~ = mask(W) * W, g = dL/dW~ [clipped], g += decay * (1 - mask) * W."""
    lin = _model(seed)[0]
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    x, y = _data()
    for _ in range(steps):
        mask = torch.tensor(loop_mask(w.tolist(), 2, 4))
        w_eff = (w * mask).requires_grad_(True)
        bb = b.clone().requires_grad_(True)
        loss = ((x @ w_eff.t() + bb - y) ** 2).mean()
        gw, gb = torch.autograd.grad(loss, (w_eff, bb))
        if clip is not None:
            norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
            coef = min(1.0, clip / (float(norm) + 1e-6))
            gw, gb = gw * coef, gb * coef
        gw = gw + decay_on_pruned * (~mask) * w
        w, b = w - LR * gw, b - LR * gb
    return w, b


def _run(cfg, steps, micro, scale=None, clip=None, metrics_every=1):
    model = _model()
    sparsity = st.Sparsifier(model, cfg, metrics_every=metrics_every)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sparsity.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6) if scale else None
    x, y = _data()
    for _ in range(steps):
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            loss = ((model(xs) - ys) ** 2).mean() / micro
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    return model[0], sparsity


@pytest.mark.parametrize("micro", [1, 2, 4])
@pytest.mark.parametrize("cfg", [
    st.SparsityConfig(method="sr-ste", srste_decay=DECAY, targets="all"),
    st.SparsityConfig(method="ste", masked_decay=DECAY, targets="all"),
])
def test_decay_once_per_step_whatever_the_accumulation(cfg, micro):
    # metrics_every=2: the decay's mask must not depend on whether the step computed metrics
    layer, sparsity = _run(cfg, steps=3, micro=micro, metrics_every=1 if micro == 1 else 2)
    w_ref, b_ref = _reference(3, DECAY)
    assert sparsity.step == 3
    assert torch.allclose(layer.weight.detach(), w_ref, atol=2e-6)
    assert torch.allclose(layer.bias.detach(), b_ref, atol=2e-6)


@pytest.mark.parametrize("scale", [1.0, 1024.0, 65536.0])
def test_decay_is_nominal_under_gradscaler(scale):
    cfg = st.SparsityConfig(method="sr-ste", srste_decay=DECAY, targets="all")
    layer, _ = _run(cfg, steps=3, micro=2, scale=scale)
    w_ref, _ = _reference(3, DECAY)
    assert torch.allclose(layer.weight.detach(), w_ref, atol=2e-6)


def test_masked_decay_after_clipping_under_gradscaler():
    cfg = st.SparsityConfig(method="ste", masked_decay=DECAY, targets="all")
    layer, _ = _run(cfg, steps=3, micro=2, scale=1024.0, clip=0.05)
    w_ref, _ = _reference(3, DECAY, clip=0.05)  # the decay is added after clipping, not clipped
    assert torch.allclose(layer.weight.detach(), w_ref, atol=2e-6)
    w_wrong, _ = _reference(3, 0.0, clip=0.05)
    assert not torch.allclose(layer.weight.detach(), w_wrong, atol=1e-4)  # the decay did act


def test_skipped_scaler_step_moves_nothing():
    cfg = st.SparsityConfig(method="sr-ste", srste_decay=DECAY, targets="all")
    model = _model()
    sparsity = st.Sparsifier(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sparsity.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _data()
    before = model[0].weight.detach().clone()
    loss = ((model(x) - y) ** 2).mean() * math.inf  # every gradient becomes inf/NaN
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert sparsity.step == 0 and torch.equal(model[0].weight.detach(), before)
    assert scaler.get_scale() < 1024.0  # the scaler did see the overflow


def test_nonfinite_gradient_is_a_named_error_or_a_skipped_step():
    x, y = _data()
    for action in ("raise", "skip"):
        model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))
        sparsity = st.Sparsifier(model, method="ste", targets="all", on_nonfinite=action)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        sparsity.attach(opt)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        model[2].weight.grad[0, 0] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        if action == "raise":
            with pytest.raises(FloatingPointError, match=r"`2`'s gradient holds NaN/inf at optimizer step 2"):
                opt.step()
        else:
            with pytest.warns(UserWarning, match=r"`2`'s gradient holds NaN/inf at optimizer step 2: the step is skipped"):
                opt.step()
            assert sparsity.step == 1
            assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))


def test_nonfinite_weight_after_step_names_layer_and_step():
    model = nn.Sequential(nn.Linear(16, 8))
    sparsity = st.Sparsifier(model, method="ste", targets="all")
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    sparsity.attach(opt)
    x, y = _data()
    ((model(x) - y) ** 2).mean().backward()
    model[0].weight.grad[0, 0] = 3e38  # finite, but the update overflows float32
    with pytest.raises(FloatingPointError, match=r"`0`'s weight holds \d+ NaN/inf value\(s\) after optimizer step 1"):
        opt.step()


def test_targets_that_leave_nothing_sparse_are_errors():
    with pytest.raises(ValueError, match=r"matched no nn.Linear"):
        st.Sparsifier(_model(), targets="attention")
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"none can be made 2:3 sparse: 0 \(in_features=16\), 2 \(in_features=8\)"):
        st.Sparsifier(model, targets="all", n=2, m=3)


def test_optimizer_built_before_the_swap_is_an_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=8))
    opt = torch.optim.AdamW(model.parameters())  # holds the Conv1D weights the swap replaces
    sparsity = st.Sparsifier(model, method="ste")
    with pytest.raises(ValueError, match=r"does not hold the weight of 2 sparse layer\(s\) \(transformer.h.0.mlp.c_fc"):
        sparsity.attach(opt)


def test_fractional_schedule_needs_max_steps():
    sparsity = st.Sparsifier(_model(), method="ste", targets="all", dense_finetune_from=0.5)
    opt = torch.optim.SGD(sparsity.model.parameters(), lr=LR)
    with pytest.raises(ValueError, match=r"pass `max_steps`"):
        sparsity.attach(opt)
    sparsity.attach(opt, max_steps=4)
    assert sparsity.dense_from_step() == 2


def test_dense_finetune_and_metrics_in_a_plain_loop():
    """flip rate and zero fraction against masks recomputed by the plain-Python loop."""
    model = _model()
    sparsity = st.Sparsifier(model, method="ste", targets="all", dense_finetune_from=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sparsity.attach(opt)
    x, y = _data()
    layer = model[0]
    prev = torch.tensor(loop_mask(layer.weight.tolist(), 2, 4))
    flips_seen = 0
    for step in range(1, 6):
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step < 3:
            mask = torch.tensor(loop_mask(layer.weight.tolist(), 2, 4))
            flips = int((mask != prev).sum())
            flips_seen += flips
            assert sparsity.metrics["sparsity/flip_rate"] == pytest.approx(flips / mask.numel())
            assert sparsity.metrics["sparsity/zero_fraction"] == pytest.approx(0.5)
            assert sparsity.phase == "sparse"
            prev = mask
        else:
            assert sparsity.phase == "dense" and sparsity.metrics["sparsity/dense_phase"] == 1.0
            assert torch.equal(layer.effective_weight(), layer.weight.detach())
    assert flips_seen > 0  # the lr moves masks: the flip rate was really tested


def test_resume_in_a_plain_loop_is_exact():
    """S-STE + MVUE: an interrupted run (save, rebuild everything, load) equals an uninterrupted one."""
    cfg = st.SparsityConfig(method="s-ste", mvue="exact", targets="all", seed=3)
    x, y = _data(rows=16)

    def build():
        model = _model(seed=5)
        sparsity = st.Sparsifier(model, cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, sparsity, opt

    def train(model, opt, steps):
        losses = []
        for _ in range(steps):
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    model, sparsity, opt = build()
    sparsity.attach(opt)
    full = train(model, opt, 6)

    model, sparsity, opt = build()
    sparsity.attach(opt)
    first = train(model, opt, 3)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sparsity": sparsity.state_dict()})
    torch.manual_seed(123)
    model2, sparsity2, opt2 = build()
    with torch.no_grad():  # the resumed model starts from other weights: all must come from the checkpoint
        for p in model2.parameters():
            p.add_(1.0)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sparsity2.load_state_dict(ckpt["sparsity"])
    sparsity2.attach(opt2)
    second = train(model2, opt2, 3)
    assert first + second == full
    assert sparsity2.step == 6


def test_resume_with_a_different_config_names_the_field():
    model = _model()
    state = st.Sparsifier(model, method="s-ste", targets="all", mvue="exact").state_dict()
    other = st.Sparsifier(_model(), method="s-ste", targets="all")
    with pytest.raises(ValueError, match=r"sparsity.mvue='exact', this run has sparsity.mvue=None"):
        other.load_state_dict(state)


def test_lr_scheduler_wrapper_survives_detach():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    step_before = opt.step
    sparsity = st.Sparsifier(model, method="sr-ste", targets="all")
    sparsity.attach(opt)
    sparsity.detach()
    assert opt.step is step_before  # the optimizer is exactly as it was found
    x, y = _data()
    ((model(x) - y) ** 2).mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would fail here
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(LR / 2)


def test_without_an_engine_per_step_fields_warn_once():
    import sparsetrain.nn.linear as lin

    lin._WARNED_NO_ENGINE.discard("sr-ste")
    model = _model()
    st.sparsify(model, st.SparsityConfig(method="sr-ste", targets="all"))
    x, _ = _data()
    with pytest.warns(UserWarning, match="without one it trains as plain STE"):
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # once only


def test_metrics_every_k_steps_report_the_last_steps_flips():
    model = _model()
    sparsity = st.Sparsifier(model, method="ste", targets="all", metrics_every=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sparsity.attach(opt)
    x, y = _data()
    layer = model[0]
    masks = [torch.tensor(loop_mask(layer.weight.tolist(), 2, 4))]
    for step in range(1, 7):
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        masks.append(torch.tensor(loop_mask(layer.weight.tolist(), 2, 4)))
        assert sparsity.metrics_step == (step // 3) * 3 or (step < 3 and sparsity.metrics_step == -1)
        if step % 3 == 0:  # the flip rate of this step alone (mask after step-1 vs after step)
            flips = int((masks[step] != masks[step - 1]).sum())
            assert sparsity.metrics["sparsity/flip_rate"] == pytest.approx(flips / masks[0].numel())
    assert sum(int((a != b).sum()) for a, b in zip(masks, masks[1:])) > 0
