"""The engine under plain-PyTorch DDP and FSDP2 (`fully_shard`), 2 gloo processes on CPU, against a
single-process run of the same tiny GPT-2 on the same global batches, and against closed formulas.

`tests/dist_worker.py` runs every scenario in one launch (starting processes is the slow part);
the single-process references run here, with the same model, data and training loop.

Tolerances: the ranks average gradients in a different order than one process sums them, so
weights drift apart by float32 rounding only: after 4 AdamW steps (lr 1e-2) effective weights
agree to 2e-5 (observed ~3e-6), losses to 1e-5 and beta to 1e-6 relative. The model's dense
parameters (attention, biases) get 1e-4 (observed ~4e-5): Adam divides by sqrt(v), so where a
gradient is near zero its rounding moves the update by a visible fraction of lr. Discrete
quantities (masks, flip counts) must agree exactly.
"""

import os
import subprocess
import sys

import pytest
import torch

import sparsetrain as st
from reference import loop_mask

sys.path.insert(0, os.path.dirname(__file__))
import dist_worker as W  # noqa: E402

ATOL_W = 2e-5
ATOL_DENSE = 1e-4
ATOL_LOSS = 1e-5
SRSTE_DECAY = st.SparsityConfig().srste_decay


# ------------------------------------------------------------------ independent references
def ref_mask(w, n=2, m=4):
    """Keep the n largest |w| of each group of m along the last dim; on ties the lower index."""
    g = w.abs().reshape(*w.shape[:-1], -1, m)
    order = torch.sort(-g, dim=-1, stable=True).indices
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order[..., :n], True).reshape(w.shape)


def ref_soft(w, n=2, m=4):
    """S(w) = sign(w) max(|w| - t, 0), t the (m-n)-th smallest |w| of the group, in float64."""
    g = w.double().reshape(*w.shape[:-1], -1, m)
    t = g.abs().sort(dim=-1).values[..., m - n - 1:m - n]
    return (torch.sign(g) * (g.abs() - t).clamp_min(0)).reshape(w.shape)


def ref_beta(weights):
    """sum <W, S(W)> / sum <S, S> of one full weight."""
    s = ref_soft(weights)
    return float((weights.double() * s).sum() / (s * s).sum())


def ref_metric_mask(w, method):
    return ref_soft(w) != 0 if method == "s-ste" else ref_mask(w)


# ------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, W.__file__, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(W.WORLD)]


@pytest.fixture(scope="module")
def single():
    """Single-process runs on the full global batch (the reference for both DDP and FSDP2)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    runs = {}
    for name in ("sste", "srste", "tsrste"):
        model = W.build_model()
        sparsity = st.Sparsifier(model, W._config(**W.SCENARIOS[name]))
        opt = torch.optim.AdamW(model.parameters(), lr=W.LR)
        res = W.train(model, sparsity, opt, W.batches(), record_weights=True)
        res["model"] = model
        runs[name] = res
    return runs


def _close(a, b, atol):
    return max(float((a[k] - b[k]).abs().max()) for k in b) <= atol and a.keys() == b.keys()


def _close_state(a, b, sparse_names):
    """State dicts: the sparse layers' weights to ATOL_W, everything else to ATOL_DENSE."""
    sparse = {k for k in b if k.rsplit(".", 1)[0] in sparse_names and k.endswith(".weight")}
    assert sparse and a.keys() == b.keys()
    return (_close({k: a[k] for k in sparse}, {k: b[k] for k in sparse}, ATOL_W)
            and _close({k: a[k] for k in b if k not in sparse}, {k: b[k] for k in b if k not in sparse}, ATOL_DENSE))


# ------------------------------------------------------------------ DDP
@pytest.mark.parametrize("key", ["ddp_sste", "ddp_srste", "ddp_mvue", "ddp_tsrste"])
def test_ddp_ranks_hold_identical_nm_effective_weights(ranks, key):
    r0, r1 = ranks[0][key], ranks[1][key]
    assert r0["effective"].keys() == r1["effective"].keys() and len(r0["effective"]) == 4
    for name, w in r0["effective"].items():
        assert torch.equal(w, r1["effective"][name]), name
        assert torch.equal(w != 0, torch.tensor(loop_mask(w.tolist(), 2, 4))), name  # exactly 2:4
    assert r0["loss"] == r1["loss"]


@pytest.mark.parametrize("method,key", [("sste", "ddp_sste"), ("srste", "ddp_srste"), ("tsrste", "ddp_tsrste")])
def test_ddp_matches_single_process(ranks, single, method, key):
    run, ref = ranks[0][key], single[method]
    assert run["loss"] == pytest.approx(ref["loss"], abs=ATOL_LOSS)
    assert _close(run["effective"], ref["effective"], ATOL_W)
    assert [m.keys() for m in run["metrics"]] == [m.keys() for m in ref["metrics"]]
    if method == "sste":
        for name, beta in run["beta"].items():
            initial = ref["grads"]["weight"][0][name]
            assert float(beta) == pytest.approx(ref_beta(initial), rel=1e-6), name
            assert float(beta) == float(ref["beta"][name])  # rank 0's weights are the single run's


