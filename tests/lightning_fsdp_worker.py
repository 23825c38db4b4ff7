"""Run by tests/test_lightning_fsdp.py: Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes.

Trains 4 steps with a checkpoint at step 2, then resumes a second Trainer from that checkpoint to
step 4, and saves the gathered effective weights, betas and metrics of both runs on every rank.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import lightning as L  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

import sparsetrain as st  # noqa: E402
from lightning_helpers import TinyRegressor, loader  # noqa: E402


class ShardedRegressor(TinyRegressor):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear) or isinstance(layer, st.SparseLinear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def fit(out, ckpt_path=None, save=False):
    torch.manual_seed(0)
    model = ShardedRegressor()
    cb = st.SparseTraining(method="s-ste", targets="all", mvue="exact", seed=0)
    callbacks = [cb]
    if save:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=out, every_n_train_steps=2, save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=save, callbacks=callbacks,
                        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    # 32 rows: DistributedSampler gives each rank 16, i.e. 2 batches of 8 an epoch, so the step-2
    # checkpoint sits at an epoch boundary, where a plain DataLoader resumes exactly.
    trainer.fit(model, loader(n_batches=4, batch=8), ckpt_path=ckpt_path)
    eff = {n: (layer.effective_weight(), layer.beta.clone()) for n, layer in st.sparse_layers(model)}
    return trainer, eff, dict(cb.engine.metrics), cb.engine.sharded


if __name__ == "__main__":
    out = sys.argv[1]
    trainer, full, metrics, sharded = fit(out, save=True)
    rank = trainer.global_rank
    ckpt = os.path.join(out, "epoch=0-step=2.ckpt")
    _, resumed, _, _ = fit(out, ckpt_path=ckpt)
    torch.save({"full": full, "resumed": resumed, "metrics": metrics, "sharded": sharded},
               os.path.join(out, f"rank{rank}.pt"))
    # Tear the process group down before the interpreter exits: left to interpreter shutdown, gloo's
    # threads were once destroyed while still joinable ("terminate called without an active
    # exception", exit -6) on a loaded machine, after the results above had been written.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
