"""`activation_sparsity` in every loop: the plain loop with `Sparsifier`, the Lightning callback and
the `transformers` Trainer callback train a squared-ReLU GPT-2 to the weights of a plain-torch
reference that masks the down-projections' inputs itself.

The reference is an unswapped model: a forward pre-hook on each ``mlp.c_proj`` multiplies its input
by a constant mask built with `reference.loop_mask` (a selection loop), so autograd gives exactly
``dX = mask * (dY W)`` and ``dW = dY^T X~``; 2:4 STE weights are a parametrization
``W + (P(W) - W).detach()`` with ``P`` from the same loop. A dense final phase removes both.
"""

import pytest
import torch
import torch.nn.utils.parametrize as parametrize

import sparsetrain as st
import test_loops as loops
from reference import loop_mask

CONFIGS = {
    "act-only": st.SparsityConfig(method="dense", activation_sparsity="2:4", seed=0),
    "ste+act": st.SparsityConfig(method="ste", targets="mlp_down", activation_sparsity="2:4", seed=0),
    "ste+act+df": st.SparsityConfig(method="ste", targets="mlp_down", activation_sparsity="2:4",
                                    dense_finetune_from=4, seed=0),
}


def gpt2_relu2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=loops.VOCAB, n_positions=loops.T,
                     activation_function="relu2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(cfg)


@pytest.fixture(autouse=True)
def relu2_models(monkeypatch):
    monkeypatch.setattr(loops, "gpt2", gpt2_relu2)
    monkeypatch.setattr(loops, "adamw", sgd)  # the plain and Lightning loops of test_loops, with SGD


def _loop_mask_like(x):
    rows = x.detach().reshape(-1, x.shape[-1]).tolist()
    return torch.tensor(loop_mask(rows, 2, 4), dtype=x.dtype).reshape(x.shape)


class _STE24(torch.nn.Module):
    """Conv1D weight (in, out): the 2:4 projection along `in` (dim 0), straight through."""

    def forward(self, w):
        proj = w * _loop_mask_like(w.t()).t()
        return w + (proj - w).detach()


LR = 0.05


def sgd(params):
    # Plain SGD for the comparisons: Adam divides by sqrt(v), so a gradient that is ~1e-10 in one
    # model and 0 in the other (summation order: the Trainer divides a summed loss by the token
    # count) becomes a full lr step apart. With squared ReLU that happened to the weight methods
    # alone too (STE, no sparse activations: 4e-4 apart after 6 AdamW steps in the Trainer).
    return torch.optim.SGD(params, lr=LR)


def hf_loop_sgd(cfg, tmp_path):
    from transformers import Trainer, TrainingArguments

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    model = gpt2_relu2()
    sparsity = st.Sparsifier(model, cfg)
    data = [{"input_ids": row, "labels": row} for row in loops.token_batches()]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=loops.STEPS, per_device_train_batch_size=loops.B, learning_rate=LR,
        weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=loops.CLIP, optim="sgd",
        save_strategy="no", logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    SequentialTrainer(model=model, args=args, train_dataset=data, callbacks=[st.SparseTrainerCallback(sparsity)]).train()
    return model, sparsity


def sparsifier_loop(cfg, steps=loops.STEPS):
    model = gpt2_relu2()
    sparsity = st.Sparsifier(model, cfg)
    opt = sgd(model.parameters())
    sparsity.attach(opt, max_steps=loops.STEPS)
    ids = loops.token_batches()
    for i in range(steps):
        batch = ids[i * loops.B:(i + 1) * loops.B]
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), loops.CLIP)
        opt.step()
        opt.zero_grad()
    return model, sparsity


