"""Memory each sparse method adds to training on CPU, against dense: the state kept between steps
and the peak of one training step.

The model and step are `step_overhead.py`'s (GPT-2-sized blocks, d=768, 4d FFN, T=1024 tokens,
FFN layers sparse, AdamW, the engine attached).

- **State** (exact, by counting): bytes of parameters + buffers + AdamW state + the engine's own
  tensors (`Sparsifier._prev_masks`, the packed masks kept for the flip rate), after a step. The
  overhead is reported per *target weight* (weights of the sparse layers); the target is at most
  1/8 byte (one bit) per target weight.
- **Peak step memory**: each variant runs in its own process with glibc told to return large
  blocks to the OS (``MALLOC_MMAP_THRESHOLD_``), so resident memory follows live tensors. After a
  warm-up step, the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``) and one step
  runs: its peak is ``VmHWM`` minus the resident size before the step. (`tracemalloc` does not
  see torch's allocations; `ru_maxrss` cannot be reset.)
- **Step time**: all variants timed interleaved in one process (`step_overhead.time_interleaved`),
  reported as the median over rounds of the per-round ratio to dense; target <= 1.15x for
  S-STE+MVUE.

    python benchmarks/memory_overhead.py          # writes benchmarks/results/memory_overhead.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _stamp import stamp  # noqa: E402
from step_overhead import VARIANTS, build, paired_ratio, step, time_interleaved  # noqa: E402

METHODS = ["dense", "ste", "sr-ste", "s-ste", "s-ste+mvue", "t-sr-ste"]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def state_bytes(model, opt, sparsity) -> dict:
    """Bytes held between steps, by owner."""
    out = {
        "parameters": _nbytes(model.parameters()),
        "buffers": _nbytes(model.buffers()),
        "optimizer": _nbytes(t for s in opt.state.values() for t in s.values()),
        "engine": _nbytes(sparsity._prev_masks.values()) if sparsity is not None else 0,
    }
    out["total"] = sum(out.values())
    return out


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_step_bytes(model, opt, x):
    """Peak resident memory of one (warm) training step above the resident size before it, or
    None where the peak counter cannot be reset."""
    gc.collect()
    before = _proc_status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    step(model, opt, x)
    return (_proc_status_kb("VmHWM") - before) * 1024


def child(variant: str, args) -> dict:
    """One variant in this process: its state and its peak step memory."""
    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.d)
    model, opt, sparsity = build(variant, args.d, args.layers)
    step(model, opt, x)  # the first step allocates AdamW's state
    targets = sum(layer.weight.numel() for _, layer in sparsity.layers) if sparsity is not None else None
    return {"state": state_bytes(model, opt, sparsity), "target_weights": targets,
            "peak_step_bytes": peak_step_bytes(model, opt, x)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--variants", nargs="*", default=METHODS[1:], choices=list(VARIANTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "memory_overhead.json"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    started = stamp()

    names = ["dense"] + args.variants
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    forward = ["--d", str(args.d), "--layers", str(args.layers), "--tokens", str(args.tokens)]
    mem = {}
    for v in names:
        proc = subprocess.run([sys.executable, __file__, "--child", v, *forward], env=env, capture_output=True,
                              text=True, check=True)
        mem[v] = json.loads(proc.stdout.strip().splitlines()[-1])
    targets = mem[args.variants[0]]["target_weights"]
    dense_state, dense_peak = mem["dense"]["state"], mem["dense"]["peak_step_bytes"]
    added = {v: {k: (mem[v]["state"][k] - dense_state[k]) / targets for k in dense_state} for v in args.variants}
    peak_ratio = {v: (mem[v]["peak_step_bytes"] / dense_peak if dense_peak else None) for v in args.variants}

    x = torch.randn(1, args.tokens, args.d)
    runs = {v: build(v, args.d, args.layers) for v in names}
    times = time_interleaved(runs, x, args.repeats)
    ratio = {v: paired_ratio(times, v) for v in args.variants}
    result = {
        "benchmark": "memory_overhead",
        "stamp": started,
        "load_average_at_end": list(os.getloadavg()),  # other jobs on the machine during the run
        "setup": {"d": args.d, "ffn": 4 * args.d, "layers": args.layers, "tokens": args.tokens,
                  "repeats": args.repeats, "targets": "mlp", "backend": "dense", "optimizer": "AdamW",
                  "target_weights": targets},
        "state_bytes": {v: mem[v]["state"] for v in names},
        "state_bytes_added_per_target_weight": added,
        "peak_step_bytes": {v: mem[v]["peak_step_bytes"] for v in names},
        "peak_step_ratio_to_dense": peak_ratio,
        "peak_step_method": "per-variant process, MALLOC_MMAP_THRESHOLD_=65536, VmHWM reset via "
                            "/proc/self/clear_refs after a warm-up step, minus VmRSS before the step",
        "median_step_s": {v: statistics.median(ts) for v, ts in times.items()},
        "step_ratio_to_dense": ratio,
        "ratio_definition": "median over rounds of (variant step time / dense step time in the same round)",
        "target": {"state_bytes_added_per_target_weight": 0.125, "step_ratio_s-ste+mvue": 1.15},
    }
    print(f"{'variant':<14}{'state +B/weight':>16}{'engine B/weight':>16}{'peak step MB':>14}{'x dense time':>14}")
    for v in names:
        a = added.get(v, {"total": 0.0, "engine": 0.0})
        peak = mem[v]["peak_step_bytes"]
        print(f"{v:<14}{a['total']:>16.4f}{a['engine']:>16.4f}{(peak or 0) / 2**20:>14.1f}"
              f"{ratio.get(v, 1.0):>14.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
