"""What a user waits for `sparsetrain prune --method prox` in a fresh process (issue 20, item 16).

The prox's element-wise steps are compiled by inductor once per process: seconds when inductor's
disk cache holds the kernels, much longer when it does not (a first run on a machine). `prune`
runs small models eagerly, where that is faster than compiling first (`prox.compile_plan`; the
results are bitwise the same). This script times one prune of the same model in fresh processes,
side by side:

- ``sparsegpt+refine``: the reference (compiles nothing);
- ``prox, default, cold cache``: what `prune` does on a first run on a machine;
- ``prox, compile first, cold cache``: compile, then prune (what `prune` did before);
- ``prox, compile first, warm cache``: the same on a later run;
- ``prox, eager``: ``SPARSETRAIN_COMPILE=0``.

Each cold case gets its own empty ``TORCHINDUCTOR_CACHE_DIR``. The model is a randomly initialised
GPT-2 (``--layers`` x ``--width``, byte vocabulary) calibrated on random tokens: the time depends on
the layer shapes and the prox's iteration counts, not on what the weights learnt.

    python benchmarks/prune_first_use.py                           # 2x128: 0.4M weights
    python benchmarks/prune_first_use.py --layers 1 --width 384    # 1.8M weights
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stamp import stamp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "prune_first_use.json"

CASES = {  # name -> (method, how, cache)
    "sparsegpt+refine": ("sparsegpt+refine", "default", "cold"),
    "prox, default, cold cache": ("prox", "default", "cold"),
    "prox, compile first, cold cache": ("prox", "compile-first", "cold"),
    "prox, compile first, warm cache": ("prox", "compile-first", "warm"),
    "prox, eager": ("prox", "eager", "cold"),
}


def _child(args) -> None:
    """One prune in this (fresh) process; prints a JSON line."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import sparsetrain as st
    import sparsetrain.pruning.prox as px

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=4, n_positions=128,
                                       vocab_size=256, bos_token_id=0, eos_token_id=0))
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 256, (8, 128), generator=g) for _ in range(4)]
    t0 = time.perf_counter()
    if args.how == "compile-first":
        px.warm_up()
    report = st.prune(model, calib, method=args.method, refine_steps=args.refine_steps, progress=False)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "layer_seconds": [l.seconds for l in report.layers],
                      "prunable_weights": sum(l.shape[0] * l.shape[1] for l in report.layers),
                      "eager_max_weights": px.EAGER_MAX_WEIGHTS,
                      "rel_errors": [l.rel_error for l in report.layers]}))


def _run(case: str, args, warm_cache: str) -> dict:
    method, how, cache = CASES[case]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if how == "eager":
        env["SPARSETRAIN_COMPILE"] = "0"
    with tempfile.TemporaryDirectory(prefix="inductor_cold_") as cold:
        env["TORCHINDUCTOR_CACHE_DIR"] = warm_cache if cache == "warm" else cold
        cmd = [sys.executable, __file__, "--child", "--method", method, "--how", how, "--layers", str(args.layers),
               "--width", str(args.width), "--threads", str(args.threads), "--refine-steps", str(args.refine_steps)]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        process_s = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"{case} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_seconds"] = process_s  # with Python, torch and transformers start-up
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--refine-steps", type=int, default=200)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="prox", help=argparse.SUPPRESS)
    p.add_argument("--how", default="default", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    started = stamp()
    cases = {}
    with tempfile.TemporaryDirectory(prefix="inductor_warm_") as warm:
        # Fill the warm cache first with a compile in a process of its own, untimed.
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=warm, OMP_NUM_THREADS=str(args.threads))
        subprocess.run([sys.executable, "-c", "import sparsetrain.pruning.prox as px; px.warm_up()"], env=env,
                       check=True, capture_output=True)
        for case in CASES:
            cases[case] = _run(case, args, warm)
            print(f"{case:<40} {cases[case]['seconds']:7.1f} s (process {cases[case]['process_seconds']:.1f} s)",
                  flush=True)
    ref = cases["sparsegpt+refine"]["seconds"]
    eager_err = cases["prox, eager"]["rel_errors"]
    for case, res in cases.items():
        res["time_ratio_to_sparsegpt_refine"] = res["seconds"] / ref
        if CASES[case][0] == "prox":
            res["same_rel_errors_as_eager"] = res["rel_errors"] == eager_err
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    models = old.get("models", {})  # other model sizes run before are kept, each with its stamp
    models[f"{args.layers}x{args.width}"] = {
        "stamp": started, "setup": {k: v for k, v in vars(args).items() if k not in ("out", "child", "method", "how")},
        "prunable_weights": cases["prox, eager"]["prunable_weights"], "cases": cases}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "prune_first_use", "models": models}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
