"""sparsify / densify / export on tiny transformers GPT-2 and Llama models and nn.TransformerEncoder."""

import re
import warnings

import pytest
import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import sparsetrain as st
from reference import loop_mask

METHODS = ["ste", "sr-ste", "s-ste", "dense"]


def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=97, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def encoder():
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2).eval()


def groups_ok(w, n=2, m=4):
    """At most n non-zeros in every group of m along the input dim (a plain count)."""
    rows = w.tolist()
    return all(sum(v != 0 for v in row[g : g + m]) <= n for row in rows for g in range(0, len(row), m))


def test_mlp_targets_per_architecture():
    assert st.sparsify(gpt2(), st.SparsityConfig()) == [
        f"transformer.h.{i}.mlp.{k}" for i in range(2) for k in ("c_fc", "c_proj")
    ]
    assert st.sparsify(llama(), st.SparsityConfig()) == [
        f"model.layers.{i}.mlp.{k}" for i in range(2) for k in ("gate_proj", "up_proj", "down_proj")
    ]
    assert st.sparsify(encoder(), st.SparsityConfig()) == [f"layers.{i}.linear{k}" for i in range(2) for k in (1, 2)]


def test_all_targets_skip_head_embeddings_and_mha_internals():
    names = st.sparsify(gpt2(), st.SparsityConfig(targets="all"))
    assert "lm_head" not in names and len(names) == 8  # c_attn, c_proj, c_fc, c_proj per block
    names = st.sparsify(llama(), st.SparsityConfig(targets="all"))
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    # nn.MultiheadAttention reads out_proj.weight directly: swapping it would do nothing
    names = st.sparsify(encoder(), st.SparsityConfig(targets="all"))
    assert not any("out_proj" in n for n in names)


def test_regex_and_callable_targets():
    assert st.sparsify(gpt2(), st.SparsityConfig(targets=r"h\.1\.mlp\.c_fc$")) == ["transformer.h.1.mlp.c_fc"]
    picked = st.sparsify(llama(), st.SparsityConfig(targets=lambda mod, name: name.endswith("down_proj")))
    assert picked == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_conv1d_groups_run_along_input_dim():
    model = gpt2()
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D: weight (in=32, out=128)
    w_in_out = conv.weight.detach().clone()
    st.sparsify(model, st.SparsityConfig(method="ste"))
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, st.SparseLinear) and layer.weight.shape == (128, 32)
    w = w_in_out.t()  # (out, in): groups of 4 along the 32 inputs
    expect = torch.tensor(loop_mask(w.tolist(), 2, 4)) * w
    assert torch.equal(layer.effective_weight(), expect)
    exported = st.export(model).transformer.h[0].mlp.c_fc
    assert isinstance(exported, Conv1D) and torch.equal(exported.weight, expect.t())


@pytest.mark.parametrize("build", [gpt2, llama])
@pytest.mark.parametrize("method", METHODS)
def test_train_step_and_export(build, method):
    model = build().train()
    cfg = st.SparsityConfig(method=method, mvue=None if method == "dense" else "exact", seed=0)
    names = st.sparsify(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 97, (2, 16))
    for _ in range(2):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    model.eval()
    for name in names:
        layer = model.get_submodule(name)
        assert layer.weight.grad is None
        if method != "dense":
            assert groups_ok(layer.effective_weight())
    exported = st.export(model)
    assert not any(isinstance(mod, st.SparseLinear) for mod in exported.modules())
    with torch.no_grad():
        assert torch.equal(exported(x).logits, model(x).logits)
    for name in names:
        w = exported.get_submodule(name).weight
        w = w.t() if isinstance(exported.get_submodule(name), Conv1D) else w
        if method != "dense":
            assert groups_ok(w)


def test_export_roundtrips_through_save_pretrained(tmp_path):
    model = gpt2()
    st.sparsify(model, st.SparsityConfig(method="s-ste"))
    exported = st.export(model)
    exported.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-6)
    assert groups_ok(loaded.transformer.h[1].mlp.c_proj.weight.t())


def test_densify_restores_plain_layers_with_dense_weights():
    model = llama()
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    st.sparsify(model, st.SparsityConfig(method="ste"))
    st.densify(model)
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is nn.Linear and torch.equal(up.weight, before)


def test_encoder_stack_forward_backward():
    model = encoder().train()
    st.sparsify(model, st.SparsityConfig(method="s-ste", mvue="approx", seed=1))
    x = torch.randn(2, 8, 16)
    model(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_indivisible_layers_left_dense_with_one_warning():
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6), nn.Linear(6, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = st.sparsify(model, st.SparsityConfig(targets="all"))
    assert names == ["2"]
    msgs = [str(w.message) for w in caught if "left" in str(w.message)]
    assert len(msgs) == 1 and "0 (in_features=10)" in msgs[0] and "3 (in_features=6)" in msgs[0]
    assert type(model[0]) is nn.Linear and isinstance(model[2], st.SparseLinear)


def test_sparsify_errors():
    with pytest.raises(ValueError, match=re.escape("`targets`='nothing_here' matched no nn.Linear")):
        st.sparsify(gpt2(), st.SparsityConfig(targets="nothing_here"))
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        st.sparsify(nn.Sequential(nn.Linear(8, 8)), st.SparsityConfig(targets="mlp"))
    model = llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=re.escape("`model.layers.1.mlp.down_proj.weight` holds 1 non-finite")):
        st.sparsify(model, st.SparsityConfig())
    with pytest.raises(ValueError, match="neither 'mlp', 'all' nor a valid regex"):
        st.sparsify(gpt2(), st.SparsityConfig(targets="(unclosed"))
