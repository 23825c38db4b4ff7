"""One target-selection grammar for `sparsify` and `prune`, and one Conv1D-aware weight access:
each case checked against name lists written out by hand for the model at hand."""

import pytest
import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import sparsetrain as st
from sparsetrain.targets import layer_weight, select_targets, set_layer_weight


def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


GPT2_BLOCK = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
GPT2_ALL = [f"transformer.h.{i}.{k}" for i in range(2) for k in GPT2_BLOCK]


class Plain(nn.Module):
    """No block list: two feed-forward layers, a classifier head and an LM head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.ffn = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.proj = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 4)
        self.lm_head = nn.Linear(8, 12, bias=False)
        self.lm_head.weight = self.emb.weight


def names(model, targets, **kw):
    chosen, skipped = select_targets(model, targets, **kw)
    return list(chosen), skipped


def test_presets_on_gpt2():
    assert names(gpt2(), "mlp") == ([n for n in GPT2_ALL if ".mlp." in n], [])
    assert names(gpt2(), "all") == (GPT2_ALL, [])  # lm_head is a head (and tied to wte)


def test_none_means_the_blocks_or_all():
    model = gpt2()
    assert names(model, None, within="transformer.h") == (GPT2_ALL, [])
    # Without blocks: every linear layer but the heads and tied weights.
    assert names(Plain(), None) == (["ffn.0", "ffn.2", "proj"], [])
    assert names(Plain(), "all") == (["ffn.0", "ffn.2", "proj"], [])
    assert names(Plain(), "mlp") == (["ffn.0", "ffn.2"], [])


def test_regex_and_callable_and_skipped_outside_blocks():
    model = gpt2()
    assert names(model, r"h\.1\.mlp\.c_fc$") == (["transformer.h.1.mlp.c_fc"], [])
    picked, _ = names(model, lambda mod, name: isinstance(mod, Conv1D) and name.endswith("c_proj"))
    assert picked == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
                      "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]
    picked, skipped = names(model, r"mlp\.c_fc|lm_head", within="transformer.h")
    assert picked == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert [n for n, _ in skipped] == ["lm_head"] and "outside the decoder blocks" in skipped[0][1]


def test_exclude_and_errors():
    model = gpt2()
    picked, _ = names(model, "all", exclude=lambda name, mod: ".attn." in name)
    assert picked == [n for n in GPT2_ALL if ".attn." not in n]
    with pytest.raises(ValueError, match="`targets`='\\(unclosed' is neither 'mlp', 'all' nor a valid regex"):
        select_targets(model, "(unclosed")
    with pytest.raises(TypeError, match="`targets` must be None, 'mlp', 'all', a regex string or a callable"):
        select_targets(model, 3)


def test_sparsify_and_prune_read_the_same_grammar():
    """The same `targets` picks the same layers in both callers."""
    from sparsetrain.pruning import prune

    for targets in ("mlp", r"attn\.c_proj$", lambda mod, name: name.endswith("mlp.c_proj")):
        swapped = st.sparsify(gpt2(), st.SparsityConfig(targets=targets))
        calib = [torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))]
        pruned = [l.name for l in prune(gpt2(), calib, method="magnitude", targets=targets).layers]
        assert sorted(swapped) == sorted(pruned), targets
    # sparsify never picks layers already swapped, nor nn.MultiheadAttention's out_proj.
    model = gpt2()
    st.sparsify(model, st.SparsityConfig(targets="mlp"))
    assert st.sparsify(model, st.SparsityConfig(method="ste", targets="all")) == [
        n for n in GPT2_ALL if ".attn." in n]
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
    assert st.sparsify(enc, st.SparsityConfig(targets="all")) == ["layers.0.linear1", "layers.0.linear2"]
    assert "layers.0.self_attn.out_proj" in select_targets(enc, "all")[0]  # prune may rewrite it in place


def test_layer_weight_is_out_in_for_linear_and_conv1d():
    conv = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs: weight stored (in=4, out=6)
    lin = nn.Linear(4, 6)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(24.0).view(4, 6))
        lin.weight.copy_(torch.arange(24.0).view(4, 6).t())
    x = torch.randn(3, 4)
    for mod in (conv, lin):
        w = layer_weight(mod)
        assert w.shape == (6, 4)
        torch.testing.assert_close(x @ w.t() + mod.bias, mod(x))  # y = x W^T + b in both layouts
    new = torch.arange(24.0).view(6, 4) * -1
    for mod in (conv.to(torch.float16), lin):
        set_layer_weight(mod, new)
        assert mod.weight.dtype == (torch.float16 if mod is conv else torch.float32)
        assert torch.equal(layer_weight(mod).float(), new)
    assert torch.equal(conv.weight.float(), new.t())  # stored back in Conv1D's own layout
