"""Pre-training quality: dense vs STE vs SR-STE vs S-STE vs S-STE+MVUE on the tiny recipe.

Every method trains the same model on the same data, for the same steps, from the same seeds; only
``sparsity.method`` (and ``sparsity.mvue``) differ. Writes ``benchmarks/results/pretrain_quality.json``
(final validation loss per run, mean and spread over seeds, gap to dense, mean flip rate) and
``benchmarks/results/pretrain_quality.png`` (validation loss against step, mean over seeds).

Rows are the baselines (dense, a dense model with a half-wide FFN, STE, SR-STE, S-STE, S-STE+MVUE)
and the schedule candidates of issue 12 (dense warm-up, threshold ramp, decay ramp, Adam-moment
resets on mask flips, dense -> prune once -> sparse). Per row the table holds the mean ± std of the
final validation loss, the gap to dense, the fraction of STE's gap closed, the difference to STE
paired by seed with its 95% t-interval, and the final flip rate; the plot shows the gap to dense
over steps. The JSON is rewritten after every row and merges with what is there, so a table can be
completed across sessions.

The published table uses a smaller, longer-trained model than the recipe's (``--set``): at the
recipe's 4 x 128 for 1200 steps the model is far from its capacity and STE sat within the seed
noise of dense (dense 1.9130/1.9118/1.9152, STE 1.9177/1.9046 on seeds 1-2), so there was no gap
to close. 2 layers x 64 wide, 16 x 128 tokens a step for 2000 steps, at lr 3e-3 (every method did
markedly better there than at the recipe's 2e-3: ``pretrain_quality_lr2e-3.json``), gives STE a
~0.05 nat gap to dense with a seed spread of ~0.008::

    python benchmarks/pretrain_quality.py --threads 1 --steps 2000 --val-every 200 \
        --set model.n_embd=64 model.n_layer=2 model.n_head=2 data.batch_size=16 model.lr=3e-3 \
        --rows dense ste s-ste --seeds 1 2 3 4 5 6
    python benchmarks/pretrain_quality.py --table      # the README's table from the JSON
    python benchmarks/pretrain_quality.py --steps 300 --seeds 1 --name pretrain_quality_short \
        --label "screening: 300 steps, 1 seed" --threads 1    # a quick look; not kept in results/

One run of that setup takes ~3 minutes on one idle core (5-10 with other jobs beside it). The
JSON keeps runs of one setup (steps and ``--set``) only: a run with another setup replaces the
file's runs. Jobs of one setup can run side by side (other rows, other seeds): each re-reads the
file before writing it, so none overwrites another's rows.

On a machine shared with other jobs set ``OMP_NUM_THREADS=1`` (or ``--threads 1``): with OpenMP
threads oversubscribed, one 1200-step run took hours instead of minutes.

The papers expect dense < S-STE < SR-STE < STE in loss. At this scale the gaps are small; the table
reports what was measured, with the spread over seeds, so a reader can tell signal from noise.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny-s-ste.yaml"
RESULTS = REPO / "benchmarks" / "results"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stamp import stamp  # noqa: E402

HALF_FFN = "<half of 4 x n_embd>"  # filled in per run from the model's width

# row -> CLI overrides; all share the recipe's model, data and optimizer. The first block is the
# baseline table; the rest are the issue-12 candidates (schedules of the engine, all ending exactly 2:4).
ROWS = {
    "dense": ["--sparsity.method", "dense"],
    # The same number of non-zero FFN weights as 2:4: why not train a smaller dense model?
    "dense-half-ffn": ["--sparsity.method", "dense", "--model.n_inner", HALF_FFN],
    "ste": ["--sparsity.method", "ste"],
    "sr-ste": ["--sparsity.method", "sr-ste"],
    "s-ste": ["--sparsity.method", "s-ste"],
    "s-ste+mvue": ["--sparsity.method", "s-ste", "--sparsity.mvue", "exact"],
    # 1. dense warm-up, then sparse (S-STE's beta taken at the switch)
    "warmup5-s-ste": ["--sparsity.method", "s-ste", "--sparsity.dense_warmup", "0.05"],
    "warmup10-s-ste": ["--sparsity.method", "s-ste", "--sparsity.dense_warmup", "0.1"],
    "warmup25-s-ste": ["--sparsity.method", "s-ste", "--sparsity.dense_warmup", "0.25"],
    "warmup25-ste": ["--sparsity.method", "ste", "--sparsity.dense_warmup", "0.25"],
    # 2. S-STE's threshold ramped 0 -> 1 (continuous from dense to exactly 2:4)
    "ramp25-s-ste": ["--sparsity.method", "s-ste", "--sparsity.threshold_ramp", "0.25"],
    "ramp50-s-ste": ["--sparsity.method", "s-ste", "--sparsity.threshold_ramp", "0.5"],
    # 3. decay schedules
    "sr-ste+decay-ramp": ["--sparsity.method", "sr-ste", "--sparsity.decay_ramp", "0.1"],
    "s-ste+masked-decay": ["--sparsity.method", "s-ste", "--sparsity.masked_decay", "2e-4"],
    # 4. Adam state on mask flips
    "s-ste+flip-reset": ["--sparsity.method", "s-ste", "--sparsity.flip_moments", "reset"],
    "ste+flip-reset": ["--sparsity.method", "ste", "--sparsity.flip_moments", "reset"],
    # 1 + 4: the two best of the lr-3e-3 table's first candidates together
    "warmup10-s-ste+flip-reset": ["--sparsity.method", "s-ste", "--sparsity.dense_warmup", "0.1",
                                  "--sparsity.flip_moments", "reset"],
    # 5. dense, prune once, sparse to the end, in one fit
    "prune50-magnitude-s-ste": ["--sparsity.method", "s-ste", "--sparsity.prune_at", "0.5"],
    "prune50-wanda-s-ste": ["--sparsity.method", "s-ste", "--sparsity.prune_at", "0.5", "--sparsity.prune_method", "wanda"],
    "prune75-wanda-s-ste": ["--sparsity.method", "s-ste", "--sparsity.prune_at", "0.75", "--sparsity.prune_method", "wanda"],
    "prune50-wanda-ste": ["--sparsity.method", "ste", "--sparsity.prune_at", "0.5", "--sparsity.prune_method", "wanda"],
    # 6. learning rate
    "s-ste-lr3e-3": ["--sparsity.method", "s-ste", "--model.lr", "3e-3"],
    # the same lr for dense and STE: is the gain the sparse run's, or the recipe lr's?
    "dense-lr3e-3": ["--sparsity.method", "dense", "--model.lr", "3e-3"],
    "ste-lr3e-3": ["--sparsity.method", "ste", "--model.lr", "3e-3"],
    # a higher peak lr for the sparse run than the table's 3e-3, and dense at it for reference
    "s-ste-lr4e-3": ["--sparsity.method", "s-ste", "--model.lr", "4e-3"],
    "s-ste+flip-reset-lr4e-3": ["--sparsity.method", "s-ste", "--sparsity.flip_moments", "reset", "--model.lr", "4e-3"],
    "dense-lr4e-3": ["--sparsity.method", "dense", "--model.lr", "4e-3"],
    "ste-lr4e-3": ["--sparsity.method", "ste", "--model.lr", "4e-3"],
    "warmup10-s-ste+flip-reset-lr4e-3": ["--sparsity.method", "s-ste", "--sparsity.dense_warmup", "0.1",
                                         "--sparsity.flip_moments", "reset", "--model.lr", "4e-3"],
}


def _read_metrics(root: Path) -> list[dict]:
    rows = []
    for f in sorted(root.glob("logs/version_*/metrics.csv")):
        with f.open() as fh:
            rows += list(csv.DictReader(fh))
    return rows


def _parse_settings(settings: list[str]) -> dict[str, str]:
    """``["model.n_embd=64", ...]`` -> ``{"model.n_embd": "64", ...}``."""
    out = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.lstrip("-"):
            raise SystemExit(f"--set takes KEY=VALUE (e.g. model.n_embd=64), got {item!r}")
        out[key.lstrip("-")] = value
    return out


def _overrides(settings: list[str]) -> list[str]:
    """``--set`` items as CLI overrides: ``["--model.n_embd", "64", ...]``."""
    return [a for key, value in _parse_settings(settings).items() for a in (f"--{key}", value)]


def _resolve_half(args: list[str], settings: list[str]) -> list[str]:
    """``args`` with the half-wide FFN computed from the model's width."""
    width = int(_parse_settings(settings).get("model.n_embd", 128))  # 128: the recipe's n_embd
    return [str(2 * width) if a == HALF_FFN else a for a in args]


