"""Reliability of the engine (issue 20 items 1-5): resumes whatever the process's global seed,
layers that know their N:M, refused wrapping orders, a forgotten or doubled `attach`."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import sparsetrain as st
from sparsetrain import SparseLinear, SparsityConfig
from sparsetrain.nn.linear import layer_seed

HERE = os.path.dirname(__file__)


def _run(script, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# ------------------------------------------------------------------ item 1: MVUE seeds
def test_resume_in_fresh_processes_with_other_global_seeds_is_exact(tmp_path):
    # Three processes, three global seeds, no config seed: 10 + 10 steps equal 20 in one go.
    half, resumed, whole = tmp_path / "half.pt", tmp_path / "resumed.pt", tmp_path / "whole.pt"
    _run("resume_worker.py", 1, 0, 10, "-", half)
    _run("resume_worker.py", 2, 10, 20, half, resumed)
    _run("resume_worker.py", 3, 0, 20, "-", whole)
    a = torch.load(resumed, weights_only=False)["model"]
    b = torch.load(whole, weights_only=False)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # MVUE did act: the run differs from one with other draws (a config seed changes the streams).
    seeds = torch.load(whole, weights_only=False)["sparsity"]["seeds"]
    assert seeds == {name: layer_seed(None, name) for name in ("0", "2")}


def test_default_seed_is_a_function_of_the_config_seed_and_the_name():
    torch.manual_seed(1)
    a = st.Sparsifier(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), method="s-ste", mvue="exact", targets="all")
    torch.manual_seed(2)
    b = st.Sparsifier(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), method="s-ste", mvue="exact", targets="all")
    assert [layer.seed for _, layer in a.layers] == [layer.seed for _, layer in b.layers]
    assert len({layer.seed for _, layer in a.layers}) == 2
    c = st.Sparsifier(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), method="s-ste", mvue="exact",
                      targets="all", seed=5)
    assert [layer.seed for _, layer in c.layers] == [layer_seed(5, "0"), layer_seed(5, "1")]
    assert layer_seed(5, "0") != layer_seed(None, "0")
    # Layers built by hand get the name the engine finds them under.
    model = nn.Sequential(SparseLinear(8, 8, config=SparsityConfig(mvue="exact")))
    st.Sparsifier(model, SparsityConfig(mvue="exact"))
    assert model[0].name == "0" and model[0].seed == layer_seed(None, "0")


def test_resume_restores_the_saved_seeds():
    model = nn.Sequential(nn.Linear(8, 8))
    state = st.Sparsifier(model, method="s-ste", mvue="exact", targets="all", seed=3).state_dict()
    other = st.Sparsifier(nn.Sequential(nn.Linear(8, 8)), method="s-ste", mvue="exact", targets="all", seed=4)
    other.load_state_dict(state)
    assert other.layers[0][1].seed == layer_seed(3, "0")


# ------------------------------------------------------------------ item 2: a layer knows its N:M
def test_loading_a_2_4_layer_into_a_4_8_layer_names_both(tmp_path):
    torch.manual_seed(0)
    model24 = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))
    st.sparsify(model24, SparsityConfig(method="s-ste", targets="all"))
    torch.save(model24.state_dict(), tmp_path / "m.pt")  # the metadata survives a file
    model48 = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))
    st.sparsify(model48, SparsityConfig(method="s-ste", targets="all", n=4, m=8))
    with pytest.raises(ValueError, match=r"Cannot load `0`: its state was saved by a 2:4 s-ste layer, this layer is 4:8 s-ste"):
        model48.load_state_dict(torch.load(tmp_path / "m.pt"))
    # The same N:M loads, and a plain nn.Linear still takes the weights (the metadata is no key).
    same = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))
    st.sparsify(same, SparsityConfig(method="s-ste", targets="all"))
    same.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert torch.equal(same[0].beta, model24[0].beta)
    plain = nn.Linear(16, 8)
    assert plain.load_state_dict(model24[0].state_dict(), strict=False).unexpected_keys == ["beta"]


def test_loading_another_methods_state_warns():
    sd = SparseLinear(8, 4, config=SparsityConfig(method="s-ste")).state_dict()
    with pytest.warns(UserWarning, match=r"loading the state of a s-ste layer into a ste layer"):
        SparseLinear(8, 4, config=SparsityConfig(method="ste")).load_state_dict(sd)


# ------------------------------------------------------------------ items 3, 4: wrapping order
def test_sparsifier_after_ddp_or_fully_shard_is_refused_naming_the_order():
    out = dict(line.split(": ", 1) for line in _run("wrap_worker.py").strip().splitlines())
    order = "`Sparsifier(model, ...)`, then DDP / `fully_shard`, then the optimizer, then `sparsity.attach(optimizer)`"
    assert out["ddp_passed"].startswith("ValueError: `model` is already wrapped in DistributedDataParallel")
    assert out["ddp_inside"].startswith("ValueError: `model` is already wrapped in DistributedDataParallel")
    assert out["fully_shard_first"].startswith("ValueError: `model` is already sharded by `fully_shard`")
    for key in ("ddp_passed", "ddp_inside", "fully_shard_first"):
        assert order in out[key]
    assert out["right_order"] == "ok"


# ------------------------------------------------------------------ item 5: attach
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


def test_forgotten_attach_warns_once_at_the_first_training_forward():
    model = _mlp()
    st.Sparsifier(model, method="sr-ste", targets="all")
    x = torch.randn(2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(x)  # not a training step
        model.eval()
        model(x)
        model.train()
        assert not caught
        model(x).sum().backward()
        model(x).sum().backward()
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "Sparsifier is not attached to an optimizer" in msgs[0] and "SR-STE's decay" in msgs[0]


def test_no_warning_when_attached_or_without_per_step_rules():
    for kw, attach in ((dict(method="sr-ste"), True), (dict(method="ste"), False)):
        model = _mlp()
        sparsity = st.Sparsifier(model, targets="all", **kw)
        if attach:
            sparsity.attach(torch.optim.SGD(model.parameters(), lr=0.1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(torch.randn(2, 8)).sum().backward()


def test_attaching_a_second_optimizer_is_an_error_until_detached():
    model = _mlp()
    sparsity = st.Sparsifier(model, method="sr-ste", targets="all")
    first = torch.optim.SGD(model.parameters(), lr=0.1)
    second = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsity.attach(first)
    sparsity.attach(first)  # the same optimizer again: fine
    with pytest.raises(ValueError, match=r"already attached to another optimizer \(SGD\); call `sparsity.detach\(\)` first"):
        sparsity.attach(second)
    sparsity.detach()
    sparsity.attach(second)
    model(torch.randn(2, 8)).sum().backward()
    second.step()
    assert sparsity.step == 1
    first.step()  # the first one is unhooked: the engine does not count it
    assert sparsity.step == 1


# ------------------------------------------------------------------ issue 19 item 11: one projection
def test_srste_decay_reuses_the_forward_mask(monkeypatch):
    """SR-STE's decay equals the plain formula, with one projection per forward and none in the step."""
    import sparsetrain.nn.linear as linear
    from reference import loop_mask

    calls = []
    real = linear.masked_weight
    monkeypatch.setattr(linear, "masked_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    g = torch.Generator().manual_seed(1)
    data = [[torch.randn(4, 16, generator=g) for _ in range(2)] for _ in range(3)]
    model = nn.Sequential(lin)
    sparsity = st.Sparsifier(model, method="sr-ste", srste_decay=0.1, targets="all", metrics_every=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsity.attach(opt)
    calls.clear()
    for step in data:
        for x in step:  # two accumulated micro-batches
            model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert len(calls) == 3 * 2  # the forwards' projections only
    # The plain formula: W~ = W * mask, dL/dW = dL/dW~ summed over micro-batches + 0.1 (1 - mask) W.
    for step in data:
        mask = torch.tensor(loop_mask(w.tolist(), 2, 4))
        gw, gb = torch.zeros_like(w), torch.zeros_like(b)
        for x in step:
            wt, bt = (w * mask).requires_grad_(), b.clone().requires_grad_()
            (x @ wt.T + bt).pow(2).mean().backward()
            gw, gb = gw + wt.grad, gb + bt.grad
        gw = gw + 0.1 * (~mask) * w
        w, b = w - 0.1 * gw, b - 0.1 * gb
    assert torch.allclose(lin.weight.detach(), w, atol=1e-6, rtol=0)
    assert torch.allclose(lin.bias.detach(), b, atol=1e-6, rtol=0)
