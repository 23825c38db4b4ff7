"""The torch-only core, checked where only the base install is (``pip install sparsetrain``).

A plain PyTorch loop with `Sparsifier` trains a tiny model for a few steps: the loss stays finite
and falls, the engine counts every optimizer step, and the exported weights hold exactly N:M
nonzeros (counted group by group here, not by the package); then `prune` (SparseGPT) makes a dense
copy N:M. Before that, it checks that none of
the extras' packages is installed, so the run proves the core does not need them.

    python .ci/core_check.py                 # in a venv holding the base install only (CI)
    python .ci/core_check.py --block-extras  # anywhere: the extras' packages are made unimportable
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys

# Every package an extra brings (pyproject.toml); the base install must hold none of them.
EXTRA_PACKAGES = ("lightning", "pytorch_lightning", "transformers", "accelerate", "datasets", "tokenizers",
                  "jsonargparse", "torchmetrics", "matplotlib", "scipy", "tqdm", "yaml")
STEPS = 12


def block_extras() -> None:
    """Make the extras' packages unimportable, as on a base install: a None entry in sys.modules
    makes `import x` raise ModuleNotFoundError and `importlib.util.find_spec(x)` return None."""
    for name in EXTRA_PACKAGES:
        sys.modules[name] = None


def check_absent() -> None:
    present = [p for p in EXTRA_PACKAGES if importlib.util.find_spec(p) is not None]
    if present:
        raise SystemExit(f"core check: the base install pulled packages of the extras: {', '.join(present)}")
    for name in ("lightning", "transformers"):
        try:
            __import__(name)
        except ImportError:
            continue
        raise SystemExit(f"core check: `import {name}` worked in the base install")


def train() -> None:
    import torch
    from torch import nn

    import sparsetrain as st

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, d=16, ff=64):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
            self.head = nn.Linear(d, 1)

        def forward(self, x):
            return self.head(x + self.mlp(x)).squeeze(-1)

    model = Block()
    x = torch.randn(256, 16)
    y = torch.sin(x[:, :4].sum(-1))  # a target the model can fit a little in a few steps
    cfg = st.SparsityConfig(method="s-ste", n=2, m=4, targets="mlp", mvue="exact")
    sparsity = st.Sparsifier(model, cfg)
    names = [name for name, _ in sparsity.layers]
    assert names == ["mlp.0", "mlp.2"], f"expected the two MLP linears to be swapped, got {names}"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sparsity.attach(opt, max_steps=STEPS)
    losses = []
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), f"non-finite loss: {losses}"
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, f"the loss did not fall in {STEPS} steps: {first:.4f} -> {last:.4f}"
    assert sparsity.step == STEPS, f"the engine counted {sparsity.step} optimizer steps, expected {STEPS}"

    dense = st.export(model)
    for name in names:
        lin = dense.get_submodule(name)
        assert type(lin) is nn.Linear, f"{name}: exported as {type(lin).__name__}, expected nn.Linear"
        w = lin.weight.detach()
        out_f, in_f = w.shape
        for r in range(out_f):  # every group of 4 consecutive inputs keeps exactly 2 weights
            for g in range(0, in_f, 4):
                kept = sum(1 for v in w[r, g:g + 4].tolist() if v != 0.0)
                assert kept == 2, f"{name} row {r} inputs {g}..{g + 3}: {kept} nonzeros, expected 2"
    # one-shot pruning is core too: SparseGPT on a fresh dense copy, calibrated on the training inputs
    dense_model = Block()
    st.prune(dense_model, [x[:64], x[64:128]], method="sparsegpt", refine_steps=5, targets="mlp")
    for name in names:
        w = dense_model.get_submodule(name).weight.detach()
        worst = max(sum(1 for v in w[r, g:g + 4].tolist() if v != 0.0) for r in range(w.shape[0])
                    for g in range(0, w.shape[1], 4))
        assert worst <= 2, f"pruned {name}: a group of 4 keeps {worst} weights, expected at most 2"
    heavy = sorted(p for p in EXTRA_PACKAGES if sys.modules.get(p) is not None)
    assert not heavy, f"the core loop imported packages of the extras: {heavy}"
    print(f"core check: {STEPS} steps of S-STE 2:4 in a plain loop, loss {first:.4f} -> {last:.4f}, "
          f"{len(names)} layers exported exactly 2:4, SparseGPT pruned them 2:4, none of {len(EXTRA_PACKAGES)} "
          f"extra packages imported")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block-extras", action="store_true",
                   help="make the extras' packages unimportable instead of checking they are not installed")
    args = p.parse_args(argv)
    if args.block_extras:
        block_extras()
    check_absent()
    train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
