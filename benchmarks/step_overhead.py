"""Training-step overhead of each sparse method on CPU (dense backend) against plain nn.Linear.

One step = forward, backward and AdamW on a stack of GPT-2-small-sized blocks (d=768, 4d FFN,
T=1024 tokens), FFN layers sparsified as in the papers, with the engine (`Sparsifier`) attached
to the optimizer, so its per-step work (decay, metrics, mask snapshots) is part of the step.
Methods and the dense baseline are timed interleaved in one run, so a ratio compares like with
like on a busy machine. `benchmarks/memory_overhead.py` reuses `build`, `step` and
`time_interleaved`.

    python benchmarks/step_overhead.py            # writes benchmarks/results/step_overhead.json
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
from transformers import GPT2Config, GPT2Model

import sparsetrain as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stamp import stamp  # noqa: E402

VARIANTS = {
    "ste": dict(method="ste"),
    "sr-ste": dict(method="sr-ste"),
    "s-ste": dict(method="s-ste"),
    "s-ste+mvue": dict(method="s-ste", mvue="exact"),
    "s-ste+mvue-approx": dict(method="s-ste", mvue="approx"),
    "t-sr-ste": dict(method="sr-ste", transposable=True),
    # The engine's metrics (a projection of every layer and a mask comparison) every step instead
    # of every `--metrics-every` steps: what the overhead of metrics alone costs.
    "s-ste+mvue@metrics-every-step": dict(method="s-ste", mvue="exact"),
}


def build(variant, d, layers, seed=0, metrics_every=50):
    """``(model, optimizer, sparsifier)`` for one variant (no sparsifier for ``"dense"``); the
    engine is attached to the optimizer."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=d, n_layer=layers, n_head=12, n_positions=1024, vocab_size=256,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2Model(cfg)
    sparsity = None
    if variant != "dense":
        every = 1 if variant.endswith("@metrics-every-step") else metrics_every
        sparsity = st.Sparsifier(model, st.SparsityConfig(targets="mlp", seed=seed, **VARIANTS[variant]),
                                 metrics_every=every)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if sparsity is not None:
        sparsity.attach(opt)
    return model, opt, sparsity


def step(model, opt, x):
    out = model(inputs_embeds=x).last_hidden_state
    out.square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_interleaved(runs, x, repeats, seed=0):
    """Step times per variant (``runs``: name -> ``(model, optimizer, ...)``): one warm-up step
    each, then ``repeats`` rounds running every variant once, in a fresh random order per round,
    so drifts in machine load and any position effect hit all variants alike."""
    names = list(runs)
    for v in names:  # warm-up: allocator, AdamW state, thread pools
        step(*runs[v][:2], x)
    times = {v: [] for v in names}
    order = random.Random(seed)
    for _ in range(repeats):
        for v in order.sample(names, len(names)):
            t0 = time.perf_counter()
            step(*runs[v][:2], x)
            times[v].append(time.perf_counter() - t0)
    return times


def paired_ratio(times, variant, baseline="dense"):
    """Median over rounds of (variant time / baseline time in the same round): robust to slow
    drifts of the machine's speed."""
    return statistics.median(a / b for a, b in zip(times[variant], times[baseline]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--metrics-every", type=int, default=50,
                    help="the engine's metrics interval (Lightning's default logging interval is 50)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_overhead.json"))
    args = ap.parse_args()
    started = stamp()

    x = torch.randn(1, args.tokens, args.d)
    names = ["dense"] + args.variants
    runs = {v: build(v, args.d, args.layers, metrics_every=args.metrics_every) for v in names}
    times = time_interleaved(runs, x, args.repeats)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    paired = {v: paired_ratio(times, v) for v in args.variants}
    result = {
        "benchmark": "step_overhead",
        "stamp": started,
        "load_average_at_end": list(os.getloadavg()),  # other jobs on the machine during the run
        "setup": {"d": args.d, "ffn": 4 * args.d, "layers": args.layers, "tokens": args.tokens,
                  "repeats": args.repeats, "targets": "mlp", "backend": "dense", "engine": "Sparsifier attached",
                  "metrics_every": args.metrics_every},
        "median_step_s": med,
        "ratio_to_dense": paired,
        "ratio_of_medians": {v: med[v] / med["dense"] for v in args.variants},
        "ratio_definition": "median over rounds of (variant step time / dense step time in the same round)",
        "target": {"s-ste+mvue": 1.15},
    }
    print(f"{'variant':<20}{'median step (s)':>16}{'x dense':>10}")
    for v in names:
        print(f"{v:<20}{med[v]:>16.4f}{(paired[v] if v != 'dense' else 1.0):>10.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
