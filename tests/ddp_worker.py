"""Run by tests/test_callback.py: DDP on 2 CPU processes (gloo); each rank saves its effective weights."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from lightning_helpers import TinyRegressor, loader, quiet_trainer  # noqa: E402

import sparsetrain as st  # noqa: E402

if __name__ == "__main__":
    out = sys.argv[1]
    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.manual_seed(100 + rank)  # different inits per rank: DDP must make them equal
    model = TinyRegressor()
    cb = st.SparseTraining(method="s-ste", targets="all", mvue="exact", seed=0)
    trainer = quiet_trainer(max_steps=4, strategy="ddp", devices=2, callbacks=[cb])
    trainer.fit(model, loader(n_batches=8))
    eff = {n: (layer.effective_weight(), layer.beta.clone(), layer.mask.clone()) for n, layer in st.sparse_layers(model)}
    torch.save(eff, os.path.join(out, f"rank{trainer.global_rank}.pt"))