def reference_loop(cfg, steps=loops.STEPS):
    model = gpt2_relu2()
    downs = [m for n, m in model.named_modules() if n.endswith("mlp.c_proj")]
    state = {"sparse": True}
    for mod in downs:
        mod.register_forward_pre_hook(lambda mod, args: (args[0] * _loop_mask_like(args[0]),) if state["sparse"] else None)
        if cfg.method == "ste":
            parametrize.register_parametrization(mod, "weight", _STE24())
    opt = sgd(model.parameters())
    ids = loops.token_batches()
    for i in range(steps):
        if cfg.dense_finetune_from is not None and i == cfg.dense_finetune_from:
            state["sparse"] = False
            for mod in downs:
                if parametrize.is_parametrized(mod):
                    # the dense phase starts from the masked weight (the same Parameter, its data set to W~)
                    parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
        batch = ids[i * loops.B:(i + 1) * loops.B]
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), loops.CLIP)
        opt.step()
        opt.zero_grad()
    return model


def _dense_params(model):
    """Parameters by name in the unswapped layout (Conv1D (in, out)), whichever model holds them."""
    out = {}
    sparse = dict(st.sparse_layers(model))
    for name, p in model.named_parameters():
        name = name.replace(".parametrizations.weight.original", ".weight")
        layer_name = name.rsplit(".", 1)[0]
        if layer_name in sparse and name.endswith(".weight"):
            p = p.t()  # SparseLinear holds (out, in)
        out[name] = p.detach()
    return out


def _check_same(ref, got, atol=loops.ATOL):
    a, b = _dense_params(ref), _dense_params(got)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name


def test_swaps_only_what_it_should():
    model = gpt2_relu2()
    swapped = st.sparsify(model, CONFIGS["ste+act"])
    assert swapped == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    for _, layer in st.sparse_layers(model):
        assert layer.input_nm == (2, 4) and "input 2:4" in repr(layer)
    model = gpt2_relu2()
    st.sparsify(model, CONFIGS["act-only"])  # method dense: every FFN layer swapped, inputs of c_proj only
    got = {n: layer.input_nm for n, layer in st.sparse_layers(model)}
    assert got == {"transformer.h.0.mlp.c_fc": None, "transformer.h.0.mlp.c_proj": (2, 4),
                   "transformer.h.1.mlp.c_fc": None, "transformer.h.1.mlp.c_proj": (2, 4)}


