"""Transposable sparse training (T-STE / T-SR-STE): W~ and W~^T stay N:M through steps, masks are
refreshed every `mask_update_interval` optimizer steps, and a resumed run matches an uninterrupted one."""

import lightning as L
import pytest
import torch
import torch.nn as nn

import sparsetrain as st
from lightning_helpers import TinyRegressor, loader, quiet_trainer


def tiles_ok(w, n=2, m=4):
    """Every m x m tile keeps at most n non-zeros per row and per column (plain loops)."""
    rows, cols = w.shape
    nz = (w != 0).tolist()
    for r0 in range(0, rows, m):
        for c0 in range(0, cols, m):
            for i in range(m):
                if sum(nz[r0 + i][c0 : c0 + m]) > n:
                    return False
            for j in range(m):
                if sum(nz[r0 + i][c0 + j] for i in range(m)) > n:
                    return False
    return True


class Watch(L.Callback):
    def __init__(self):
        self.masks, self.ok = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = [layer for _, layer in st.sparse_layers(pl_module)]
        self.masks.append([layer.mask.clone() for layer in layers])
        self.ok.append(all(tiles_ok(layer.effective_weight()) and tiles_ok(layer.effective_weight().t())
                           for layer in layers))


@pytest.mark.parametrize("method", ["ste", "sr-ste"])
def test_masks_stay_transposable_and_refresh_on_schedule(method):
    torch.manual_seed(0)
    model, watch = TinyRegressor(lr=5e-2), Watch()
    cfg = st.SparsityConfig(method=method, targets="all", transposable=True, mask_update_interval=2,
                            masked_decay=6e-5 if method == "sr-ste" else None)
    quiet_trainer(max_steps=6, callbacks=[st.SparseTraining(cfg), watch]).fit(model, loader(n_batches=6))
    assert all(watch.ok)
    # Masks change only at optimizer steps 2, 4, 6 (after the step that completes each interval).
    changed = [any(not torch.equal(a, b) for a, b in zip(prev, cur)) for prev, cur in zip(watch.masks, watch.masks[1:])]
    for step, flag in zip(range(2, 7), changed):  # transition into step `step`
        if step % 2:
            assert not flag, f"mask changed at step {step}"
    assert any(changed)  # lr is large enough for some refresh to move a mask
    # The forward really uses the stored mask: W~ = W * mask.
    for _, layer in st.sparse_layers(model):
        assert torch.equal(layer.effective_weight(), layer.weight.detach() * layer.mask)


def test_transposable_mask_is_the_tile_optimum_for_2_4():
    torch.manual_seed(1)
    lin = nn.Linear(8, 8)
    layer = st.SparseLinear.from_dense(lin, st.SparsityConfig(method="ste", transposable=True))
    a = lin.weight.detach().abs()
    # brute force over all 0/1 4x4 patterns with two per row and column, per tile
    import itertools

    pats = [p for p in itertools.product([0, 1], repeat=16)
            if all(sum(p[4 * i:4 * i + 4]) == 2 for i in range(4)) and all(sum(p[j::4]) == 2 for j in range(4))]
    assert len(pats) == 90
    for r0 in (0, 4):
        for c0 in (0, 4):
            tile = a[r0:r0 + 4, c0:c0 + 4].reshape(-1).tolist()
            best = max(sum(t * p for t, p in zip(tile, pat)) for pat in pats)
            got = (a[r0:r0 + 4, c0:c0 + 4] * layer.mask[r0:r0 + 4, c0:c0 + 4]).sum().item()
            assert got == pytest.approx(best, rel=1e-6)


def _fit(tmp_path, seed, ckpt=None):
    torch.manual_seed(seed)
    model = TinyRegressor(lr=5e-2)
    cfg = st.SparsityConfig(method="sr-ste", targets="all", transposable=True, mask_update_interval=2)
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = quiet_trainer(max_epochs=2, callbacks=[st.SparseTraining(cfg), ckpt_cb], enable_checkpointing=True)
    trainer.fit(model, loader(n_batches=3), ckpt_path=ckpt)
    return model


def test_transposable_resume_is_exact(tmp_path):
    full = _fit(tmp_path / "a", seed=0)
    resumed = _fit(tmp_path / "b", seed=5, ckpt=str(tmp_path / "a" / "epoch=0-step=3.ckpt"))
    for (n, a), (_, b) in zip(st.sparse_layers(full), st.sparse_layers(resumed)):
        assert torch.equal(a.weight, b.weight), n
        assert torch.equal(a.mask, b.mask), n
        assert tiles_ok(b.effective_weight()) and tiles_ok(b.effective_weight().t())


def test_transposable_config_errors_and_skips():
    with pytest.raises(ValueError, match="S-STE's soft threshold has no transposable form"):
        st.SparsityConfig(method="s-ste", transposable=True)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 8), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"0 \(out_features=6; transposable"):
        names = st.sparsify(model, st.SparsityConfig(method="ste", targets="all", transposable=True))
    assert names == ["2"]
