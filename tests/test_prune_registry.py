"""One pruner registry for `prune` and the engine's `prune_at`; the config's choices come from it."""

import pytest
import torch

import sparsetrain as st
from reference import loop_mask
from sparsetrain.pruning import MID_TRAINING_PRUNERS, PRUNE_METHODS, PRUNERS


def test_names_and_what_each_reads():
    assert PRUNE_METHODS == ("magnitude", "wanda", "sparsegpt", "prox")
    assert {name: p.inputs for name, p in PRUNERS.items()} == {
        "magnitude": "nothing", "wanda": "input_norms", "sparsegpt": "gram", "prox": "gram"}
    # The engine collects only the input norms while training: the Gram-matrix pruners cannot run there.
    assert MID_TRAINING_PRUNERS == ("magnitude", "wanda")
    from sparsetrain import config

    assert config.PRUNE_METHODS == MID_TRAINING_PRUNERS
    with pytest.raises(ValueError, match=r"Unknown `prune_method`='sparsegpt'; valid choices: 'magnitude', 'wanda'"):
        st.SparsityConfig(prune_at=5, prune_method="sparsegpt")


@pytest.mark.parametrize("name", MID_TRAINING_PRUNERS)
def test_mid_training_pruners_from_weights_and_input_norms(name):
    """What `prune_at` does: the weights and the per-input sums of x^2 only (H given as its diagonal)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=g)
    x = torch.randn(40, 16, generator=g) * torch.linspace(0.1, 3.0, 16)
    sq = (x * x).sum(0)
    w_hat, mask = PRUNERS[name].prune(w, torch.diag(sq), 2, 4)
    score = w.abs() if name == "magnitude" else w.abs() * sq.sqrt()  # Wanda: |W_ij| * ||x_j||
    want = torch.tensor(loop_mask(score.tolist(), 2, 4))
    assert torch.equal(mask, want)
    assert torch.equal(w_hat, w * want)
    # The full Gram matrix gives the same answer: only its diagonal is read.
    assert torch.equal(PRUNERS[name].prune(w, x.t() @ x, 2, 4)[1], want)


def test_gram_pruners_keep_a_given_mask_and_score():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 8, generator=g)
    x = torch.randn(64, 8, generator=g)
    h = x.t() @ x / 64
    fixed = torch.tensor(loop_mask(torch.rand(8, 8, generator=g).tolist(), 2, 4))
    sgpt = PRUNERS["sparsegpt"]
    w_hat, mask = sgpt.prune(w, h, 2, 4, mask=fixed, damp=0.01, block_size=4)
    assert torch.equal(mask, fixed) and bool((w_hat[~fixed] == 0).all())
    assert sgpt.score(w, h, damp=0.01, block_size=4).shape == w.shape
    assert PRUNERS["prox"].prune is None and PRUNERS["prox"].score is None  # `prune` runs its schedule
