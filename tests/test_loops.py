"""One engine, three training loops: a plain PyTorch loop, Lightning and the `transformers` Trainer
train the same tiny GPT-2 on the same batches to the same weights, and each resumes exactly.

The plain loop is the reference: it is the README's five lines, with clipping written out.
"""

import os

import lightning as L
import pytest
import torch

import sparsetrain as st

VOCAB, T, B, STEPS, LR, CLIP = 64, 16, 4, 6, 3e-3, 1.0

CONFIGS = {
    "ste": st.SparsityConfig(method="ste", seed=0),
    "sr-ste": st.SparsityConfig(method="sr-ste", srste_decay=0.05, seed=0),
    "s-ste+mvue": st.SparsityConfig(method="s-ste", mvue="exact", seed=0),
    "t-sr-ste+df": st.SparsityConfig(method="sr-ste", transposable=True, mask_update_interval=2,
                                     masked_decay=0.01, dense_finetune_from=4, seed=0),
}


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=T,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(cfg)


def token_batches():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (STEPS * B, T), generator=g)


def adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0)


def plain_loop(cfg, steps=STEPS):
    model = gpt2()
    sparsity = st.Sparsifier(model, cfg)
    opt = adamw(model.parameters())
    sparsity.attach(opt, max_steps=STEPS)
    ids = token_batches()
    for i in range(steps):
        batch = ids[i * B:(i + 1) * B]
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
    return model


class GPT2Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = gpt2()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return adamw(self.parameters())


def lightning_loop(cfg, tmp_path, ckpt_path=None, max_steps=STEPS, rows=STEPS * B):
    module = GPT2Module()
    loader = torch.utils.data.DataLoader(token_batches()[:rows], batch_size=B, shuffle=False)
    trainer = L.Trainer(max_steps=max_steps, gradient_clip_val=CLIP, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[st.SparseTraining(cfg),
                                   L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3,
                                                                       save_top_k=-1)])
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module.model


def hf_loop(cfg, tmp_path, resume=None, max_steps=STEPS):
    from transformers import Trainer, TrainingArguments

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    model = gpt2()
    sparsity = st.Sparsifier(model, cfg)
    ids = token_batches()
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=B, learning_rate=LR,
        weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=CLIP, optim="adamw_torch",
        save_strategy="steps", save_steps=3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True,
    )
    trainer = SequentialTrainer(model=model, args=args, train_dataset=data,
                                callbacks=[st.SparseTrainerCallback(sparsity)])
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, sparsity


def _check_same(a, b, atol):
    la, lb = dict(st.sparse_layers(a)), dict(st.sparse_layers(b))
    assert la.keys() == lb.keys() and len(la) == 4
    for name in la:
        assert torch.allclose(la[name].weight, lb[name].weight, atol=atol, rtol=0), name
        assert torch.equal(la[name].effective_weight() != 0, lb[name].effective_weight() != 0), name
        if la[name].config.method == "s-ste":
            assert torch.equal(la[name].beta, lb[name].beta), name
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa, pb, atol=atol, rtol=0), na


# Float32, AdamW and 6 steps: the loops differ only in summation order (e.g. the Trainer's loss is
# a sum divided by the token count), so parameters agree to ~1e-6; 2e-5 is 1% of one lr step.
ATOL = 2e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plain_lightning_and_trainer_agree(name, tmp_path):
    cfg = CONFIGS[name]
    ref = plain_loop(cfg)
    _check_same(ref, lightning_loop(cfg, tmp_path / "pl"), ATOL)
    hf_model, _, sparsity = hf_loop(cfg, tmp_path / "hf")
    _check_same(ref, hf_model, ATOL)
    assert sparsity.step == STEPS
    if cfg.dense_finetune_from is not None:
        assert sparsity.phase == "dense"
        for _, layer in st.sparse_layers(hf_model):
            assert torch.equal(layer.effective_weight(), layer.weight.detach())
    else:
        for _, layer in st.sparse_layers(hf_model):
            groups = (layer.effective_weight() != 0).reshape(layer.out_features, -1, 4).sum(-1)
            assert int(groups.max()) <= 2


@pytest.mark.parametrize("name", ["s-ste+mvue", "t-sr-ste+df"])
def test_trainer_resume_is_exact(name, tmp_path):
    cfg = CONFIGS[name]
    full, _, _ = hf_loop(cfg, tmp_path / "full")
    hf_loop(cfg, tmp_path / "part", max_steps=3)  # writes checkpoint-3 (and stops there)
    assert os.path.exists(tmp_path / "part" / "checkpoint-3" / "sparsity.pt")
    resumed, _, sparsity = hf_loop(cfg, tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-3"))
    assert sparsity.step == STEPS
    _check_same(full, resumed, 0.0)


@pytest.mark.parametrize("name", ["sr-ste", "t-sr-ste+df"])
def test_lightning_resume_is_exact(name, tmp_path):
    cfg = CONFIGS[name]
    # 3 batches an epoch: the step-3 checkpoint sits at an epoch boundary, where a plain DataLoader resumes exactly.
    full = lightning_loop(cfg, tmp_path / "full", rows=3 * B)
    resumed = lightning_loop(cfg, tmp_path / "r", ckpt_path=str(tmp_path / "full" / "epoch=0-step=3.ckpt"), rows=3 * B)
    _check_same(full, resumed, 0.0)
