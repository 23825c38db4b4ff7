"""One-shot 2:4 pruning quality: the paper's Table 1 at a scale this machine can run.

A small dense GPT-2 (byte-level, trained here for ``--train-seconds`` on the Python standard
library's source unless ``--model DIR`` is given) is pruned 2:4 with magnitude, Wanda, SparseGPT
and prox, each with and without masked refinement. For each we report held-out perplexity, the mean
relative local reconstruction error ``||X (W - W^)^T|| / ||X W^T||`` over the pruned layers, and
wall time; the dense perplexity is the reference. Results go to
``benchmarks/results/prune_quality.json`` and a markdown table is printed.

The text stream is split by position: training uses the first 90% of the tokens, calibration
sequences come from the start of the training part, and validation sequences from the last 10%.

Example:
    python benchmarks/prune_quality.py                       # ~10 minutes on 2 CPU cores
    python benchmarks/prune_quality.py --train-seconds 30 --methods wanda prox --eval-seqs 16
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from sparsetrain.data import ByteTokenizer, stdlib_files
from sparsetrain.data.sources import iter_file_documents
from sparsetrain.pruning import prune
from sparsetrain.pruning.cli import perplexity

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
    # A time budget rather than a step count: the machine is shared and its speed varies. The
    # learning rate decays linearly with elapsed time so that training ends annealed.
    while (elapsed := time.perf_counter() - t0) < args.train_seconds:
        frac = elapsed / args.train_seconds
        for grp in opt.param_groups:
            grp["lr"] = args.lr * min(1.0, (step + 1) / 50) * (1 - frac) + 1e-5
        starts = torch.randint(0, len(train_ids) - args.seq_len, (args.train_batch,), generator=g)
        x = torch.stack([train_ids[s:s + args.seq_len] for s in starts])  # (B, T)
        loss = model(x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"  step {step}: loss {loss.item():.3f} ({elapsed:.0f} s)", flush=True)
    model.eval()
    return model, step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a save_pretrained directory with a byte-level (257-token) causal LM")
    p.add_argument("--train-seconds", type=float, default=240)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-bytes", type=int, default=3_000_000)
    p.add_argument("--calib-seqs", type=int, default=64)
    p.add_argument("--eval-seqs", type=int, default=64)
    p.add_argument("--refine-steps", type=int, default=1000)
    p.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "prox"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default because on a shared 2-core machine two OpenMP threads "
                        "spin against other jobs (a 256x64 @ 64x64 matmul took 7 ms with 2 threads, 14 us with 1)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    ids = _tokens(args.max_bytes)
    split = int(len(ids) * 0.9)
    train_ids, val_ids = ids[:split], ids[split:]
    t = args.seq_len
    val = val_ids[: (len(val_ids) // t) * t].reshape(-1, t)[: args.eval_seqs]  # (N, T)
    calib = train_ids[: args.calib_seqs * t].reshape(args.calib_seqs, t)  # (N, T)
    calib_batches = [calib[i:i + 8] for i in range(0, len(calib), 8)]

    if args.model:
        from transformers import AutoModelForCausalLM

        dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        steps = None
    else:
        print(f"training a {args.n_layer}-layer, {args.n_embd}-wide GPT-2 for {args.train_seconds:.0f} s", flush=True)
        dense, steps = _train(args, train_ids)
    dense_ppl = perplexity(dense, val, 16)
    print(f"dense perplexity {dense_ppl:.3f}", flush=True)

    rows = []
    for base in args.methods:
        for refine in (False, True):
            if base == "prox":
                method, steps_ = "prox", (args.refine_steps if refine else 0)
            else:
                method, steps_ = (base + "+refine" if refine else base), args.refine_steps
            name = method if base != "prox" else ("prox+refine" if refine else "prox (no refine)")
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            report = prune(model, calib_batches, method=method, refine_steps=steps_)
            wall = time.perf_counter() - t0
            ppl = perplexity(model, val, 16)
            row = {"method": name, "perplexity": ppl, "mean_rel_error": report.mean_rel_error, "seconds": wall,
                   "layers": len(report.layers), "prox_hit_cap_layers": report.prox_hit_cap,
                   "prox_iters_mean": (sum(l.prox_iters for l in report.layers) / len(report.layers)
                                       if base == "prox" else None)}
            rows.append(row)
            print(f"  {name:<18} ppl {ppl:8.3f}  rel.err {report.mean_rel_error:.4f}  {wall:6.1f} s", flush=True)

    result = {
        "setup": {**{k: v for k, v in vars(args).items() if k != "out"}, "train_steps": steps,
                  "corpus": "Python stdlib source, byte-level", "torch": torch.__version__,
                  "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "dense_perplexity": dense_ppl,
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print()
    print("| method | val. perplexity | mean rel. error | wall time (s) |")
    print("|---|---:|---:|---:|")
    print(f"| dense | {dense_ppl:.3f} | 0 | - |")
    for r in rows:
        print(f"| {r['method']} | {r['perplexity']:.3f} | {r['mean_rel_error']:.4f} | {r['seconds']:.1f} |")
    return result


if __name__ == "__main__":
    main()
