"""Benchmark the transposable N:M mask solvers: wall time and gap to the optimum.

For random Gaussian weights ``W`` (score ``|W|``) of each size and each N:M, every solver of
`sparsetrain.ops.transposable_mask` is timed and its kept ``|W|`` mass compared with that of the
exact LP optimum (``method="optimal"``). Where the optimum of the whole matrix would take too long
(above ``--optimal-max``), it is solved on a random sample of tiles; the gaps are then measured on
those tiles only and the optimum's time is extrapolated, and the JSON says so.

Writes ``benchmarks/results/transposable_masks.json`` and prints a table.

Usage:
    python benchmarks/transposable_masks.py                      # 512, 1024, 4096
    python benchmarks/transposable_masks.py --quick              # 512 only, a smoke run
    python benchmarks/transposable_masks.py --sizes 1024 --nm 8:16,16:32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import scipy
import torch

from sparsetrain.ops import transposable_error, transposable_mask
from sparsetrain.ops import transposable as _transposable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stamp import stamp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "transposable_masks.json"
TARGET_GAP = 0.02  # TSENOR within 2% of the optimum at 8:16 and 16:32 (issue 5)
TARGET_SPEEDUP = 20.0  # TSENOR at least 20x faster than `optimal` at 1024x1024 on CPU
TARGET_GPU_S = 0.12  # 8192x8192 8:16 on a GPU (the paper's H100 figure)


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _gather_tiles(x: torch.Tensor, m: int, picks) -> torch.Tensor:
    """The tiles at ``picks`` (tile row, tile col) side by side: ``[m, len(picks) * m]``."""
    return torch.cat([x[r * m : (r + 1) * m, c * m : (c + 1) * m] for r, c in picks], dim=1)


def _methods_for(n: int, m: int, chosen):
    return [x for x in chosen if x != "optimal" and (x != "exact24" or (n, m) == (2, 4))]


def bench_one(size: int, n: int, m: int, methods, optimal_max: int, sample_tiles: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(size, size, generator=g).abs()
    rows = []
    masks = {}
    for method in _methods_for(n, m, methods):
        masks[method], secs = _timed(lambda: transposable_mask(score, n, m, method=method), score.device)
        rows.append({"size": size, "nm": f"{n}:{m}", "method": method, "time_s": secs})

    tiles_per_side = size // m
    if "optimal" not in methods:
        return rows
    if size <= optimal_max:
        opt, secs = _timed(lambda: transposable_mask(score, n, m, method="optimal"), score.device)
        rows.append({"size": size, "nm": f"{n}:{m}", "method": "optimal", "time_s": secs, "gap": 0.0})
        for r in rows[:-1]:
            r["gap"] = transposable_error(score, masks[r["method"]], opt)
            r["gap_basis"] = "whole matrix"
    else:
        k = min(sample_tiles, tiles_per_side**2)
        flat = torch.randperm(tiles_per_side**2, generator=g)[:k].tolist()
        picks = [(t // tiles_per_side, t % tiles_per_side) for t in flat]
        sub = _gather_tiles(score, m, picks)  # (m, k*m)
        opt, secs = _timed(lambda: transposable_mask(sub, n, m, method="optimal"), score.device)
        est = secs * tiles_per_side**2 / k
        rows.append({
            "size": size, "nm": f"{n}:{m}", "method": "optimal", "time_s": est, "gap": 0.0,
            "time_basis": f"ESTIMATED: {secs:.3f} s on {k} random tiles x {tiles_per_side**2 // k} "
                          "(the whole matrix was not solved)",
        })
        for r in rows[:-1]:
            r["gap"] = transposable_error(sub, _gather_tiles(masks[r["method"]], m, picks), opt)
            r["gap_basis"] = f"{k} random tiles (optimum solved on those only)"
    t_opt = rows[-1]["time_s"]
    for r in rows[:-1]:
        r["speedup_vs_optimal"] = t_opt / r["time_s"]
    return rows


def bench_gpu():
    if not torch.cuda.is_available():
        return {"skipped": True, "reason": "no CUDA device on this machine (CPU-only run)"}
    dev = torch.device("cuda")
    score = torch.randn(8192, 8192, device=dev).abs()
    transposable_mask(score[:1024, :1024], 8, 16, method="tsenor")  # warm-up: allocator, kernels
    times = []
    for _ in range(3):
        _, secs = _timed(lambda: transposable_mask(score, 8, 16, method="tsenor"), dev)
        times.append(secs)
    best = min(times)
    return {"skipped": False, "device": torch.cuda.get_device_name(), "size": 8192, "nm": "8:16",
            "method": "tsenor", "time_s": best, "all_times_s": times, "target_s": TARGET_GPU_S,
            "meets_target": best <= TARGET_GPU_S}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="512,1024,4096", help="comma-separated square sizes")
    ap.add_argument("--nm", default="2:4,4:8,8:16,16:32", help="comma-separated N:M patterns")
    ap.add_argument("--methods", default="exact24,tsenor,greedy,optimal")
    ap.add_argument("--quick", action="store_true", help="512x512 only: a smoke run of a few seconds")
    ap.add_argument("--optimal-max", type=int, default=1024,
                    help="largest size whose optimum is solved whole; above it a tile sample is used")
    ap.add_argument("--sample-tiles", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: HiGHS is single-threaded too, and the CPU is shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    started = stamp()

    torch.set_num_threads(args.threads)
    sizes = [512] if args.quick else [int(s) for s in args.sizes.split(",")]
    nms = [tuple(int(v) for v in p.split(":")) for p in args.nm.split(",")]
    methods = args.methods.split(",")

    rows = []
    for size in sizes:
        for n, m in nms:
            rows.extend(bench_one(size, n, m, methods, args.optimal_max, args.sample_tiles, args.seed))
            for r in rows[-len(_methods_for(n, m, methods)) - ("optimal" in methods):]:
                gap = f"{100 * r['gap']:.3f}%" if "gap" in r else "-"
                sp = f"{r['speedup_vs_optimal']:.1f}x" if "speedup_vs_optimal" in r else "-"
                est = " (est.)" if "time_basis" in r else ""
                print(f"{size:>6} {r['nm']:>6} {r['method']:>8} {r['time_s']:>9.3f}s{est:<7} gap {gap:>8}  "
                      f"vs optimal {sp:>7}", flush=True)

    checks = []
    for r in rows:
        if r["method"] == "tsenor" and r["nm"] in ("8:16", "16:32") and "gap" in r:
            checks.append({"check": f"tsenor gap <= 2% at {r['size']} {r['nm']}", "value": r["gap"],
                           "pass": r["gap"] <= TARGET_GAP})
        if r["method"] == "tsenor" and r["size"] == 1024 and "speedup_vs_optimal" in r:
            checks.append({"check": f"tsenor >= 20x faster than optimal at 1024 {r['nm']}",
                           "value": r["speedup_vs_optimal"], "pass": r["speedup_vs_optimal"] >= TARGET_SPEEDUP})
    gpu = {"skipped": True, "reason": "--no-gpu"} if args.no_gpu else bench_gpu()

    result = {
        "benchmark": "transposable N:M masks",
        "stamp": started,
        "scipy": scipy.__version__,
        "settings": {
            "score": "|W|, W ~ N(0, 1), torch.Generator seed %d" % args.seed,
            "tsenor_defaults": {"tau": _transposable._TSENOR_TAU, "iters": _transposable._TSENOR_ITERS},
            "optimal": "block-diagonal LP, SciPy HiGHS dual simplex (single-threaded), "
                       f"{_transposable._LP_VARS_PER_CHUNK} variables per LP",
            "optimal_max": args.optimal_max, "sample_tiles": args.sample_tiles,
            "timing": "one run each, wall clock, float32 scores",
        },
        "notes": [
            "Wall times move with the other jobs on the machine (stamp.machine.load_average; up to 2x "
            "between runs was seen on a shared 2-core machine); ratios between methods are more stable.",
            "gap = (kept |W| of optimum - kept |W| of method) / kept |W| of optimum.",
            "Rows with time_basis 'ESTIMATED' did not solve the whole matrix: the optimum was solved on a "
            "random sample of tiles, its time scaled by the tile count, and gaps measured on those tiles.",
        ],
        "targets": {"tsenor_gap_8_16_and_16_32": TARGET_GAP, "tsenor_speedup_vs_optimal_1024": TARGET_SPEEDUP,
                    "gpu_8192_8_16_s": TARGET_GPU_S},
        "checks": checks,
        "gpu_8192_8_16": gpu,
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("checks:")
    for c in checks:
        print(f"  {'PASS' if c['pass'] else 'FAIL'} {c['check']}: {c['value']:.4g}")
    print("gpu 8192x8192 8:16:", gpu)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