def test_ddp_transposable_masks_and_flip_rate(ranks, single):
    """T-SR-STE (refresh every 2 steps): the same transposable masks on every rank and in one
    process; the flip rate counts the entries each refresh changed, and 0 between refreshes."""
    runs = [r["ddp_tsrste"] for r in ranks]
    assert len(runs[0]["masks"]) == W.STEPS + 1
    for step in range(W.STEPS + 1):
        for name, mask in runs[0]["masks"][step].items():
            assert torch.equal(mask, runs[1]["masks"][step][name]) and torch.equal(mask, single["tsrste"]["masks"][step][name])
            tiles = mask.reshape(mask.shape[0] // 4, 4, mask.shape[1] // 4, 4).transpose(1, 2)  # (R, C, 4, 4)
            assert bool((tiles.sum(-1) == 2).all() and (tiles.sum(-2) == 2).all()), name
    masks = runs[0]["masks"]
    total = sum(m.numel() for m in masks[0].values())
    for step in range(1, W.STEPS + 1):
        flips = sum(int((masks[step][n] != masks[step - 1][n]).sum()) for n in masks[step])
        assert runs[0]["metrics"][step - 1]["sparsity/flip_rate"] == flips / total, step
        assert (flips > 0) == (step % 2 == 0), step  # masks move at refreshes only
    assert runs[0]["metrics"][1]["sparsity/zero_fraction"] == 0.5


def test_ddp_mvue_draws_differ_between_ranks_and_reproduce(ranks):
    # Same batch, same weights, no all-reduce: the local dW differs only through the MVUE draws.
    g0, g1 = ranks[0]["mvue_local_grads"], ranks[1]["mvue_local_grads"]
    for name in g0:
        assert float((g0[name] - g1[name]).abs().max()) > 1e-3, name
    # Rank 0's stream is the single-process stream (seeded from (seed, rank, step)): a fresh
    # process reproduces its draws.
    model = W.build_model()
    sparsity = st.Sparsifier(model, W._config(method="s-ste", mvue="exact"))
    sparsity.attach(torch.optim.SGD(model.parameters(), lr=0.0))
    x = W.batches()[0][:2]
    model(input_ids=x, labels=x).loss.backward()
    for name, layer in sparsity.layers:
        assert torch.allclose(layer.weight.grad, g0[name], rtol=1e-5, atol=1e-7), name
    # A rerun of the whole DDP MVUE training reproduces it bit for bit, on every rank.
    for r in ranks:
        first, again = r["ddp_mvue"], r["ddp_mvue_rerun"]
        assert first["loss"] == again["loss"]
        assert all(torch.equal(first["effective"][n], again["effective"][n]) for n in first["effective"])
    # And the MVUE run did train differently from the exact-gradient one.
    assert ranks[0]["ddp_mvue"]["loss"][1:] != ranks[0]["ddp_sste"]["loss"][1:]


# ------------------------------------------------------------------ FSDP2
def test_fsdp_refuses_transposable_masks_clearly(ranks):
    for r in ranks:
        assert "`transposable=True` is not supported with FSDP2" in r["fsdp_transposable_error"]


def test_fsdp_weights_are_row_shards(ranks):
    run = ranks[0]["fsdp_sste"]
    assert run["sharded"]
    assert run["local_rows"]["transformer.h.0.mlp.c_fc"] == (64, 32)  # 128 rows over 2 ranks
    assert run["local_rows"]["transformer.h.0.mlp.c_proj"] == (16, 128)


@pytest.mark.parametrize("method,key", [("sste", "fsdp_sste"), ("srste", "fsdp_srste")])
def test_fsdp_matches_single_process(ranks, single, method, key):
    ref = single[method]
    for r in ranks:
        run = r[key]
        assert run["loss"] == pytest.approx(ref["loss"], abs=ATOL_LOSS)
        assert _close(run["effective"], ref["effective"], ATOL_W)
        for step, (got, want) in enumerate(zip(run["metrics"], ref["metrics"])):
            assert got.keys() == want.keys()
            assert got["sparsity/flip_rate"] == want["sparsity/flip_rate"], step
            assert got["sparsity/zero_fraction"] == want["sparsity/zero_fraction"], step
            if method == "sste":
                assert got["sparsity/beta_mean"] == pytest.approx(want["sparsity/beta_mean"], rel=1e-6)
    for name in ranks[0][key]["effective"]:
        assert torch.equal(ranks[0][key]["effective"][name], ranks[1][key]["effective"][name])


def test_fsdp_beta_is_the_all_reduced_full_weight_scale(ranks, single):
    # Each rank holds half the rows; beta must be the full weight's, the same on both ranks.
    initial = ranks[0]["fsdp_sste"]["grads"]["weight"][0]  # gathered weights before step 1
    for r in ranks:
        for name, beta in r["fsdp_sste"]["beta"].items():
            assert float(beta) == pytest.approx(ref_beta(initial[name]), rel=1e-6), name
            assert float(beta) == pytest.approx(float(single["sste"]["beta"][name]), rel=1e-6), name
            half = initial[name][: initial[name].shape[0] // 2]
            assert abs(ref_beta(half) - ref_beta(initial[name])) > 1e-4  # a local beta would be wrong


def test_fsdp_float64_matches_a_single_process_to_float64_rounding(ranks):
    # beta's sums are float64 on every shard, as in one process (float32 sums agreed only to ~1e-6).
    model = W.build_model().double()
    sparsity = st.Sparsifier(model, W._config(**W.SCENARIOS["sste"]))
    ref = W.train(model, sparsity, torch.optim.AdamW(model.parameters(), lr=W.LR), W.batches(), record_weights=True)
    for r in ranks:
        run = r["fsdp_sste64"]
        for name, beta in run["beta"].items():
            assert float(beta) == pytest.approx(float(ref["beta"][name]), rel=1e-12, abs=0), name
        # (the losses are not compared: transformers computes them from float32 logits)
        assert _close(run["effective"], ref["effective"], 1e-10)


@pytest.mark.parametrize("method,key", [("sste", "fsdp_sste"), ("srste", "fsdp_srste")])
def test_fsdp_metrics_from_gathered_weights(ranks, method, key):
    run = ranks[0][key]
    weights = [run["grads"]["weight"][0]] + run["weights"]  # W before step 1, then after each step
    mtd = "s-ste" if method == "sste" else "sr-ste"
    for step in range(1, len(weights)):
        masks = {n: ref_metric_mask(w, mtd) for n, w in weights[step].items()}
        prev = {n: ref_metric_mask(w, mtd) for n, w in weights[step - 1].items()}
        total = sum(m.numel() for m in masks.values())
        flips = sum(int((masks[n] != prev[n]).sum()) for n in masks)
        kept = sum(int(m.sum()) for m in masks.values())
        assert run["metrics"][step - 1]["sparsity/flip_rate"] == flips / total, step
        assert run["metrics"][step - 1]["sparsity/zero_fraction"] == (total - kept) / total, step
    assert run["metrics"][-1]["sparsity/flip_rate"] > 0  # masks moved: the check has teeth


@pytest.mark.parametrize("key", ["ddp_srste", "fsdp_srste"])
def test_srste_decay_once_per_step_on_every_shard(ranks, single, key):
    """The gradient change the engine makes before the update is lambda_W (1 - mask(W)) W."""
    for r in ranks:
        grads = r[key]["grads"]
        assert len(grads["before"]) == len(grads["after"]) == W.STEPS  # once per optimizer step
        for before, after, weight in zip(grads["before"], grads["after"], grads["weight"]):
            for name, w in weight.items():
                applied = after[name].double() - before[name].double()
                nominal = SRSTE_DECAY * w.double() * ~ref_mask(w)
                # float32 rounding of the updated gradient is the only error
                tol = torch.finfo(torch.float32).eps * float(after[name].abs().max())
                assert float((applied - nominal).abs().max()) <= tol, name
                assert float(nominal.abs().max()) > 10 * tol  # the decay is visible above rounding
    ref = single["srste"]["grads"]
    got = ranks[0][key]["grads"]
    for name in ref["before"][0]:  # step 1: same weights, so the same decay as one process
        applied = got["after"][0][name] - got["before"][0][name]
        want = ref["after"][0][name] - ref["before"][0][name]
        assert torch.allclose(applied, want, rtol=0, atol=torch.finfo(torch.float32).eps * float(ref["after"][0][name].abs().max()))


def test_fsdp_export_equals_single_process_export(ranks, single):
    exported_single = st.export(single["sste"]["model"])
    want = exported_single.state_dict()
    x = W.batches()[0]
    with torch.no_grad():
        want_logits = exported_single(input_ids=x).logits
    for r in ranks:
        run = r["fsdp_sste"]
        assert "cannot copy a model sharded with FSDP2" in run["export_copy_error"]
        assert "inplace=True" in run["export_copy_error"]
        assert run["export_sparse_left"] == 0
        got = run["export"]
        assert _close_state(got, want, run["effective"].keys())
        for name in ranks[0]["fsdp_sste"]["effective"]:
            w = got[name + ".weight"]  # Conv1D layout (in, out): 2:4 groups run down the columns
            assert torch.equal(w.t() != 0, ref_mask(w.t()) & (w.t() != 0)) and int((w != 0).sum()) == w.numel() // 2
        assert torch.allclose(run["export_logits"], want_logits, atol=1e-4)


def test_fsdp_full_state_dict_restores_the_trained_sparse_model(ranks, single):
    full = ranks[0]["fsdp_sste"]["full_state_dict"]
    ref_model = single["sste"]["model"]
    assert full.keys() == ref_model.state_dict().keys()
    assert not any(k.endswith(".mask") for k in full)  # no mask buffer: it follows from the weights
    assert _close_state(full, ref_model.state_dict(), ranks[0]["fsdp_sste"]["effective"].keys())
    model = W.build_model(seed=5)
    sparsity = st.Sparsifier(model, W._config(method="s-ste"))
    model.load_state_dict(full)
    for name, layer in sparsity.layers:
        assert torch.equal(layer.effective_weight(), ranks[0]["fsdp_sste"]["effective"][name]), name
