"""One-shot 2:4 pruning quality: the paper's Table 1 at a scale this machine can run.

Two small dense GPT-2 models (byte-level, trained here on the Python standard library's source:
"small" is 4 layers x 128 wide, "large" 4 layers x 256 wide, 4x the parameters per layer; each
trained for ``--train-steps`` steps of 16 x 128 tokens) are
pruned 2:4 with magnitude, Wanda, SparseGPT and prox, each with and without masked refinement
(conjugate gradients; prox also with the paper's 1000 steps of masked gradient descent), on 3
calibration seeds. For each we report held-out perplexity (mean ± std over the seeds), its excess
over dense relative to SparseGPT+refine's, the mean relative local reconstruction error
``||X (W - W^)^T|| / ||X W^T||`` and wall time with its ratio to SparseGPT+refine's, measured in
the same run; for prox also that ratio with the one-off compile warm-up added (what a first run in
a fresh process waits). Results go to ``benchmarks/results/prune_quality.json``; a markdown table is printed.

The text stream is split by position: training uses the first 90% of the tokens, calibration
sequences come from the start of the training part, and validation sequences from the last 10%.

Example:
    python benchmarks/prune_quality.py --model-cache /tmp/prune_models     # ~1 hour on 2 CPU cores
    python benchmarks/prune_quality.py --models small --calib-seeds 0 --variants sparsegpt+refine prox+refine
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from sparsetrain.data import ByteTokenizer, stdlib_files
from sparsetrain.data.sources import iter_file_documents
from sparsetrain.pruning import prune
from sparsetrain.pruning.cli import perplexity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stamp import stamp  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "prune_quality.json"


def _tokens(max_bytes: int) -> torch.Tensor:
    tok = ByteTokenizer()
    ids = []
    for doc in iter_file_documents(stdlib_files(), max_bytes=max_bytes):
        ids.extend(tok.encode(doc))
        ids.append(tok.eot_id)
    return torch.tensor(ids, dtype=torch.long)


def _train(args, train_ids: torch.Tensor):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    cfg = GPT2Config(vocab_size=ByteTokenizer.vocab_size, n_embd=args.n_embd, n_layer=args.n_layer,
                     n_head=args.n_head, n_positions=args.seq_len, bos_token_id=256, eos_token_id=256,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    t0, step = time.perf_counter(), 0
    model.train()
    # A fixed number of steps (an earlier version trained for a time budget, which on a busy
    # machine left the models at 67-116 steps: too little for pruning to matter). The learning rate
    # warms up over 50 steps and decays linearly to the end, so training ends annealed.
    while step < args.train_steps:
        for grp in opt.param_groups:
            grp["lr"] = args.lr * min(1.0, (step + 1) / 50) * (1 - step / args.train_steps) + 1e-5
        starts = torch.randint(0, len(train_ids) - args.seq_len, (args.train_batch,), generator=g)
        x = torch.stack([train_ids[s:s + args.seq_len] for s in starts])  # (B, T)
        loss = model(x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return model, step


# Two model sizes: "large" has 4x the parameters per layer (2x the width) of "small", so the
# pruners' time can be read against layer width.
MODELS = {"small": {"n_embd": 128, "n_layer": 4, "n_head": 4}, "large": {"n_embd": 256, "n_layer": 4, "n_head": 4}}

# The paper's prox schedule: plain proximal gradient, lambda growing by 1.01 per step throughout.
PAPER = {"beta": 1.01, "prox_accelerate": False, "prox_idle_beta": None}

# name -> (prune() method, refine_steps or None for --refine-steps, refine_solver, other prune() kwargs)
VARIANTS = {
    "magnitude": ("magnitude", 0, "cg", {}),
    "magnitude+refine": ("magnitude+refine", None, "cg", {}),
    "wanda": ("wanda", 0, "cg", {}),
    "wanda+refine": ("wanda+refine", None, "cg", {}),
    "sparsegpt": ("sparsegpt", 0, "cg", {}),
    "sparsegpt+refine": ("sparsegpt+refine", None, "cg", {}),
    # prune()'s default: FISTA steps, lambda x1.025 per step (x1.2 while no group is being decided)
    "prox+refine": ("prox", None, "cg", {}),
    "prox (no refine)": ("prox", 0, "cg", {}),
    # The paper's schedule, with conjugate gradients and with its 1000 steps of masked gradient descent.
    "prox+refine (paper schedule)": ("prox", None, "cg", PAPER),
    "prox+refine (gd, paper)": ("prox", 1000, "gd", PAPER),
    # The plain schedule with faster lambda growth: ~1/2 and ~1/4 of the paper's iterations.
    "prox+refine (beta 1.02)": ("prox", None, "cg", {**PAPER, "beta": 1.02}),
    "prox+refine (beta 1.05)": ("prox", None, "cg", {**PAPER, "beta": 1.05}),
    "prox (no refine, beta 1.05)": ("prox", 0, "cg", {**PAPER, "beta": 1.05}),
    # FISTA momentum alone (no faster idle phases)
    "prox+refine (fista, beta 1.03)": ("prox", None, "cg", {"beta": 1.03, "prox_idle_beta": None}),
    "prox+refine (fista, beta 1.05)": ("prox", None, "cg", {"beta": 1.05, "prox_idle_beta": None}),
    # the default with lambda growing more slowly in the decisive phase
    "prox+refine (beta 1.02, idle 1.2)": ("prox", None, "cg", {"beta": 1.02}),
}


def _dense_model(args, name: str, train_ids: torch.Tensor):
    """The dense model `name`: loaded from --model-cache when trained before, else trained now."""
    from transformers import AutoModelForCausalLM

    cache = Path(args.model_cache) / name if args.model_cache else None
    if cache is not None and (cache / "config.json").exists():
        meta = json.loads((cache / "train.json").read_text())
        if meta.get("train_steps") != args.train_steps:
            raise SystemExit(f"{cache} holds a model trained {meta.get('train_steps')} steps, not --train-steps "
                             f"{args.train_steps}: pass another --model-cache or the matching --train-steps")
        return AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval(), meta
    margs = argparse.Namespace(**{**vars(args), **MODELS[name]})
    print(f"training {name}: {margs.n_layer} layers, {margs.n_embd} wide, {margs.train_steps} steps", flush=True)
    t_train = time.perf_counter()
    model, steps = _train(margs, train_ids)
    meta = {"train_steps": steps, "train_seconds": time.perf_counter() - t_train, **MODELS[name]}
    if cache is not None:
        model.save_pretrained(cache)
        (cache / "train.json").write_text(json.dumps(meta))
    return model, meta


def _warm_up_compiled() -> float:
    """Compile the prox's element-wise steps once before anything is timed (`prox.warm_up`), and
    return how long that took: a one-time cost per process (inductor caches the kernels on disk,
    so a later process pays less), which would otherwise land in the first calibration seed's time
    of the first prox variant only. `prune` itself compiles in the background while the first
    layers run eagerly, so what a user waits lies between the two ratios this records."""
    import sparsetrain.pruning.prox as px

    t0 = time.perf_counter()
    px.warm_up()
    return time.perf_counter() - t0


def _inductor_cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def _stats(xs):
    mean = sum(xs) / len(xs)
    std = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return mean, std


def markdown_tables(models: dict) -> str:
    """The README's tables, one per model, from the JSON's ``models`` entry."""
    out = []
    for mname, mres in models.items():
        dense = mres["dense_perplexity"]
        out.append(f"\n**{mname}** ({mres['config'].get('n_layer')} x {mres['config'].get('n_embd')}), "
                   f"dense perplexity {dense:.3f}:\n")
        out.append("| method | val. perplexity (mean ± std, 3 calibration seeds) | excess over dense | "
                   "excess / SparseGPT+refine's | mean rel. error | wall time (s) | time / SparseGPT+refine | "
                   "prox iterations per layer |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        order = list(VARIANTS)
        for vname in sorted(mres["summary"], key=lambda k: order.index(k) if k in order else len(order)):
            r = mres["summary"][vname]
            ex, tr = r["excess_ratio_to_sparsegpt_refine"], r["time_ratio_to_sparsegpt_refine"]
            its = [x["prox_iters_mean"] for x in mres["runs"].get(vname, []) if x.get("prox_iters_mean")]
            out.append(f"| {vname} | {r['perplexity_mean']:.3f} ± {r['perplexity_std']:.3f} | "
                       f"{r['perplexity_mean'] - dense:+.3f} | {'-' if ex is None else f'{ex:.2f}'} | "
                       f"{r['mean_rel_error']:.4f} | {r['seconds_mean']:.1f} ± {r['seconds_std']:.1f} | "
                       f"{'-' if tr is None else f'{tr:.2f}'} | {round(sum(its) / len(its)) if its else '-'} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--model-cache", default=None,
                   help="directory where trained dense models are saved and reused (train once, prune many times)")
    p.add_argument("--train-steps", type=int, default=1000, help="optimizer steps of the dense models' training")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-bytes", type=int, default=3_000_000)
    p.add_argument("--calib-seqs", type=int, default=64)
    p.add_argument("--eval-seqs", type=int, default=64)
    p.add_argument("--refine-steps", type=int, default=1000)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--calib-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="each seed draws its own calibration sequences from the training split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default because on a shared 2-core machine two OpenMP threads "
                        "spin against other jobs (a 256x64 @ 64x64 matmul took 7 ms with 2 threads, 14 us with 1)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--table", action="store_true", help="print the tables of the JSON at --out and exit (no run)")
    args = p.parse_args(argv)
    if args.table:
        print(markdown_tables(json.loads(Path(args.out).read_text())["models"]))
        return {}
    torch.set_num_threads(args.threads)
    started = stamp()
    warmup_s = _warm_up_compiled()

    ids = _tokens(args.max_bytes)
    split = int(len(ids) * 0.9)
    train_ids, val_ids = ids[:split], ids[split:]
    t = args.seq_len
    val = val_ids[: (len(val_ids) // t) * t].reshape(-1, t)[: args.eval_seqs]  # (N, T)

    models = {}
    for mname in args.models:
        dense, meta = _dense_model(args, mname, train_ids)
        dense_ppl = perplexity(dense, val, 16)
        print(f"[{mname}] dense perplexity {dense_ppl:.3f}", flush=True)
        runs = {v: [] for v in args.variants}
        for cseed in args.calib_seeds:
            g = torch.Generator().manual_seed(1000 + cseed)
            starts = torch.randint(0, len(train_ids) - t, (args.calib_seqs,), generator=g)
            calib = torch.stack([train_ids[s_:s_ + t] for s_ in starts])  # (N, T)
            calib_batches = [calib[i:i + 8] for i in range(0, len(calib), 8)]
            for vname in args.variants:
                method, steps_, solver, extra = VARIANTS[vname]
                steps_ = args.refine_steps if steps_ is None else steps_
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                report = prune(model, calib_batches, method=method, refine_steps=steps_, refine_solver=solver, **extra)
                wall = time.perf_counter() - t0
                ppl = perplexity(model, val, 16)
                runs[vname].append({
                    "calib_seed": cseed, "perplexity": ppl, "mean_rel_error": report.mean_rel_error,
                    "seconds": wall, "prox_iters_mean": (sum(l.prox_iters for l in report.layers) / len(report.layers)
                                                         if method == "prox" else None),
                    "refine_iters_mean": sum(l.refine_iters for l in report.layers) / len(report.layers),
                    "prox_hit_cap_layers": report.prox_hit_cap,
                    # per layer: how the time grows with the layer's shape
                    "layers": [{"shape": list(l.shape), "seconds": l.seconds, "prox_iters": l.prox_iters}
                               for l in report.layers],
                })
                print(f"  [{mname} seed {cseed}] {vname:<24} ppl {ppl:8.3f}  rel.err {report.mean_rel_error:.4f}"
                      f"  {wall:6.1f} s", flush=True)
        summary = {}
        ref_t = _stats([r["seconds"] for r in runs.get("sparsegpt+refine", [])])[0] if "sparsegpt+refine" in runs else None
        ref_ppl = _stats([r["perplexity"] for r in runs["sparsegpt+refine"]])[0] if ref_t else None
        for vname, rs in runs.items():
            pm, ps = _stats([r["perplexity"] for r in rs])
            tm, ts = _stats([r["seconds"] for r in rs])
            summary[vname] = {
                "perplexity_mean": pm, "perplexity_std": ps, "excess_over_dense": pm - dense_ppl,
                "excess_ratio_to_sparsegpt_refine": ((pm - dense_ppl) / (ref_ppl - dense_ppl)
                                                     if ref_ppl and ref_ppl != dense_ppl else None),
                "seconds_mean": tm, "seconds_std": ts,
                "time_ratio_to_sparsegpt_refine": tm / ref_t if ref_t else None,
                # What a user waits on a first run in a fresh process: the prox's one-off compile
                # (this run's warm-up, before any timing) added to one run's time. None for the
                # methods that compile nothing.
                "time_ratio_with_compile_warmup_to_sparsegpt_refine": (
                    (tm + warmup_s) / ref_t if ref_t and VARIANTS[vname][0] == "prox" else None),
                "mean_rel_error": _stats([r["mean_rel_error"] for r in rs])[0],
                # the reference of this entry's time ratio, measured in the same run
                "sparsegpt_refine_seconds_same_run": ref_t,
            }
        models[mname] = {"stamp": started, "config": meta, "dense_perplexity": dense_ppl, "summary": summary, "runs": runs}

    result = {
        "stamp": started,  # this run's; models kept from earlier runs carry their own
        "setup": {**{k: v for k, v in vars(args).items() if k != "out"},
                  "corpus": "Python stdlib source, byte-level", "torch": torch.__version__,
                  "threads": torch.get_num_threads(),
                  "compile_warmup_seconds": warmup_s,  # before any timing; see _warm_up_compiled
                  # whether inductor's disk cache held the kernels already decides the warm-up's size
                  "inductor_cache_dir": _inductor_cache_dir()},
        "models": models,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # models run before (e.g. `--models large` in another session) are kept
        old = json.loads(out.read_text())
        kept = {k: v for k, v in old.get("models", {}).items() if k not in models}
        for mname, mres in models.items():
            # Variants of the same model run before (with other --variants) are kept beside the
            # new ones; each keeps the time ratio measured in its own run.
            prev = old.get("models", {}).get(mname)
            if prev and prev.get("config", {}).get("train_steps") == mres["config"].get("train_steps"):
                mres["summary"] = {**{k: v for k, v in prev["summary"].items() if k not in mres["summary"]},
                                   **mres["summary"]}
                mres["runs"] = {**{k: v for k, v in prev["runs"].items() if k not in mres["runs"]}, **mres["runs"]}
        result["models"] = {**kept, **models}
        result["setup_of_other_models"] = old.get("setup_of_other_models", {}) | {k: old.get("setup") for k in kept}
        if "renamed_variants" in old:  # how older entries' names map to today's variants
            result["renamed_variants"] = old["renamed_variants"]
    out.write_text(json.dumps(result, indent=1))
    print(markdown_tables({k: result["models"][k] for k in models}))
    return result


if __name__ == "__main__":
    main()
