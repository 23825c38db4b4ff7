"""SparseTraining with Lightning: metrics against direct computation, masked decay after clipping,
dense fine-tuning, exact checkpoint resume, DDP on 2 CPU processes."""

import os
import subprocess
import sys

import lightning as L
import pytest
import torch

import sparsetrain as st
from lightning_helpers import TinyRegressor, loader, quiet_trainer
from sparsetrain.ops import nm_mask


class Recorder(L.Callback):
    """Records the loss, the logged sparsity metrics and masks recomputed from the weights."""

    def __init__(self):
        self.losses, self.metrics, self.ref = [], [], []
        self.prev = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("sparsity/")})
        layers = [layer for _, layer in st.sparse_layers(pl_module)]
        masks = [nm_mask(layer.weight.detach()) for layer in layers]
        eff = [layer.effective_weight() for layer in layers]
        total = sum(m.numel() for m in masks)
        flips = None if self.prev is None else sum(int((a != b).sum()) for a, b in zip(masks, self.prev)) / total
        self.ref.append({
            "flip_rate": flips,
            "zero_fraction": sum(int((e == 0).sum()) for e in eff) / total,
            "beta_mean": sum(float(layer.beta) for layer in layers) / len(layers),
        })
        self.prev = masks


def test_metrics_match_direct_computation():
    torch.manual_seed(0)
    model, rec = TinyRegressor(lr=5e-2), Recorder()
    cb = st.SparseTraining(method="s-ste", targets="all")
    quiet_trainer(max_steps=6, log_every_n_steps=1, callbacks=[cb, rec]).fit(model, loader(n_batches=6))
    assert cb.swapped == ["net.0", "net.2", "net.4"]
    for logged, ref in zip(rec.metrics[1:], rec.ref[1:]):
        assert logged["sparsity/flip_rate"] == pytest.approx(ref["flip_rate"], abs=1e-7)
        assert logged["sparsity/zero_fraction"] == pytest.approx(ref["zero_fraction"], abs=1e-7)
        assert logged["sparsity/beta_mean"] == pytest.approx(ref["beta_mean"], rel=1e-6)
    assert any(r["flip_rate"] > 0 for r in rec.ref[1:])  # lr is large enough for masks to move
    assert all(r["zero_fraction"] >= 0.5 for r in rec.ref)


def test_beta_taken_at_fit_start_then_frozen():
    torch.manual_seed(1)
    model = TinyRegressor()
    # Before fit, the weights change (e.g. a custom init): beta must come from the weights at fit start.
    cb = st.SparseTraining(method="s-ste", targets="all")

    class Rescale(L.Callback):
        def setup(self, trainer, pl_module, stage):
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.mul_(2.0)

    betas = {}

    class Grab(L.Callback):
        def on_train_start(self, trainer, pl_module):
            for n, layer in st.sparse_layers(pl_module):
                betas[n] = float(layer.beta)
                w = layer.weight.detach()
                s = st.ops.soft_threshold(w)
                assert float(layer.beta) == pytest.approx(float((w * s).sum() / (s * s).sum()), rel=1e-5)

    quiet_trainer(max_steps=3, callbacks=[cb, Rescale(), Grab()]).fit(model, loader())
    for n, layer in st.sparse_layers(model):
        assert float(layer.beta) == betas[n]


def test_masked_decay_applied_after_clipping():
    torch.manual_seed(2)
    model = TinyRegressor(lr=1.0, opt="sgd")
    alpha = 1e-2
    cb = st.SparseTraining(method="ste", targets="all", masked_decay=alpha)
    w0 = {}

    class Snap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            for n, layer in st.sparse_layers(pl_module):
                w0[n] = layer.weight.detach().clone()

    # Clipping to 1e-9 makes the loss gradient negligible: what moves the weights is the decay,
    # which would have been clipped away too had it been added before clipping.
    quiet_trainer(max_steps=1, gradient_clip_val=1e-9, callbacks=[cb, Snap()]).fit(model, loader())
    for n, layer in st.sparse_layers(model):
        pruned = ~nm_mask(w0[n])
        expect = w0[n] - alpha * pruned * w0[n]
        assert torch.allclose(layer.weight.detach(), expect, atol=1e-8)


def test_dense_finetune_switch():
    torch.manual_seed(3)
    model, rec = TinyRegressor(), Recorder()
    cb = st.SparseTraining(method="sr-ste", targets="all", dense_finetune_from=0.5)
    quiet_trainer(max_steps=6, log_every_n_steps=1, callbacks=[cb, rec]).fit(model, loader(n_batches=6))
    assert cb.dense_phase
    # recorded after each step: the switch after step 3 writes W~ into W (still 2:4), the dense steps fill it
    assert [r["zero_fraction"] >= 0.5 for r in rec.ref] == [True, True, True, False, False, False]
    for _, layer in st.sparse_layers(model):
        assert torch.equal(layer.effective_weight(), layer.weight.detach())


def _fit(tmp_path, seed, ckpt=None, max_epochs=2):
    torch.manual_seed(seed)
    model, rec = TinyRegressor(), Recorder()
    cb = st.SparseTraining(method="s-ste", targets="all", mvue="exact", seed=7)
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[cb, rec, ckpt_cb], enable_checkpointing=True)
    trainer.fit(model, loader(n_batches=3), ckpt_path=ckpt)
    return model, rec


def test_resume_is_exact(tmp_path):
    full, rec_full = _fit(tmp_path / "a", seed=0)
    ckpt = tmp_path / "a" / "epoch=0-step=3.ckpt"
    assert ckpt.exists()
    resumed, rec_res = _fit(tmp_path / "b", seed=99, ckpt=str(ckpt))  # different init: all must come from ckpt
    assert rec_res.losses == rec_full.losses[3:]
    a, b = dict(st.sparse_layers(full)), dict(st.sparse_layers(resumed))
    for n in a:
        assert torch.equal(a[n].weight, b[n].weight)
        assert torch.equal(a[n].beta, b[n].beta)
        assert torch.equal(a[n].mask, b[n].mask)
    # the next step's loss agrees too
    x, y = next(iter(loader()))
    with torch.no_grad():
        assert torch.equal(full.net(x), resumed.net(x))


def test_resume_with_other_config_errors(tmp_path):
    _fit(tmp_path / "a", seed=0, max_epochs=1)
    model = TinyRegressor()
    cb = st.SparseTraining(method="ste", targets="all")
    with pytest.raises(ValueError, match=r"trained with sparsity\.method='s-ste', this run has sparsity\.method='ste'"):
        quiet_trainer(max_epochs=2, callbacks=[cb]).fit(model, loader(), ckpt_path=str(tmp_path / "a" / "epoch=0-step=3.ckpt"))


def test_callback_argument_errors():
    with pytest.raises(TypeError, match="`config` must be a SparsityConfig"):
        st.SparseTraining("s-ste")
    with pytest.raises(ValueError, match="Unknown `method`"):
        st.SparseTraining(method="magic")
    cb = st.SparseTraining(st.SparsityConfig(method="ste"), mvue="approx")
    assert cb.config.method == "ste" and cb.config.mvue == "approx"


def test_ddp_two_cpu_processes(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == r1.keys() and len(r0) == 3
    for n in r0:
        for t0, t1 in zip(r0[n], r1[n]):
            assert torch.equal(t0, t1)
