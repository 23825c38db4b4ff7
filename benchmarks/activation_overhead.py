"""CPU cost of 2:4 activations' reference path (issue 21): a squared-ReLU FFN step against dense.

One step = forward and backward of ``Linear(d, ff) -> relu^2 -> Linear(ff, d)`` on ``T`` tokens in
float32, for dense (plain nn.Linear), 2:4 weights (S-STE), 2:4 activations on the second layer's
input (``ops.activation``: the mask, the select and the custom op's closed-form backward) and both.
The variants are timed side by side in interleaved rounds, each round in a fresh random order, and
the ratio to dense is the median of the per-round ratios (as `step_overhead.py` does), so the load of
a shared machine hits all of them alike. On CPU nothing is faster for being sparse: this measures
what the masking costs on the dense backend, not a speedup (that is `gpu_suite.py`'s activations
section). Writes ``benchmarks/results/activation_overhead.json``.

    python benchmarks/activation_overhead.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stamp import stamp  # noqa: E402

import sparsetrain as st  # noqa: E402

VARIANTS = {
    "weights24": {"method": "s-ste"},
    "act24": {"method": "dense", "activation_sparsity": "2:4"},
    "both": {"method": "s-ste", "activation_sparsity": "2:4"},
}


class Relu2(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x).square()


def build(variant: str, d: int, ff: int) -> torch.nn.Module:
    torch.manual_seed(0)
    ffn = torch.nn.Sequential(torch.nn.Linear(d, ff), Relu2(), torch.nn.Linear(ff, d))
    if variant != "dense":
        st.sparsify(ffn, st.SparsityConfig(targets=r"^(0|2)$", activation_targets=r"^2$", seed=0, **VARIANTS[variant]))
    return ffn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--ff", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "activation_overhead.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    blocks = {v: build(v, args.d, args.ff) for v in ("dense", *VARIANTS)}
    torch.manual_seed(1)
    x = torch.randn(args.tokens, args.d, requires_grad=True)
    gy = torch.randn(args.tokens, args.d)

    def step(block):
        x.grad = None
        block.zero_grad(set_to_none=True)
        block(x).backward(gy)

    for block in blocks.values():  # warm-up: allocator, thread pools
        step(block)
    times = {v: [] for v in blocks}
    order = random.Random(0)
    for _ in range(args.repeats):
        for v in order.sample(list(blocks), len(blocks)):
            t0 = time.perf_counter()
            step(blocks[v])
            times[v].append(time.perf_counter() - t0)
    rows = {}
    for v, ts in times.items():
        ratios = [a / b for a, b in zip(ts, times["dense"])]
        rows[v] = {"median_ms": 1e3 * statistics.median(ts), "ratio_to_dense": statistics.median(ratios),
                   "ratio_q25_q75": [statistics.quantiles(ratios, n=4)[0], statistics.quantiles(ratios, n=4)[2]]}
        print(f"{v:>10s}: {rows[v]['median_ms']:8.1f} ms  x{rows[v]['ratio_to_dense']:.3f} dense", flush=True)
    result = {"what": "squared-ReLU FFN forward+backward on CPU (dense backend), float32",
              "d": args.d, "ff": args.ff, "tokens": args.tokens, "repeats": args.repeats, "threads": args.threads,
              "rows": rows, "stamp": stamp()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