def test_one_step_gradients_match_reference():
    """Forward loss and every parameter's gradient, before any optimizer step."""
    for name, cfg in CONFIGS.items():
        ref = reference_loop(cfg, steps=0)
        model = gpt2_relu2()
        st.sparsify(model, cfg)
        batch = loops.token_batches()[: loops.B]
        loss_ref = ref(input_ids=batch, labels=batch).loss
        loss = model(input_ids=batch, labels=batch).loss
        torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
        loss_ref.backward()
        loss.backward()
        grads_ref = {n: p.grad for n, p in ref.named_parameters()}
        sparse = dict(st.sparse_layers(model))
        for n, p in model.named_parameters():
            layer = n.rsplit(".", 1)[0]
            key = n if not (layer in sparse and n.endswith(".weight") and cfg.method == "ste" and sparse[layer].input_nm) \
                else n.replace(".weight", ".parametrizations.weight.original")
            g = p.grad.t() if layer in sparse and n.endswith(".weight") else p.grad
            torch.testing.assert_close(g, grads_ref[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {n}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plain_loop_matches_reference(name):
    """Six SGD steps (across the switch to dense for `dense_finetune_from`) against the reference."""
    cfg = CONFIGS[name]
    model, sparsity = sparsifier_loop(cfg)
    _check_same(reference_loop(cfg), model, atol=1e-5)
    expect_dense = cfg.dense_finetune_from is not None
    assert sparsity.phase == ("dense" if expect_dense else "sparse")
    for _, layer in st.sparse_layers(model):
        if layer.input_nm is not None:
            assert layer.input_sparse_active is not expect_dense


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lightning_and_trainer_match_reference(name, tmp_path):
    """The adapters train to the reference's weights too (both with SGD, see `sgd`)."""
    cfg = CONFIGS[name]
    ref = reference_loop(cfg)
    _check_same(ref, loops.lightning_loop(cfg, tmp_path / "pl"), atol=1e-5)
    hf_model, sparsity = hf_loop_sgd(cfg, tmp_path / "hf")
    _check_same(ref, hf_model, atol=1e-5)
    assert sparsity.step == loops.STEPS
    for _, layer in st.sparse_layers(hf_model):
        if layer.input_nm is not None:
            assert layer.input_sparse_active is (cfg.dense_finetune_from is None)


def test_config_errors_and_fingerprint():
    for bad in ("3:2", "2-4", "0:4"):
        with pytest.raises(ValueError, match="`activation_sparsity`"):
            st.SparsityConfig(activation_sparsity=bad)
    with pytest.raises(TypeError, match="`activation_targets`"):
        st.SparsityConfig(activation_sparsity="2:4", activation_targets=3)
    with pytest.raises(ValueError, match="`mvue` is not implemented together with `activation_sparsity`"):
        st.SparsityConfig(activation_sparsity="2:4", mvue="exact")
    with pytest.raises(ValueError, match="activation_targets` selects layer"):
        st.sparsify(gpt2_relu2(), st.SparsityConfig(method="ste", targets=r"c_fc$", activation_sparsity="2:4"))
    with pytest.raises(ValueError, match=r"`activation_targets`='\(' is neither"):
        st.sparsify(gpt2_relu2(), st.SparsityConfig(method="dense", activation_sparsity="2:4", activation_targets="("))
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        st.sparsify(gpt2_relu2(), st.SparsityConfig(method="dense", activation_sparsity="2:4", activation_targets="nothing"))
    # A resume must match the activation settings (the engine's fingerprint).
    model = gpt2_relu2()
    saved = st.Sparsifier(model, CONFIGS["act-only"]).state_dict()
    other = st.Sparsifier(gpt2_relu2(), st.SparsityConfig(method="dense", seed=0))
    with pytest.raises(ValueError, match="activation_sparsity='2:4'"):
        other.load_state_dict(saved)


def test_export_metadata_and_plain_transformers_model():
    from sparsetrain.hub import activation_metadata, sparsity_metadata

    model = gpt2_relu2()
    st.sparsify(model, CONFIGS["ste+act"])
    plain = st.export(model)
    assert not st.sparse_layers(plain)  # plain transformers modules: loads without sparsetrain
    names = ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    cfg = {"method": "ste", "n": 2, "m": 4, "targets": "mlp_down", "activation_sparsity": "2:4",
           "dense_finetune_from": None}
    meta = sparsity_metadata(plain, names, cfg, 6, names)
    assert meta["activation_sparsity"] == "2:4" and meta["activation_layers"] == names
    assert meta["activation_sparsity_at_inference"] is True
    # After a dense final phase the model last trained without the mask: inference should not apply it.
    assert activation_metadata("2:4", names, 0.9)["activation_sparsity_at_inference"] is False
    assert activation_metadata(None, [], None) == {"activation_sparsity": None, "activation_layers": [],
                                                   "activation_sparsity_at_inference": False}
    # The exported model is the dense-weight function: with the mask applied by hand it is the trained one.
    batch = loops.token_batches()[:2]
    hooks = [m.register_forward_pre_hook(lambda mod, a: (a[0] * _loop_mask_like(a[0]),))
             for n, m in plain.named_modules() if n in names]
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=batch).logits, model(input_ids=batch).logits, rtol=1e-5, atol=1e-5)
    for h in hooks:
        h.remove()


def test_ddp_matches_one_process(tmp_path):
    """Two gloo ranks, each on half of every global batch, train to the one-process weights."""
    import os
    import subprocess
    import sys

    import act_ddp_worker as A
    import dist_worker as W

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, A.__file__, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(W.WORLD)]
    model = A.build_model()
    sparsity = st.Sparsifier(model, A.config())
    single = W.train(model, sparsity, torch.optim.SGD(model.parameters(), lr=A.LR), W.batches())
    assert sum(layer.input_nm is not None for _, layer in sparsity.layers) == 2
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["loss"]), torch.tensor(single["loss"]), rtol=0, atol=1e-5)
        for name, p in model.named_parameters():
            # Ranks average gradients in another order than one process sums them: float32 rounding.
            torch.testing.assert_close(r["params"][name], p.detach(), rtol=0, atol=2e-5, msg=name)
