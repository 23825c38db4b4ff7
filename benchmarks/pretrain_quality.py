"""Pre-training quality: dense vs STE vs SR-STE vs S-STE vs S-STE+MVUE on the tiny recipe.

Every method trains the same model on the same data, for the same steps, from the same seeds; only
``sparsity.method`` (and ``sparsity.mvue``) differ. Writes ``benchmarks/results/pretrain_quality.json``
(final validation loss per run, mean and spread over seeds, gap to dense, mean flip rate) and
``benchmarks/results/pretrain_quality.png`` (validation loss against step, mean over seeds).

Slow (about 23 minutes on 2 idle CPU cores with the defaults); not part of the test suite::

    python benchmarks/pretrain_quality.py                  # 5 methods x 3 seeds x 1200 steps
    python benchmarks/pretrain_quality.py --steps 800 --seeds 1 2 3

The papers expect dense < S-STE < SR-STE < STE in loss. At this scale the gaps are small; the table
reports what was measured, with the spread over seeds, so a reader can tell signal from noise.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny-s-ste.yaml"
RESULTS = REPO / "benchmarks" / "results"

# name -> CLI overrides; all share the recipe's model, data and optimizer.
METHODS = {
    "dense": ["--sparsity.method", "dense"],
    "ste": ["--sparsity.method", "ste"],
    "sr-ste": ["--sparsity.method", "sr-ste"],
    "s-ste": ["--sparsity.method", "s-ste"],
    "s-ste+mvue": ["--sparsity.method", "s-ste", "--sparsity.mvue", "exact"],
}


def _read_metrics(root: Path) -> list[dict]:
    rows = []
    for f in sorted(root.glob("logs/version_*/metrics.csv")):
        with f.open() as fh:
            rows += list(csv.DictReader(fh))
    return rows


def run_one(method: str, seed: int, steps: int, val_every: int, workdir: Path, cache_dir: str) -> dict:
    """Train one (method, seed) with the CLI and return its validation curve and flip rates."""
    from sparsetrain.cli import main

    root = workdir / f"{method}-seed{seed}"
    args = [
        "fit", "--config", str(RECIPE),
        "--seed_everything", str(seed),
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(val_every),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(workdir),
        "--run_name", root.name,  # the run's directory is `root`
        "--trainer.callbacks.init_args.every_n_train_steps", str(steps),
        "--model.warmup_steps", str(max(1, steps // 10)),
        "--data.cache_dir", cache_dir,
        "--sparsity.seed", str(seed),
        *METHODS[method],
    ]
    t0 = time.perf_counter()
    main(args)
    wall = time.perf_counter() - t0
    rows = _read_metrics(root)
    val = sorted((int(r["step"]) + 1, float(r["val/loss"])) for r in rows if r.get("val/loss"))
    flips = [float(r["sparsity/flip_rate"]) for r in rows if r.get("sparsity/flip_rate")]
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    return {
        "method": method,
        "seed": seed,
        "final_val_loss": val[-1][1],
        "val_curve": val,
        "final_train_loss": train[-1] if train else None,
        # Mean over the logged steps of the second half: the settled rate, not the early churn.
        "flip_rate": statistics.fmean(flips[len(flips) // 2:]) if flips else 0.0,
        "wall_s": wall,
    }


def summarise(runs: list[dict]) -> dict:
    """Mean and spread over seeds per method, and the gap to dense."""
    table = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        finals = [r["final_val_loss"] for r in mine]
        table[method] = {
            "final_val_loss_mean": statistics.fmean(finals),
            "final_val_loss_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "flip_rate_mean": statistics.fmean(r["flip_rate"] for r in mine),
            "seeds": [r["seed"] for r in mine],
        }
    if "dense" in table:
        for row in table.values():
            row["gap_to_dense"] = row["final_val_loss_mean"] - table["dense"]["final_val_loss_mean"]
    return table


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        steps = [s for s, _ in mine[0]["val_curve"]]
        mean = [statistics.fmean(r["val_curve"][i][1] for r in mine) for i in range(len(steps))]
        ax.plot(steps, mean, marker="o", label=f"{method} (n={len(mine)})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token, mean over seeds)")
    ax.set_title("tiny recipe: 4-layer GPT-2, 2:4 on the FFN, stdlib corpus (bytes)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1200)  # 400 left every gap inside the seed noise
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--cache-dir", default=None, help="corpus cache (default: sparsetrain's)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from sparsetrain.data.corpus import default_cache_dir

    cache = str(default_cache_dir(args.cache_dir))
    runs = []
    with tempfile.TemporaryDirectory(prefix="pretrain_quality_") as tmp:
        for seed in args.seeds:
            for method in args.methods:
                r = run_one(method, seed, args.steps, args.val_every, Path(tmp), cache)
                runs.append(r)
                print(f"{method:>11s} seed {seed}: val loss {r['final_val_loss']:.4f}  "
                      f"flip rate {r['flip_rate']:.2e}  ({r['wall_s']:.0f} s)", flush=True)
    table = summarise(runs)
    result = {
        "recipe": str(RECIPE.relative_to(REPO)),
        "steps": args.steps,
        "val_every": args.val_every,
        "seeds": args.seeds,
        "table": table,
        "runs": runs,
        "python": sys.version.split()[0],
    }
    (out / "pretrain_quality.json").write_text(json.dumps(result, indent=1))
    plot(runs, out / "pretrain_quality.png")
    print("\n| method | final val loss | gap to dense | flip rate |\n|---|---|---|---|")
    for method, row in table.items():
        print(f"| {method} | {row['final_val_loss_mean']:.4f} ± {row['final_val_loss_std']:.4f} | "
              f"{row.get('gap_to_dense', float('nan')):+.4f} | {row['flip_rate_mean']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
