"""The GPU benchmark suite: ``gpu`` tests, then layer, kernel and end-to-end timings, as JSON.

Usage::

    python benchmarks/gpu_suite.py [--quick] [--skip-tests] [--out benchmarks/results]

Writes ``benchmarks/results/gpu_suite_<device>.json``. Without a CUDA device it says so and exits 0.
Targets (H100, bf16): FFN forward+backward >= 1.3x dense at d=4096/16384 and 16384 tokens; kernels
>= 70% of memory bandwidth; GPT-2 training step >= 1.1x dense.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# (name, d_model, d_ff): the FFN shapes of the issue.
FFN_SHAPES = [("gpt2-124m", 768, 3072), ("gpt2-774m", 1280, 5120), ("gpt2-1.5b", 1600, 6400), ("llama-7b", 4096, 11008)]
TOKENS = [4096, 16384]
METHODS = {  # name -> SparsityConfig fields
    "ste": dict(method="ste"),
    "s-ste": dict(method="s-ste"),
    "s-ste+mvue": dict(method="s-ste", mvue="exact"),
    "transposable": dict(method="sr-ste", transposable=True),
}
# Peak HBM bandwidth in GB/s by device-name fragment (vendor data sheets), for the kernel ratios.
PEAK_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
             "A100": 1555, "L40S": 864, "4090": 1008}


def _bench(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event-timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def run_gpu_tests() -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    tail = res.stdout.strip().splitlines()[-1:] or [""]
    return {"returncode": res.returncode, "summary": tail[0], "output_tail": res.stdout[-4000:]}


def bench_layers(tokens, shapes, dtype=torch.bfloat16) -> list:
    import torch.nn as nn

    from sparsetrain import SparseLinear, SparsityConfig

    try:
        from torchao.sparsity.training import SemiSparseLinear
    except ImportError:
        SemiSparseLinear = None
    rows = []
    for name, d, ff in shapes:
        for t in tokens:
            x = torch.randn(t, d, device="cuda", dtype=dtype, requires_grad=True)

            def fwd_bwd(layer):
                def step():
                    y = layer(x)
                    y.backward(torch.ones_like(y))
                return step

            dense = nn.Linear(d, ff, device="cuda", dtype=dtype)
            base = _bench(fwd_bwd(dense))
            row = {"shape": name, "d": d, "ff": ff, "tokens": t, "dense_ms": base}
            for mname, fields in METHODS.items():
                try:
                    layer = SparseLinear(d, ff, True, config=SparsityConfig(backend="auto", **fields)).to("cuda", dtype)
                    ms = _bench(fwd_bwd(layer))
                    row[f"{mname}_ms"], row[f"{mname}_speedup"] = ms, base / ms
                except Exception as err:  # record and continue: one method must not sink the suite
                    row[f"{mname}_error"] = repr(err)[:300]
            if SemiSparseLinear is not None:
                try:
                    lin = nn.Linear(d, ff, device="cuda", dtype=dtype)
                    ao = SemiSparseLinear.from_dense(lin)
                    ms = _bench(fwd_bwd(ao))
                    row["torchao_ms"], row["torchao_speedup"] = ms, base / ms
                except Exception as err:
                    row["torchao_error"] = repr(err)[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_kernels(sizes, dtype=torch.bfloat16) -> list:
    from sparsetrain import kernels

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_GBPS.items() if k in name), None)
    rows = []
    for rows_, cols in sizes:
        w = torch.randn(rows_, cols, device="cuda", dtype=dtype)
        es = w.element_size()
        beta = torch.tensor(1.1, device="cuda")
        gen = torch.Generator(device="cuda").manual_seed(0)
        cases = {
            # bytes moved: read w, write w_eff, write 1-byte mask
            "project_ste": (lambda: kernels.project_weight(w, 2, 4, "ste"), w.numel() * (2 * es + 1)),
            "project_sste": (lambda: kernels.project_weight(w, 2, 4, "s-ste", beta), w.numel() * (2 * es + 1)),
            "mvue_exact_dim0": (lambda: kernels.mvue24(w, 0, "exact", gen), w.numel() * 2 * es),
            "mvue_approx_dim0": (lambda: kernels.mvue24(w, 0, "approx", gen), w.numel() * 2 * es),
            "transposable24": (lambda: kernels.transposable24(w), w.numel() * (es + 1)),
        }
        for kname, (fn, nbytes) in cases.items():
            ms = _bench(fn)
            gbps = nbytes / ms / 1e6
            row = {"kernel": kname, "shape": [rows_, cols], "ms": ms, "GBps": gbps,
                   "peak_GBps": peak, "fraction_of_peak": gbps / peak if peak else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_end_to_end(models, steps: int, dtype=torch.bfloat16, tokens_per_batch=(8, 1024)) -> list:
    from transformers import GPT2Config, GPT2LMHeadModel

    import sparsetrain

    sizes = {"gpt2-124m": dict(n_embd=768, n_layer=12, n_head=12), "gpt2-774m": dict(n_embd=1280, n_layer=36, n_head=20)}
    rows = []
    for name in models:
        row = {"model": name, "batch": tokens_per_batch}
        for variant in ("dense", "s-ste+mvue"):
            torch.manual_seed(0)
            model = GPT2LMHeadModel(GPT2Config(**sizes[name])).to("cuda", dtype)
            if variant != "dense":
                sparsetrain.sparsify(model, sparsetrain.SparsityConfig(method="s-ste", mvue="exact"))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            ids = torch.randint(0, 50257, tokens_per_batch, device="cuda")

            def step(model=model, opt=opt):  # bound now: both are deleted after timing
                loss = model(ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                row[f"{variant}_ms"] = _bench(step, warmup=3, reps=steps)
            except Exception as err:
                row[f"{variant}_error"] = repr(err)[:300]
            del model, opt
            torch.cuda.empty_cache()
        if "dense_ms" in row and "s-ste+mvue_ms" in row:
            row["speedup"] = row["dense_ms"] / row["s-ste+mvue_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes and few steps (a smoke run)")
    p.add_argument("--skip-tests", action="store_true", help="do not run `pytest -m gpu` first")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device on this machine; nothing to benchmark (exiting cleanly).")
        return 0
    device = torch.cuda.get_device_name()
    result = {"device": device, "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "cusparselt": torch.backends.cusparselt.is_available(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "quick": args.quick}
    if not args.skip_tests:
        result["gpu_tests"] = run_gpu_tests()
        print("gpu tests:", result["gpu_tests"]["summary"], flush=True)
    shapes = FFN_SHAPES[:1] if args.quick else FFN_SHAPES
    tokens = TOKENS[:1] if args.quick else TOKENS
    for section, fn in (
        ("layers", lambda: bench_layers(tokens, shapes)),
        ("kernels", lambda: bench_kernels([(4096, 4096)] if args.quick else [(4096, 4096), (16384, 16384), (11008, 4096)])),
        ("end_to_end", lambda: bench_end_to_end(["gpt2-124m"] if args.quick else ["gpt2-124m", "gpt2-774m"], 5 if args.quick else 20)),
    ):
        try:
            result[section] = fn()
        except Exception as err:  # e.g. the layer API is missing: keep the other sections
            result[section] = {"error": repr(err)[:500]}
            print(f"{section}: {err!r}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_suite_{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
