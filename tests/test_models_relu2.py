"""Squared-ReLU FFNs: `CausalLMModule(activation="relu2")` builds GPT-2 and Llama whose
down-projection sees relu(.)^2 of its pre-activation, checked against the formula by hand."""

import pytest
import torch

from sparsetrain.models import CausalLMModule, build_hf_config

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=257)


def _capture_input(module, x_fn):
    seen = {}
    handle = module.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    x_fn()
    handle.remove()
    return seen["x"]


def test_gpt2_relu2_feeds_c_proj_squared_relu():
    torch.manual_seed(0)
    lm = CausalLMModule(**TINY, model_type="gpt2", activation="relu2")
    assert lm.config.activation_function == "relu2"
    mlp = lm.model.transformer.h[0].mlp
    h = torch.randn(3, 5, 32)
    x_in = _capture_input(mlp.c_proj, lambda: mlp(h))
    pre = h @ mlp.c_fc.weight + mlp.c_fc.bias  # Conv1D stores W^T
    torch.testing.assert_close(x_in, torch.clamp(pre, min=0) ** 2)
    assert float((x_in == 0).float().mean()) > 0.3  # about half of a Gaussian pre-activation is <= 0


def test_llama_relu2_gates_down_proj():
    torch.manual_seed(0)
    lm = CausalLMModule(**TINY, model_type="llama", activation="relu2")
    assert lm.config.hidden_act == "relu2"
    mlp = lm.model.model.layers[0].mlp
    h = torch.randn(2, 4, 32)
    x_in = _capture_input(mlp.down_proj, lambda: mlp(h))
    expect = torch.clamp(h @ mlp.gate_proj.weight.t(), min=0) ** 2 * (h @ mlp.up_proj.weight.t())
    torch.testing.assert_close(x_in, expect)


def test_default_activation_is_the_family_default():
    assert build_hf_config("gpt2", 64, 1, 2, 32, 16, None, None, 0.0, None, {}).activation_function == "gelu_new"
    assert build_hf_config("llama", 64, 1, 2, 32, 16, None, None, 0.0, None, {}).hidden_act == "silu"


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`activation`='relu3'.*'relu2'"):
        CausalLMModule(**TINY, activation="relu3")
