"""Run by tests/test_activation_training.py: sparse activations under DDP, 2 gloo ranks on CPU.

    python tests/act_ddp_worker.py OUT_DIR        # each rank writes OUT_DIR/rank{r}.pt

A squared-ReLU GPT-2 with STE 2:4 weights and 2:4 inputs on its down-projections trains for
`dist_worker.STEPS` steps on `dist_worker`'s global batches, each rank on its half, with SGD (see
`test_activation_training.sgd` for why not Adam); the test compares with one process on the full
batches.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_worker as W  # noqa: E402

LR = 0.05


def build_model(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=W.SEQ, vocab_size=W.VOCAB, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="relu2")
    return GPT2LMHeadModel(cfg)


def config():
    import sparsetrain as st

    return st.SparsityConfig(method="ste", targets="mlp", activation_sparsity="2:4", seed=0, backend="dense")


def run(rank: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sparsetrain as st

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=W.WORLD)
    try:
        model = build_model(seed=rank)  # different inits per rank: DDP broadcasts rank 0's
        sparsity = st.Sparsifier(model, config())
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        res = W.train(ddp, sparsity, opt, W.batches())
        res["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(run, args=(sys.argv[1],), nprocs=W.WORLD)