def _row_args(method: str, settings: list[str]) -> list[str]:
    """The row's overrides, with the half-wide FFN computed from the model's width."""
    return _resolve_half(ROWS[method], settings)


def run_one(method: str, seed: int, steps: int, val_every: int, workdir: Path, cache_dir: str,
            settings: list[str] = (), row_args: list[str] | None = None) -> dict:
    """Train one (row, seed) with the CLI and return its validation curve and flip rates.

    ``row_args``: the row's overrides when the row is not one of ``ROWS`` (the size study,
    ``pretrain_quality_scale.py``, defines its own rows); ``HALF_FFN`` in it is resolved as here."""
    import torch

    from sparsetrain.cli import main

    row_args = _row_args(method, settings) if row_args is None else _resolve_half(row_args, settings)
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
        # The CLI would choose its own thread count from the load at start: keep this script's.
        "--threads", str(torch.get_num_threads()),
        *_overrides(settings),
        *row_args,
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
        "overrides": row_args,
        "settings": list(settings),
        "steps": steps,
        "seed": seed,
        "final_val_loss": val[-1][1],
        "val_curve": val,
        "final_train_loss": train[-1] if train else None,
        # Mean over the logged steps of the second half: the settled rate, not the early churn.
        "flip_rate": statistics.fmean(flips[len(flips) // 2:]) if flips else 0.0,
        "final_flip_rate": flips[-1] if flips else 0.0,
        "flip_curve": flips,
        "wall_s": wall,
    }


def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def _references(row: str, present) -> tuple[str, str]:
    """The dense and STE rows ``row`` is measured against: a row run at another learning rate
    (``<row>-lr4e-3``) against ``dense-lr4e-3`` and ``ste-lr4e-3`` when both are in ``present``
    (a gain the lr gives dense as well is not the method's), else ``dense`` and ``ste``."""
    suffix = row[row.rfind("-lr"):] if "-lr" in row else ""
    if suffix and "dense" + suffix in present and "ste" + suffix in present:
        return "dense" + suffix, "ste" + suffix
    return "dense", "ste"


def summarise(runs: list[dict]) -> dict:
    """Per row: mean and spread over seeds, gap to dense, fraction of STE's gap closed (of the means
    over the seeds shared with dense and STE, and per seed against the dense and STE runs of the
    same seed, with the smallest of those), and
    the difference to STE paired by seed with its 95% t-interval."""
    by_row: dict = {}
    for r in runs:
        by_row.setdefault(r["method"], {})[r["seed"]] = r
    table = {}
    for row in [*ROWS, *[k for k in by_row if k not in ROWS]]:
        mine = by_row.get(row)
        if not mine:
            continue
        finals = [r["final_val_loss"] for r in mine.values()]
        table[row] = {
            "final_val_loss_mean": statistics.fmean(finals),
            "final_val_loss_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "flip_rate_mean": statistics.fmean(r["flip_rate"] for r in mine.values()),
            "final_flip_rate_mean": statistics.fmean(r.get("final_flip_rate", r["flip_rate"]) for r in mine.values()),
            "seeds": sorted(mine),
        }
    for row, entry in table.items():
        mine = by_row[row]
        ref_dense, ref_ste = _references(row, table)
        entry["compared_with"] = [ref_dense, ref_ste]
        dense, ste = by_row.get(ref_dense, {}), by_row.get(ref_ste, {})
        if ref_dense in table:
            entry["gap_to_dense"] = entry["final_val_loss_mean"] - table[ref_dense]["final_val_loss_mean"]
        if ref_dense in table and ref_ste in table:
            # Of the means over the seeds this row shares with dense and STE (rows run on fewer
            # seeds are not compared with other seeds' dense and STE runs).
            common = [s for s in mine if s in dense and s in ste] or None
            m_row, m_ste, m_dense = (statistics.fmean(x[s]["final_val_loss"] for s in (common or x))
                                     for x in (mine, ste, dense))
            entry["ste_gap_closed"] = (m_ste - m_row) / (m_ste - m_dense)
            # Per seed against that seed's dense and STE runs; undefined (None) where STE is not
            # behind dense at that seed: there is no gap to close there.
            per_seed = {
                s: ((ste[s]["final_val_loss"] - mine[s]["final_val_loss"]) / (ste[s]["final_val_loss"] - dense[s]["final_val_loss"])
                    if ste[s]["final_val_loss"] > dense[s]["final_val_loss"] else None)
                for s in sorted(mine) if s in ste and s in dense
            }
            defined = [v for v in per_seed.values() if v is not None]
            entry["ste_gap_closed_per_seed"] = list(per_seed.values())
            entry["ste_gap_closed_min"] = min(defined) if defined else None
            entry["seeds_without_ste_gap"] = [s for s, v in per_seed.items() if v is None]
        paired = [mine[s]["final_val_loss"] - ste[s]["final_val_loss"] for s in mine if s in ste]
        if row != ref_ste and len(paired) >= 2:
            mean, sd = statistics.fmean(paired), statistics.stdev(paired)
            half = _t975(len(paired) - 1) * sd / len(paired) ** 0.5
            entry["paired_diff_to_ste"] = {"mean": mean, "ci95": [mean - half, mean + half], "n": len(paired),
                                           "excludes_zero": (mean - half) * (mean + half) > 0}
    return table


def plot(runs: list[dict], path: Path, title: str) -> None:
    """Gap to dense over steps (each seed against the dense run of the same seed), mean and
    min..max over seeds shaded; one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {(r["method"], r["seed"]): dict(map(tuple, r["val_curve"])) for r in runs}
    rows_run = {r["method"] for r in runs}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # more rows than the default 10 colours
    for row in [*ROWS, *sorted(rows_run - set(ROWS))]:
        ref = _references(row, rows_run)[0]  # as in `summarise`
        dense = {seed: c for (m, seed), c in curves.items() if m == ref}
        mine = [r for r in runs if r["method"] == row and r["seed"] in dense]
        if not mine or row == ref:
            continue
        steps = [s for s, _ in mine[0]["val_curve"] if all(s in dense[r["seed"]] for r in mine)]
        gaps = [[dict(map(tuple, r["val_curve"]))[s] - dense[r["seed"]][s] for s in steps] for r in mine]
        mean = [statistics.fmean(g[i] for g in gaps) for i in range(len(steps))]
        label = f"{row} (n={len(mine)})" + ("" if ref == "dense" else f" vs {ref}")
        (line,) = ax.plot(steps, mean, label=label)
        if len(mine) > 1:
            ax.fill_between(steps, [min(g[i] for g in gaps) for i in range(len(steps))],
                            [max(g[i] for g in gaps) for i in range(len(steps))], color=line.get_color(), alpha=0.15)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val loss - dense val loss (same seed), nats/token")
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return json.loads(path.read_text()).get("runs", [])


def _same_setup(runs: list[dict], args) -> list[dict]:
    """The runs of this setup: other steps or settings are another experiment."""
    return [r for r in runs if r.get("steps", args.steps) == args.steps and r.get("settings", []) == list(args.set)]


def _write(path: Path, runs: list[dict], args, label: str) -> dict:
    table = summarise(runs)
    result = {
        "recipe": str(RECIPE.relative_to(REPO)),
        "label": label,
        "steps": args.steps,
        "settings": list(args.set),
        "val_every": args.val_every,
        "seeds": sorted({r["seed"] for r in runs}),
        "stamp": stamp(),  # of the job that wrote the file last; each run carries its own
        "table": table,
        "runs": runs,
        "python": sys.version.split()[0],
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}")  # whole-file replace: a reader never sees half
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return table


def markdown_table(table: dict) -> str:
    """The README's table from a ``summarise`` result."""
    def pct(x):
        return "n/a" if x is None else f"{x:.0%}"

    lines = ["| row | final val loss (mean ± std) | gap to dense | STE gap closed (of means; per seed) | "
             "paired diff to STE [95% CI] | final flip rate |", "|---|---:|---:|---|---|---:|"]
    for row, e in table.items():
        pd = e.get("paired_diff_to_ste")
        pd_s = f"{pd['mean']:+.4f} [{pd['ci95'][0]:+.4f}, {pd['ci95'][1]:+.4f}]" if pd else "-"
        closed = "-"
        if e.get("ste_gap_closed") is not None:
            closed = f"{pct(e['ste_gap_closed'])}; " + ", ".join(pct(x) for x in e.get("ste_gap_closed_per_seed", []))
        ref = e.get("compared_with", ["dense", "ste"])
        note = "" if ref == ["dense", "ste"] else f" (vs {ref[0]}, {ref[1]})"
        lines.append(f"| {row} (n={len(e['seeds'])}){note} | {e['final_val_loss_mean']:.4f} ± {e['final_val_loss_std']:.4f} | "
                     f"{e.get('gap_to_dense', float('nan')):+.4f} | {closed} | {pd_s} | {e['final_flip_rate_mean']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1200)  # 400 left every gap inside the seed noise
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--rows", "--methods", nargs="+", default=list(ROWS), choices=list(ROWS),
                   help="rows to (re)run; the others already in the JSON are kept (merge)")
    p.add_argument("--name", default="pretrain_quality",
                   help="JSON / PNG name under --out, e.g. pretrain_quality_short for a short screening run")
    p.add_argument("--label", default="full", help="what this table is, stored in the JSON (e.g. 'screening: 300 steps')")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads; use 1 on a shared machine (2 threads per job on 2 busy cores ran ~20x slower)")
    p.add_argument("--cache-dir", default=None, help="corpus cache (default: sparsetrain's)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="recipe overrides for every row, e.g. model.n_embd=64 data.batch_size=16 (stored in the JSON)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--table", action="store_true", help="print the table of the JSON (--out, --name) and exit")
    args = p.parse_args(argv)
    if args.table:
        runs = _load(Path(args.out) / f"{args.name}.json")
        print(markdown_table(summarise(runs)))
        return 0
    _overrides(args.set)  # a malformed KEY=VALUE fails before any training
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from sparsetrain.data.corpus import default_cache_dir

    cache = str(default_cache_dir(args.cache_dir))
    path = out / f"{args.name}.json"
    # Merge only with runs of the same setup: other steps or settings are another experiment.
    runs, mine = _same_setup(_load(path), args), {}
    started = stamp()  # side-by-side jobs and later reruns merge into one file: each run says which code made it
    with tempfile.TemporaryDirectory(prefix="pretrain_quality_") as tmp:
        for method in args.rows:
            for seed in args.seeds:
                r = run_one(method, seed, args.steps, args.val_every, Path(tmp), cache, args.set)
                mine[(method, seed)] = r = {**r, "stamp": started}
                print(f"{method:>24s} seed {seed}: val loss {r['final_val_loss']:.4f}  "
                      f"flip rate {r['final_flip_rate']:.2e}  ({r['wall_s']:.0f} s)", flush=True)
            # After every row, re-read the file so that jobs run side by side (other rows or seeds
            # of the same setup, written meanwhile) are merged, not overwritten.
            runs = [x for x in _same_setup(_load(path), args) if (x["method"], x["seed"]) not in mine]
            runs += list(mine.values())
            table = _write(path, runs, args, args.label)  # a table completed across sessions and jobs
    setup = " ".join(args.set) if args.set else "the recipe's model"
    plot(runs, out / f"{args.name}.png", f"tiny recipe, {setup} ({args.label}): 2:4 FFN, {args.steps} steps")
    print("\n" + markdown_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
