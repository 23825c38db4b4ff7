"""The causal-LM module: configs, loss, metrics, optimizer groups and the learning-rate schedule."""

import math

import pytest
import torch

from sparsetrain.models import CausalLMModule, warmup_cosine_lr

TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=257)


def test_schedule_hand_values():
    lr, lo = 1.0, 0.1
    # warmup 4, cosine over steps 4..14
    assert warmup_cosine_lr(0, lr, lo, 4, 14) == pytest.approx(1 / 5)
    assert warmup_cosine_lr(3, lr, lo, 4, 14) == pytest.approx(4 / 5)
    assert warmup_cosine_lr(4, lr, lo, 4, 14) == pytest.approx(1.0)
    assert warmup_cosine_lr(9, lr, lo, 4, 14) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert warmup_cosine_lr(14, lr, lo, 4, 14) == pytest.approx(0.1)
    assert warmup_cosine_lr(1000, lr, lo, 4, 14) == pytest.approx(0.1)
    # A quarter of the way: min + (1 + cos(pi/4)) / 2 * (max - min)
    assert warmup_cosine_lr(6, 1.0, 0.0, 4, 12) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_scheduler_follows_the_formula_per_step():
    module = CausalLMModule(**TINY, lr=1e-2, min_lr=1e-3, warmup_steps=2, lr_decay_steps=6)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    expected = [1e-2 / 3, 2e-2 / 3, 1e-2, None, None, None, 1e-3, 1e-3]
    expected[3] = 1e-3 + 0.5 * (1 + math.cos(math.pi * 1 / 4)) * 9e-3
    expected[4] = 1e-3 + 0.5 * 9e-3
    expected[5] = 1e-3 + 0.5 * (1 + math.cos(math.pi * 3 / 4)) * 9e-3
    for step, want in enumerate(expected):
        assert opt.param_groups[0]["lr"] == pytest.approx(want), step
        opt.step()
        sched.step()


def test_no_decay_groups_gpt2():
    module = CausalLMModule(**TINY, weight_decay=0.1)
    decay, no_decay = module.param_groups()
    names = {id(p): n for n, p in module.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay_names == {
        f"model.transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert "model.transformer.wte.weight" in no_decay_names and "model.transformer.wpe.weight" in no_decay_names
    assert "model.transformer.ln_f.weight" in no_decay_names and "model.transformer.h.0.mlp.c_fc.bias" in no_decay_names
    n_params = len({id(p) for p in module.parameters()})
    assert len(decay_names) + len(no_decay_names) == n_params  # every parameter once (tied head counted once)


def test_llama_with_gqa_builds_and_runs():
    module = CausalLMModule(**{**TINY, "n_head": 4}, model_type="llama", n_kv_head=2)
    assert type(module.model).__name__ == "LlamaForCausalLM"
    assert module.config.num_key_value_heads == 2
    assert module.config.intermediate_size % 64 == 0
    logits = module(torch.randint(0, 257, (2, 16)))
    assert logits.shape == (2, 16, 320)  # vocab 257 padded to a multiple of 64
    decay, no_decay = module.param_groups()
    assert all(p.ndim == 2 for p in decay["params"])
    names = {id(p): n for n, p in module.named_parameters()}
    assert "model.model.embed_tokens.weight" in {names[id(p)] for p in no_decay["params"]}


def test_loss_and_validation_metrics_against_a_plain_loop():
    torch.manual_seed(0)
    module = CausalLMModule(**TINY).eval()
    batches = [(torch.randint(0, 257, (3, 16)), torch.randint(0, 257, (3, 16))),
               (torch.randint(0, 257, (1, 16)), torch.randint(0, 257, (1, 16)))]  # a short last batch
    nll, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = module.model(input_ids=x).logits
            for b in range(x.shape[0]):
                for t in range(x.shape[1]):
                    p = torch.softmax(logits[b, t].double(), -1)
                    nll -= math.log(p[y[b, t]].item())
                    count += 1
        for i, batch in enumerate(batches):
            module.validation_step(batch, i)
        mean = module.val_loss.compute().item()
    assert mean == pytest.approx(nll / count, rel=1e-5)
    # A fresh model predicts roughly uniformly over the padded vocabulary.
    assert mean == pytest.approx(math.log(320), rel=0.1)


def test_fresh_weights_depend_on_the_seed():
    torch.manual_seed(1)
    a = CausalLMModule(**TINY)
    torch.manual_seed(2)
    b = CausalLMModule(**TINY)
    torch.manual_seed(1)
    c = CausalLMModule(**TINY)
    wa, wb, wc = (m.model.transformer.h[0].mlp.c_fc.weight for m in (a, b, c))
    assert not torch.equal(wa, wb) and torch.equal(wa, wc)
    assert wa.std().item() == pytest.approx(0.02, rel=0.15)  # GPT-2's initializer_range


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model_type="bert"), "`model_type`"),
        (dict(n_embd=65), "`n_embd`"),
        (dict(min_lr=1.0, lr=0.1), "`min_lr`"),
        (dict(warmup_steps=-1), "`warmup_steps`"),
        (dict(n_kv_head=1), "`n_kv_head`"),
        (dict(lr_decay_steps=5, warmup_steps=10), "`lr_decay_steps`"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalLMModule(**{**TINY, **kwargs})


def test_decay_steps_needs_max_steps():
    module = CausalLMModule(**TINY)
    with pytest.raises(ValueError, match="`trainer.max_steps`"):
        module.configure_optimizers()
