"""A tiny LightningModule and data used by the callback tests and the DDP worker script."""

import lightning as L
import torch
import torch.nn as nn


class TinyRegressor(L.LightningModule):
    def __init__(self, lr: float = 1e-2, opt: str = "adamw"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 8))
        self.lr, self.opt = lr, opt

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self.net(x) - y).square().mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.opt == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def loader(n_batches=3, batch=8, seed=123):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch, 16, generator=g)
    y = torch.randn(n_batches * batch, 8, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def quiet_trainer(**kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("enable_progress_bar", False)
    kw.setdefault("enable_model_summary", False)
    kw.setdefault("accelerator", "cpu")
    kw.setdefault("devices", 1)
    return L.Trainer(**kw)
