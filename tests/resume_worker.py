"""Run by tests/test_engine_reliability.py in fresh processes: a plain loop with `Sparsifier`
(S-STE, exact MVUE, no config seed) whose process-wide torch seed is set to something else
before the engine is built, as a script that seeds nothing (or seeds differently) would.

    python tests/resume_worker.py GLOBAL_SEED START STOP IN_CKPT|- OUT_CKPT
"""

import sys

import torch
import torch.nn as nn

import sparsetrain as st


def main(global_seed: int, start: int, stop: int, ckpt_in: str, ckpt_out: str) -> None:
    torch.manual_seed(0)  # the same initial weights in every process
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    torch.manual_seed(global_seed)  # what differs between the processes
    sparsity = st.Sparsifier(model, st.SparsityConfig(method="s-ste", mvue="exact", targets="all"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if ckpt_in != "-":
        ckpt = torch.load(ckpt_in, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sparsity.load_state_dict(ckpt["sparsity"])
    sparsity.attach(opt)
    for step in range(start, stop):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1000 + step))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsity": sparsity.state_dict()}, ckpt_out)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), int(a[2]), a[3], a[4])
