"""torch.compile of a model holding sparse layers: no graph break comes from sparsetrain, and three
compiled training steps give the eager run's losses and weights.

MVUE's draws come from a per-layer (seed, offset) tensor through an opaque custom op, the
cuSPARSELt check settles CPU layers before touching anything Dynamo cannot trace, and the
non-finite group fill runs unconditionally when compiling (no data-dependent branch).
"""

import warnings

import pytest
import torch

import sparsetrain as st

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "s-ste+mvue": dict(method="s-ste", mvue="exact"),
    "sr-ste": dict(method="sr-ste"),
}


def _gpt2():
    torch.manual_seed(0)
    gcfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32,
                                   bos_token_id=0, eos_token_id=0,
                                   # no dropout: inductor draws its own dropout masks; MVUE is the randomness here
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(gcfg)


def _model_and_engine(cfg):
    model = _gpt2()
    sparsity = st.Sparsifier(model, st.SparsityConfig(seed=0, targets="all", **cfg))
    # SGD, not Adam: Adam rescales gradients that are zero up to rounding (GPT-2's key bias) to full
    # steps of either sign, which would compare float noise rather than the sparse layers.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsity.attach(opt)
    return model, opt


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 16), generator=g) for _ in range(3)]


def _sparsetrain_breaks(explained):
    """Graph-break reasons with a frame inside the sparsetrain package."""
    out = []
    for reason in explained.break_reasons:
        frames = [f"{f.filename}:{f.lineno}" for f in reason.user_stack if "/sparsetrain/" in f.filename]
        if frames:
            out.append((frames[-1], reason.reason.splitlines()[0]))
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_graph_break_from_sparsetrain(name):
    ids = _batches()[0]
    counts = {}
    for kind in ("dense", "sparse"):
        model = _gpt2() if kind == "dense" else _model_and_engine(CONFIGS[name])[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            explained = torch._dynamo.explain(lambda i: model(i, labels=i).loss)(ids)
        assert _sparsetrain_breaks(explained) == []
        counts[kind] = explained.graph_break_count
    # transformers' own loss breaks the graph once here; the sparse layers add nothing to that.
    assert counts["sparse"] == counts["dense"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_training_matches_eager(name):
    """Three optimizer steps, eager and compiled (inductor), from the same weights and draws."""
    runs = {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        model, opt = _model_and_engine(CONFIGS[name])
        fwd = torch.compile(model) if mode == "compiled" else model
        losses = []
        for ids in _batches():
            loss = fwd(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
        runs[mode] = (losses, {k: v.detach().clone() for k, v in model.state_dict().items()})
    (le, we), (lc, wc) = runs["eager"], runs["compiled"]
    assert lc == pytest.approx(le, abs=1e-5)
    assert len(set(le)) == 3  # the steps did change the model
    for k in we:
        torch.testing.assert_close(wc[k], we[k], atol=1e-5, rtol=0, equal_nan=True)  # beta is NaN but for S-STE


def test_mvue_draws_follow_seed_and_offset():
    """Each forward takes the next draw (seed, offset): micro-batches of one step draw apart, a
    step's seed replays them, and draw 0 of a seed is the stream of a generator seeded with it."""
    from sparsetrain import SparseLinear
    from sparsetrain.ops import mvue24
    from sparsetrain.ops.mvue import mix_seed

    torch.manual_seed(0)
    layer = SparseLinear(16, 8, config=st.SparsityConfig(method="ste", mvue="exact", seed=3))
    x = torch.randn(12, 16)
    dy = torch.randn(12, 8)

    def weight_grad():
        layer.weight.grad = None
        layer(x).backward(dy)
        return layer.weight.grad.clone()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no engine here: the layer says so once
        layer.set_step_state(sparse=True, step=5, rank=1)
        first, second = weight_grad(), weight_grad()
        layer.set_step_state(sparse=True, step=5, rank=1)
        again = weight_grad(), weight_grad()
    assert not torch.equal(first, second)
    assert torch.equal(again[0], first) and torch.equal(again[1], second)
    # dW = MVUE(dY)^T X with dY's 12 tokens in groups of 4, drawn from the step's seed.
    g = mvue24(dy, 0, "exact", torch.Generator().manual_seed(mix_seed(layer.seed, 1, 5)))
    torch.testing.assert_close(first, g.t() @ x)
