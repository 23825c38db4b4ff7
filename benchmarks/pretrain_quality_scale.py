"""Pre-training quality across model sizes and learning rates: the 2:4 gap and its remedies (issue 22).

The sibling of ``pretrain_quality.py`` (which measures many rows at one point: 2 layers x 64 wide,
2000 steps). This study asks whether what holds there holds as the model grows and the learning
rate moves. It trains with ``pretrain_quality.run_one`` (the same CLI run, data, optimizer and
recipe), so a run here and a run there with the same settings are the same run.

Grid
  Sizes: 2 layers x 64, 128 and 256 wide (FFN 4x wide, head dim 32): 65,536, 262,144 and
  1,048,576 FFN weights, 16x from the smallest to the largest.

  Step budget: a FIXED step count, 2000 steps of 16 x 128 byte tokens (4.1M tokens) at every size.
  A fixed number of tokens per parameter would need 16x the steps at the largest size (~32k steps,
  ~8 hours a run on one shared core: 100 steps took 88 s at 256 wide, 30 s at 128, 8-16 s at 64,
  measured with `nice -n 15` at load 3-5 on the 2-core machine), so the study could not afford a
  single seed of it. At 2x64 this is the setup ``pretrain_quality.py``'s table was measured at:
  ``--import-2x64 benchmarks/results/pretrain_quality.json`` adds those runs (each checked to resolve
  to this study's configuration). Fresh reruns: dense at lr 4e-3 seed 1 gave 1.668005 against its
  1.668012, but STE at lr 4e-3 seed 1 gave 1.7354 against 1.7226 (one seed's spread; the README
  says what was ruled out), so imported sparse runs are draws of the same distribution, not
  reruns of the same run. A whole 2000-step run took 15 min at 2x64 and ~32 min at 2x128 with `nice -n 15`
  at load 10-12 (3-5 and ~10 min on an idle core); 2x256 is ~3x 2x128. What this means for reading the results: the larger models see fewer
  tokens per parameter (about 42, 10 and 2.6 tokens per non-embedding weight), i.e. they are
  further from convergence; a 2:4 gap that shrinks with size here may partly be a gap that has not
  opened yet, which is what GPU-scale runs (far more tokens per parameter) must check.

  Learning rate: a sweep at one seed (``--phase sweep``) of the rows in ``SWEEP_ROWS`` (dense and
  STE, and the squared-ReLU pair, measured against each other) over ``LRS`` (a factor-2 ladder; the min lr stays
  the recipe's 2e-4 and the warm-up 10% of the steps, as in ``pretrain_quality.py``). Each row then
  runs at the best lr of the swept row it is measured by (``lr_of``: sparse rows at STE's best lr,
  dense rows at dense's), so dense and STE are each compared at their own best rate. A best lr at
  the edge of what was swept extends that row's ladder by a factor 2 (within ``LR_LIMITS``; the
  job re-plans after each pass) until a worse lr brackets it on each side; the table flags an edge
  that remains, and marks rows shown at the best lr of an incomplete sweep.

  Seeds (``--phase seeds``): every row in ``ROWS`` at its chosen lr, seeds 1-3 (seed 1 reuses the
  sweep's run). Rows whose feature is not on main yet (CAST, 2:4 activations, an lr re-warm at the
  switch to sparse) are declared and skipped with a message until it lands; check their overrides
  against the feature's docs when it does.

Output: ``benchmarks/results/pretrain_quality_scale.json``, one record per run (``size``,
``ffn_params``, ``row``, ``lr``, ``seed``, ``steps``, ``final_val_loss``, ..., and the commit, dirty
flag and command of the job that made it). A run already recorded with the same configuration is
skipped (resume), and each job re-reads the file under a lock and replaces it whole after every
run, so jobs can run side by side (e.g. one per size) and across sessions::

    nice -n 15 python benchmarks/pretrain_quality_scale.py --phase sweep --sizes 2x64
    nice -n 15 python benchmarks/pretrain_quality_scale.py --phase seeds --sizes 2x64 --rows dense ste recipe
    python benchmarks/pretrain_quality_scale.py --table     # per size: sweep, then each row at its lr
    python benchmarks/pretrain_quality_scale.py --plot      # benchmarks/results/pretrain_quality_scale.png
    python benchmarks/pretrain_quality_scale.py --list      # the grid, and which runs are still to do
"""

from __future__ import annotations

import argparse
import fcntl
import inspect
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
import pretrain_quality as pq  # noqa: E402

REPO = pq.REPO
RESULTS = pq.RESULTS
NAME = "pretrain_quality_scale"

# label -> model shape. Head dim 32 at every width; 2x64 is pretrain_quality.py's published setup.
SIZES = {
    "2x64": {"n_layer": 2, "n_embd": 64, "n_head": 2},
    "2x128": {"n_layer": 2, "n_embd": 128, "n_head": 4},
    "2x256": {"n_layer": 2, "n_embd": 256, "n_head": 8},
}
STEPS = 2000
VAL_EVERY = 500  # only the final loss enters the study; fewer validations save ~3% of a run
BATCH_SIZE = 16
# 4e-3 first: the best lr measured at 2x64 so far, so the first finished runs are the most useful.
LRS = [4e-3, 2e-3, 8e-3]
LR_LIMITS = (2.5e-4, 6.4e-2)  # how far the ladder is extended beyond an edge (factor 2 steps)
SWEEP_SEEDS = [1]
SEEDS = [1, 2, 3]

HALF = pq.HALF_FFN
_RECIPE = ["--sparsity.method", "s-ste", "--sparsity.dense_warmup", "0.1", "--sparsity.flip_moments", "reset"]
_RELU2 = ["--model.activation", "relu2"]
_ACT24 = ["--sparsity.activation_sparsity", "2:4"]


def _has_method(name: str):
    def check():
        from sparsetrain.config import METHODS

        return None if name in METHODS else f"sparsity method {name!r} is not on main yet (methods: {sorted(METHODS)})"
    return check


def _has_model_arg(name: str):
    def check():
        from sparsetrain.models import CausalLMModule

        if name in inspect.signature(CausalLMModule.__init__).parameters:
            return None
        return f"the model has no `{name}` option on main yet"
    return check


def _has_sparsity_field(name: str):
    def check():
        import dataclasses

        from sparsetrain.config import SparsityConfig

        if name in {f.name for f in dataclasses.fields(SparsityConfig)}:
            return None
        return f"SparsityConfig has no `{name}` field on main yet"
    return check


def _all(*checks):
    def check():
        return next((m for m in (c() for c in checks) if m), None)
    return check


# row -> its overrides; `family` picks the dense and STE rows it is measured against (squared-ReLU
# rows against the squared-ReLU dense and STE, so an activation's own gain is not counted as closing
# the 2:4 gap); `lr_of` the swept row whose best lr it runs at; `requires` says why it cannot run yet.
ROWS = {
    "dense": {"args": ["--sparsity.method", "dense"], "family": "gelu", "lr_of": "dense"},
    # the same number of non-zero FFN weights as 2:4: why not train a smaller dense model?
    "dense-half-ffn": {"args": ["--sparsity.method", "dense", "--model.n_inner", HALF], "family": "gelu", "lr_of": "dense"},
    "ste": {"args": ["--sparsity.method", "ste"], "family": "gelu", "lr_of": "ste"},
    "s-ste": {"args": ["--sparsity.method", "s-ste"], "family": "gelu", "lr_of": "ste"},
    # the README's recommendation at 2x64: S-STE + 10% dense warm-up + Adam moments reset on flips
    "recipe": {"args": _RECIPE, "family": "gelu", "lr_of": "ste"},
    # candidates
    "cast": {"args": ["--sparsity.method", "cast"], "family": "gelu", "lr_of": "ste", "requires": _has_method("cast")},
    # Longer warm-ups. With one step budget for every size a warm-up in tokens is a warm-up in steps
    # and a fraction at once, so these rows are also the "warm-up in tokens" candidate.
    "recipe-warmup25": {"args": [*_RECIPE[:2], "--sparsity.dense_warmup", "0.25", *_RECIPE[4:]],
                        "family": "gelu", "lr_of": "ste"},
    "recipe-warmup50": {"args": [*_RECIPE[:2], "--sparsity.dense_warmup", "0.5", *_RECIPE[4:]],
                        "family": "gelu", "lr_of": "ste"},
    # SR-STE's decay of the pruned weights (2e-4, SR-STE's default) on top of the recipe
    "recipe+sr-decay": {"args": [*_RECIPE, "--sparsity.masked_decay", "2e-4"], "family": "gelu", "lr_of": "ste"},
    # the lr re-warmed at the switch to sparse: needs an option nobody has added yet
    "recipe+lr-rewarm": {"args": [*_RECIPE, "--sparsity.lr_rewarm", "0.05"], "family": "gelu", "lr_of": "ste",
                         "requires": _has_sparsity_field("lr_rewarm")},
    # squared-ReLU FFN (issue 21), with its own dense references
    "relu2-dense": {"args": ["--sparsity.method", "dense", *_RELU2], "family": "relu2", "lr_of": "relu2-dense",
                    "requires": _has_model_arg("activation")},
    "relu2-dense-half-ffn": {"args": ["--sparsity.method", "dense", "--model.n_inner", HALF, *_RELU2],
                             "family": "relu2", "lr_of": "relu2-dense", "requires": _has_model_arg("activation")},
    "relu2-ste": {"args": ["--sparsity.method", "ste", *_RELU2], "family": "relu2", "lr_of": "relu2-ste",
                  "requires": _has_model_arg("activation")},
    "relu2-recipe": {"args": [*_RECIPE, *_RELU2], "family": "relu2", "lr_of": "relu2-ste",
                     "requires": _has_model_arg("activation")},
    "relu2-ste+act24": {"args": ["--sparsity.method", "ste", *_RELU2, *_ACT24], "family": "relu2", "lr_of": "relu2-ste",
                        "requires": _all(_has_model_arg("activation"), _has_sparsity_field("activation_sparsity"))},
    "relu2-recipe+act24": {"args": [*_RECIPE, *_RELU2, *_ACT24], "family": "relu2", "lr_of": "relu2-ste",
                           "requires": _all(_has_model_arg("activation"), _has_sparsity_field("activation_sparsity"))},
}
REFERENCES = {"gelu": ("dense", "ste"), "relu2": ("relu2-dense", "relu2-ste")}
SWEEP_ROWS = ["dense", "ste", "relu2-dense", "relu2-ste"]
HALF_ROWS = {"gelu": "dense-half-ffn", "relu2": "relu2-dense-half-ffn"}


def ffn_params(size: str) -> int:
    """FFN weights of the full-width model (c_fc and c_proj, 4x wide, biases not counted)."""
    s = SIZES[size]
    return s["n_layer"] * 2 * s["n_embd"] * 4 * s["n_embd"]


def settings(size: str, lr: float) -> list[str]:
    """``--set`` items of ``pretrain_quality.run_one`` for one size and peak lr."""
    s = SIZES[size]
    return [f"model.n_embd={s['n_embd']}", f"model.n_layer={s['n_layer']}", f"model.n_head={s['n_head']}",
            f"data.batch_size={BATCH_SIZE}", f"model.lr={lr:g}"]


def config(size: str, row: str, lr: float, steps: int) -> list[str]:
    """Everything that defines a run besides its seed: the resume key compares it."""
    return [*settings(size, lr), *pq._resolve_half(ROWS[row]["args"], settings(size, lr)), f"steps={steps}"]


def _key(r: dict) -> tuple:
    return r["size"], r["row"], float(r["lr"]), int(r["seed"]), int(r["steps"]), tuple(r["config"])


# ---------------------------------------------------------------------------------------------------
# provenance


def _own_stamp() -> dict:
    """Used until ``benchmarks/_stamp.py`` is on the branch: the commit, the dirty flag (results
    files are outputs, not dirt) and the command."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout

    try:
        commit = git("rev-parse", "HEAD").strip() or None
        dirty = [ln for ln in git("status", "--porcelain").splitlines() if "benchmarks/results/" not in ln]
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, []
    return {"commit": commit, "dirty": bool(dirty) if commit else None,
            "command": " ".join(["python", *sys.argv])}


def job_stamp() -> dict:
    try:
        from _stamp import stamp
    except ImportError:
        return _own_stamp()
    return stamp()


# ---------------------------------------------------------------------------------------------------
# the JSON: one record per run, merged across jobs and sessions


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return json.loads(path.read_text()).get("runs", [])


@contextmanager
def _locked(path: Path):
    """Holds an exclusive lock beside ``path`` so two jobs' read-merge-replace never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def add_record(path: Path, record: dict) -> list[dict]:
    """Re-reads the file (another job may have written meanwhile), replaces a run of the same key,
    and writes the whole file through a rename, so a reader never sees half of it."""
    with _locked(path):
        runs = [r for r in load(path) if _key(r) != _key(record)] + [record]
        runs.sort(key=lambda r: (list(SIZES).index(r["size"]) if r["size"] in SIZES else 99, r["row"], r["lr"], r["seed"]))
        doc = {
            "benchmark": NAME,
            "what": "final validation loss per run; see benchmarks/pretrain_quality_scale.py's docstring",
            "sizes": {k: {**v, "ffn_params": ffn_params(k)} for k, v in SIZES.items()},
            "runs": runs,
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)
    return runs


# pretrain_quality.py's 2x64 table ran this study's 2x64 configuration (same model, data, steps,
# schedule, seeds); its rows map to (row, lr) here. Only the validation interval differs (200 there,
# 500 here), which does not touch training.
IMPORT_ROWS = {
    "dense": "dense", "dense-lr4e-3": "dense", "ste": "ste", "ste-lr4e-3": "ste",
    "s-ste": "s-ste", "s-ste-lr4e-3": "s-ste", "dense-half-ffn": "dense-half-ffn",
    "warmup10-s-ste+flip-reset": "recipe", "warmup10-s-ste+flip-reset-lr4e-3": "recipe",
}


def _resolved(items: list[str], args: list[str]) -> dict[str, str]:
    """``--set`` items then CLI overrides as one ``{key: value}`` (a later one wins, as in the CLI)."""
    out = {k: v for k, v in pq._parse_settings(items).items()}
    for k, v in zip(args[::2], args[1::2]):
        out[k.lstrip("-")] = v
    return {k: (repr(float(v)) if k == "model.lr" else v) for k, v in out.items()}


def imported(old_runs: list[dict], source: str) -> tuple[list[dict], list[str]]:
    """Records of this study from ``pretrain_quality.py`` runs whose resolved configuration is
    exactly one of this study's at 2x64 (checked key by key, not assumed from the row's name)."""
    size, recs, notes = "2x64", [], []
    for r in old_runs:
        row = IMPORT_ROWS.get(r["method"])
        if row is None or r.get("steps") != STEPS:
            continue
        theirs = _resolved(r.get("settings", []), r.get("overrides", []))
        lr = float(theirs.get("model.lr", "nan"))
        mine = _resolved(settings(size, lr), pq._resolve_half(ROWS[row]["args"], settings(size, lr)))
        if theirs != mine:
            notes.append(f"not imported: {r['method']} seed {r['seed']}: {theirs} != {mine}")
            continue
        recs.append({
            "size": size, **SIZES[size], "ffn_params": ffn_params(size), "row": row, "lr": lr, "seed": r["seed"],
            "steps": STEPS, "batch_size": BATCH_SIZE, "final_val_loss": r["final_val_loss"],
            "final_train_loss": r.get("final_train_loss"), "val_curve": r.get("val_curve"),
            "flip_rate": r.get("flip_rate"), "final_flip_rate": r.get("final_flip_rate"), "wall_s": r.get("wall_s"),
            "config": config(size, row, lr, STEPS), "commit": None, "dirty": None,
            "command": f"imported from {source}, row {r['method']} (pretrain_quality.py, validation every 200 steps)",
            "imported_from": source,
        })
    return recs, notes


# ---------------------------------------------------------------------------------------------------
# which runs


def best_lrs(runs: list[dict], size: str, row: str, steps: int = STEPS) -> tuple[float | None, list[float]]:
    """The swept row's best peak lr at ``size`` (lowest final loss at the sweep seed) and the lrs swept."""
    at = {float(r["lr"]): r["final_val_loss"] for r in runs
          if r["size"] == size and r["row"] == row and r["seed"] == SWEEP_SEEDS[0] and r["steps"] == steps
          and r["config"] == config(size, row, r["lr"], steps)}
    if not at:
        return None, []
    return min(at, key=at.get), sorted(at)


def sweep_lrs(runs: list[dict], size: str, row: str, steps: int = STEPS) -> list[float]:
    """The lrs the swept ``row`` needs at ``size``: ``LRS``, and once those are in, one more step of
    the factor-2 ladder beyond a best lr at the edge of what was swept (within ``LR_LIMITS``), so
    that every row's best lr is bracketed by a worse one on each side."""
    best, swept = best_lrs(runs, size, row, steps)
    lrs = sorted(set(LRS) | set(swept))
    if best is None or not set(LRS) <= set(swept):
        return sorted(LRS)
    if best == max(swept) and best * 2 <= LR_LIMITS[1]:
        lrs.append(best * 2)  # exact in binary floating point: the key of a run stays the same
    if best == min(swept) and best / 2 >= LR_LIMITS[0]:
        lrs.append(best / 2)
    return sorted(lrs)


def chosen_lr(runs: list[dict], size: str, row: str, steps: int = STEPS) -> float | None:
    """The best lr of the row's swept row once its sweep is complete (``sweep_lrs`` all run; None
    before: a choice made on part of the ladder could change when the rest comes in)."""
    swept_row = ROWS[row]["lr_of"]
    best, swept = best_lrs(runs, size, swept_row, steps)
    return best if set(sweep_lrs(runs, size, swept_row, steps)) <= set(swept) else None


def plan(args, runs: list[dict]) -> tuple[list[tuple], list[str]]:
    """The (size, row, lr, seed) runs still to do, in order, and the messages for what is skipped."""
    done = {_key(r) for r in runs}
    todo, notes = [], []
    for size in args.sizes:
        rows = args.rows or (SWEEP_ROWS if args.phase == "sweep" else list(ROWS))
        for row in rows:
            why = ROWS[row].get("requires", lambda: None)()
            if why:
                notes.append(f"skip {row}: {why}")
        rows = [r for r in rows if not ROWS[r].get("requires", lambda: None)()]
        if args.phase == "sweep":
            if args.lrs:
                cells = [(row, lr) for lr in args.lrs for row in rows]
            else:  # the ladder first (row pairs at each lr), then each row's extension beyond an edge
                cells = [(row, lr) for lr in LRS for row in rows]
                cells += [(row, lr) for row in rows for lr in sweep_lrs(runs, size, row, args.steps) if lr not in LRS]
            seeds = args.seeds or SWEEP_SEEDS
        else:
            cells = []
            for row in rows:
                lrs = args.lrs or [chosen_lr(runs, size, row, args.steps)]
                if lrs == [None]:
                    notes.append(f"skip {row} at {size}: the lr sweep of {ROWS[row]['lr_of']} is not complete there "
                                 f"(run --phase sweep --sizes {size} first, or give --lrs)")
                    continue
                cells += [(row, lr) for lr in lrs]
            seeds = args.seeds or SEEDS
        for row, lr in cells:
            for seed in seeds:
                key = (size, row, float(lr), seed, args.steps, tuple(config(size, row, lr, args.steps)))
                if key not in done:
                    todo.append((size, row, lr, seed))
    return todo, notes


def run_one(size: str, row: str, lr: float, seed: int, steps: int, workdir: Path, cache: str) -> dict:
    """One training run through ``pretrain_quality.run_one``; a seam the tests replace."""
    return pq.run_one(row, seed, steps, min(VAL_EVERY, steps), workdir, cache, settings(size, lr), row_args=ROWS[row]["args"])


# ---------------------------------------------------------------------------------------------------
# statistics


def _t975(df: int) -> float:
    return pq._t975(df)


def mean_ci(xs: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval (None for one value)."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, None
    return m, _t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def compare(row: dict[int, float], dense: dict[int, float], ste: dict[int, float],
            half: dict[int, float] | None = None) -> dict:
    """One row's final losses by seed against its dense and STE references (by seed).

    ``gap_to_dense``: mean(row) - mean(dense) over each one's own seeds. ``closed_of_means``:
    ``(STE - row) / (STE - dense)`` of the means over the seeds all three share. ``closed_per_seed``:
    the same at each shared seed (None where STE is not behind dense at that seed: nothing to close).
    ``paired_to_ste``: mean over shared seeds of row - STE, with its 95% t-interval (n >= 2);
    ``paired_to_half`` the same against the half-wide-FFN dense model (``half``, the same non-zeros):
    is the 2:4 model better than simply a smaller dense one?"""
    out = {"n": len(row), "seeds": sorted(row), "mean": statistics.fmean(row.values()),
           "std": statistics.stdev(row.values()) if len(row) > 1 else 0.0}
    if dense:
        out["gap_to_dense"] = out["mean"] - statistics.fmean(dense.values())
    common = [s for s in sorted(row) if s in dense and s in ste]
    if common:
        m_row, m_dense, m_ste = (statistics.fmean(x[s] for s in common) for x in (row, dense, ste))
        out["closed_of_means"] = (m_ste - m_row) / (m_ste - m_dense) if m_ste > m_dense else None
        out["ste_gap_of_means"] = m_ste - m_dense
        out["closed_per_seed"] = {s: ((ste[s] - row[s]) / (ste[s] - dense[s]) if ste[s] > dense[s] else None)
                                  for s in common}
        defined = [v for v in out["closed_per_seed"].values() if v is not None]
        out["closed_min"] = min(defined) if defined else None
    for name, ref in (("paired_to_ste", ste), ("paired_to_half", half or {})):
        paired = [row[s] - ref[s] for s in sorted(row) if s in ref]
        if len(paired) >= 2:
            m, h = mean_ci(paired)
            out[name] = {"mean": m, "ci95": [m - h, m + h], "n": len(paired), "excludes_zero": (m - h) * (m + h) > 0}
    return out


def summarise(runs: list[dict], steps: int = STEPS) -> dict:
    """Per size: the sweep (swept row -> lr -> loss at the sweep seed, best lr, edge flag) and each
    row at its chosen lr compared with its family's dense and STE at theirs. Records of another
    configuration than the current one (a row redefined since) are left out."""
    current = [r for r in runs if r["row"] in ROWS and r["size"] in SIZES and r["steps"] == steps
               and r["config"] == config(r["size"], r["row"], r["lr"], steps)]
    out = {}
    for size in SIZES:
        here = [r for r in current if r["size"] == size]
        if not here:
            continue
        sweep = {}
        for row in SWEEP_ROWS:
            best, swept = best_lrs(here, size, row, steps)
            if best is None:
                continue
            losses = {lr: next(r["final_val_loss"] for r in here if r["row"] == row and float(r["lr"]) == lr
                               and r["seed"] == SWEEP_SEEDS[0]) for lr in swept}
            sweep[row] = {"losses": losses, "best_lr": best,
                          "best_at_edge": len(swept) > 1 and best in (swept[0], swept[-1])}
        by_row = {}
        for row in ROWS:
            # Until the sweep is complete (sweep_lrs) the best lr so far is used, and the row says so.
            lr, swept = best_lrs(here, size, ROWS[row]["lr_of"], steps)
            if lr is None:
                continue
            seeds = {r["seed"]: r["final_val_loss"] for r in here if r["row"] == row and float(r["lr"]) == lr}
            if seeds:
                by_row[row] = (lr, seeds, not set(sweep_lrs(here, size, ROWS[row]["lr_of"], steps)) <= set(swept))
        table = {}
        for row, (lr, seeds, provisional) in by_row.items():
            ref_d, ref_s = REFERENCES[ROWS[row]["family"]]
            dense = by_row.get(ref_d, (None, {}))[1]
            ste = by_row.get(ref_s, (None, {}))[1]
            half_row = HALF_ROWS[ROWS[row]["family"]]
            half = by_row.get(half_row, (None, {}))[1] if row not in (half_row, ref_d) else {}
            table[row] = {"lr": lr, "provisional_lr": provisional, "compared_with": [ref_d, ref_s], "losses": seeds,
                          **compare(seeds, dense, ste if row != ref_s else {}, half)}
        out[size] = {"ffn_params": ffn_params(size), "sweep": sweep, "rows": table}
    return out


def is_candidate(row: str) -> bool:
    """A row the study judges: not its family's dense, STE or half-wide dense reference."""
    fam = ROWS[row]["family"]
    return row not in (*REFERENCES[fam], HALF_ROWS[fam])


GOAL_SHARE, GOAL_SEEDS = 0.5, 3  # issue 22: >= half of STE's gap at each of >= 3 seeds, at every size


def goal_check(summary: dict) -> dict:
    """Issue 22's goal for every candidate row (not a family's dense, STE or half-wide reference).

    Per row: at each size, the seeds with a defined share of STE's gap closed and the smallest of
    them; the share of the means averaged over the sizes that have it (how much the row closes
    across sizes); and at the largest size in the study, the paired difference to the half-wide
    dense model. ``met``: every size has >= 3 seeds, each closing >= 50%, and at the largest size the
    row beats half-wide dense with a 95% interval below zero."""
    sizes = [s for s in SIZES if s in summary]
    out = {}
    for row in filter(is_candidate, ROWS):
        per_size = {}
        for size in sizes:
            e = summary[size]["rows"].get(row)
            if not e or "closed_per_seed" not in e:
                continue
            defined = [v for v in e["closed_per_seed"].values() if v is not None]
            per_size[size] = {"n": len(defined), "closed_min": min(defined) if defined else None,
                              "closed_of_means": e["closed_of_means"]}
        if not per_size:
            continue
        shares = [v["closed_of_means"] for v in per_size.values() if v["closed_of_means"] is not None]
        half = summary[sizes[-1]]["rows"].get(row, {}).get("paired_to_half")
        every_size = all(size in per_size and per_size[size]["n"] >= GOAL_SEEDS
                         and per_size[size]["closed_min"] >= GOAL_SHARE for size in sizes)
        beats_half = bool(half) and half["ci95"][1] < 0
        out[row] = {"per_size": per_size, "mean_share_across_sizes": statistics.fmean(shares) if shares else None,
                    "largest": sizes[-1], "paired_to_half_at_largest": half,
                    "every_seed_every_size": every_size, "beats_half_at_largest": beats_half,
                    "met": every_size and beats_half}
    return out


def markdown(summary: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{x:.0%}"

    lines = []
    for size, s in summary.items():
        lines += [f"**{size}** ({s['ffn_params']:,} FFN weights)", ""]
        if s["sweep"]:
            lrs = sorted({lr for v in s["sweep"].values() for lr in v["losses"]})
            lines += ["| lr sweep (seed 1) | " + " | ".join(f"{lr:g}" for lr in lrs) + " | best |",
                      "|---|" + "---:|" * (len(lrs) + 1)]
            for row, v in s["sweep"].items():
                cells = [(f"**{v['losses'][lr]:.4f}**" if lr == v["best_lr"] else f"{v['losses'][lr]:.4f}")
                         if lr in v["losses"] else "-" for lr in lrs]
                edge = " (edge: extend)" if v["best_at_edge"] else ""
                lines.append(f"| {row} | " + " | ".join(cells) + f" | {v['best_lr']:g}{edge} |")
            lines.append("")
        lines += ["| row | lr | final val loss (mean ± std) | gap to dense | STE gap closed (of means; per seed) | "
                  "paired diff to STE [95% CI] | paired diff to half-wide dense [95% CI] |", "|---|---:|---:|---:|---|---|---|"]
        for row, e in s["rows"].items():
            closed = "-"
            if "closed_per_seed" in e:
                closed = f"{pct(e['closed_of_means'])}; " + ", ".join(pct(v) for v in e["closed_per_seed"].values())
            p_s, h_s = (f"{p['mean']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]" if p else "-"
                        for p in (e.get("paired_to_ste"), e.get("paired_to_half")))
            gap = f"{e['gap_to_dense']:+.4f}" if "gap_to_dense" in e else "-"
            ref = "" if e["compared_with"] == ["dense", "ste"] else f" (vs {', '.join(e['compared_with'])})"
            lr = f"{e['lr']:g}" + (" (sweep incomplete)" if e["provisional_lr"] else "")
            lines.append(f"| {row} (n={e['n']}){ref} | {lr} | {e['mean']:.4f} ± {e['std']:.4f} | {gap} | "
                         f"{closed} | {p_s} | {h_s} |")
        lines.append("")
    goals = goal_check(summary)
    if goals:
        sizes = [s for s in SIZES if s in summary]
        lines += [f"**Goal** (>= {GOAL_SHARE:.0%} of STE's gap at each of >= {GOAL_SEEDS} seeds at every size; at "
                  f"{sizes[-1]} better than half-wide dense, 95% interval below 0)", "",
                  "| row | " + " | ".join(f"{s}: seeds, min closed" for s in sizes)
                  + " | share of means, averaged over sizes | vs half-wide dense at " + sizes[-1] + " | met |",
                  "|---|" + "---|" * len(sizes) + "---:|---|---|"]
        for row, g in goals.items():
            cells = [f"{g['per_size'][s]['n']}, {pct(g['per_size'][s]['closed_min'])}" if s in g["per_size"] else "-"
                     for s in sizes]
            h = g["paired_to_half_at_largest"]
            half = f"{h['mean']:+.4f} [{h['ci95'][0]:+.4f}, {h['ci95'][1]:+.4f}]" if h else "-"
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {pct(g['mean_share_across_sizes'])} | {half} | "
                         f"{'yes' if g['met'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """Left: STE's gap to its dense model (and the half-wide dense model's) against FFN size, mean
    over seeds with its 95% t-interval. Right: the share of STE's gap each candidate closes
    (`share_closed`: of the means, with the paired interval), one seed where no bar is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    sizes = list(summary)
    for fam, (ref_d, ref_s) in REFERENCES.items():
        for row, style in ((ref_s, "o-"), (HALF_ROWS[fam], "s--")):
            xs, ms, hs = [], [], []
            for size in sizes:
                e = summary[size]["rows"].get(row)
                ref = summary[size]["rows"].get(ref_d)
                if not e or not ref:
                    continue
                gaps = _gaps_per_seed(summary[size], row, ref_d)
                if not gaps:
                    continue
                m, h = mean_ci(gaps)
                xs.append(summary[size]["ffn_params"]), ms.append(m), hs.append(h or 0.0)
                ax1.annotate(f"n={len(gaps)}", (xs[-1], m), textcoords="offset points", xytext=(5, 3), fontsize=6)
            if xs:
                ax1.errorbar(xs, ms, yerr=hs, fmt=style, capsize=3, label=f"{row} - {ref_d}")
    ax1.axhline(0, color="k", lw=0.8)
    ax1.set_xscale("log")
    ax1.set_xlabel("FFN weights (full width)")
    ax1.set_ylabel("final val loss - dense (same seed), nats/token")
    ax1.set_title("2:4 gap (STE) and half-wide dense gap vs size", fontsize=9)
    for row in filter(is_candidate, ROWS):  # references and half-wide dense are on the left panel
        xs, ms, los, his = [], [], [], []
        for size in sizes:
            point = share_closed(summary[size]["rows"].get(row) or {})
            if point is None:
                continue
            m, lo, hi, n = point
            xs.append(summary[size]["ffn_params"]), ms.append(m), los.append(m - lo), his.append(hi - m)
            ax2.annotate(f"n={n}", (xs[-1], m), textcoords="offset points", xytext=(5, 3), fontsize=6)
        if xs:
            ax2.errorbar(xs, ms, yerr=[los, his], fmt="o-" if len(xs) > 1 else "o", capsize=3, label=row)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax2.set_xscale("log")
    ax2.set_xlabel("FFN weights (full width)")
    ax2.set_ylabel("share of STE's gap closed (of the means; paired 95% CI)")
    ax2.set_title("each row at its own lr, vs its family's dense and STE at theirs", fontsize=9)
    # Where STE's gap is small (a small denominator) an interval can reach far: the range shows the
    # candidates' means, and a clipped range says so on the panel's floor.
    lo, hi = ax2.get_ylim()
    if lo < -1.0 or hi > 3.0:
        ax2.set_ylim(max(lo, -1.0), min(hi, 3.0))
        ax2.text(0.02, 0.02, "y clipped to [-1, 3] (see --table)", transform=ax2.transAxes, fontsize=7, color="grey")
    for ax in (ax1, ax2):
        ax.set_xticks([ffn_params(k) for k in SIZES], [f"{k}\n{ffn_params(k):,}" for k in SIZES], fontsize=7)
        ax.minorticks_off()
        ax.set_xlim(ffn_params(next(iter(SIZES))) / 1.5, ffn_params(list(SIZES)[-1]) * 1.5)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    provisional = sorted(k for k, v in summary.items() if any(e["provisional_lr"] for e in v["rows"].values()))
    fig.suptitle(f"2 layers, {STEPS} steps of {BATCH_SIZE} x 128 byte tokens at every size; one seed where no interval "
                 "is drawn" + (f"; lr sweep incomplete at {', '.join(provisional)}" if provisional else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def share_closed(entry: dict):
    """``(share, low, high, n)`` of a row's `compare` entry, or None: the share of STE's gap closed of
    the means, and the paired 95% interval of ``row - STE`` in the same unit (divided by STE's gap
    of the means, sign flipped); one seed gives ``low == high == share``. A per-seed mean would be
    dominated by a seed where STE's gap is near zero."""
    share, gap = entry.get("closed_of_means"), entry.get("ste_gap_of_means")
    if share is None or not gap:
        return None
    paired = entry.get("paired_to_ste")
    if not paired:
        return share, share, share, 1
    return share, -paired["ci95"][1] / gap, -paired["ci95"][0] / gap, paired["n"]


def _gaps_per_seed(size_summary: dict, row: str, ref_d: str) -> list[float]:
    """``row - dense`` at each seed both have, at each one's chosen lr."""
    mine, dense = (size_summary["rows"].get(r, {}).get("losses", {}) for r in (row, ref_d))
    return [mine[s] - dense[s] for s in sorted(mine) if s in dense]


# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=["sweep", "seeds"], default="sweep",
                   help="sweep: SWEEP_ROWS over the lrs at one seed; seeds: every row at its chosen lr, seeds 1-3")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--rows", nargs="+", default=None, choices=list(ROWS), help="default: the phase's rows")
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help=f"peak lrs (sweep default {LRS}; seeds default: each row's chosen lr)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help=f"default: {SWEEP_SEEDS} (sweep), {SEEDS} (seeds)")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--cache-dir", default=None, help="corpus cache (default: sparsetrain's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on the shared machine)")
    p.add_argument("--import-2x64", metavar="JSON", default=None,
                   help="add the runs of pretrain_quality.py's 2x64 table (its JSON) whose configuration is this "
                        "study's at 2x64, then exit; runs already recorded are kept")
    p.add_argument("--list", action="store_true", help="print the runs still to do and exit")
    p.add_argument("--table", action="store_true", help="print the tables from the JSON and exit")
    p.add_argument("--plot", action="store_true", help=f"write {NAME}.png from the JSON and exit")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    for lr in args.lrs or []:
        if not lr > 0:
            p.error(f"--lrs takes positive learning rates, got {lr}")
    out = Path(args.out)
    path = out / f"{NAME}.json"
    runs = load(path)
    if args.import_2x64:
        src = Path(args.import_2x64)
        if not src.is_file():
            p.error(f"--import-2x64: no such file {src}")
        recs, notes = imported(json.loads(src.read_text()).get("runs", []), src.name)
        done = {_key(r) for r in runs}
        for n in notes:
            print(n)
        new = [r for r in recs if _key(r) not in done]
        for r in new:
            add_record(path, r)
        print(f"imported {len(new)} run(s) of {src} ({len(recs) - len(new)} already recorded)")
        return 0
    if args.table or args.plot:
        summary = summarise(runs, args.steps)
        if args.table:
            print(markdown(summary))
        if args.plot:
            plot(summary, out / f"{NAME}.png")
            print(f"wrote {out / f'{NAME}.png'}")
        return 0
    todo, notes = plan(args, runs)
    for n in notes:
        print(n, flush=True)
    if args.list:
        for t in todo:
            print("todo: size {} row {} lr {:g} seed {}".format(*t))
        for size in args.sizes:  # what the rest costs, from this size's own recorded runs
            n = sum(t[0] == size for t in todo)
            walls = [r["wall_s"] for r in runs if r["size"] == size and r.get("wall_s") and not r.get("imported_from")]
            est = f"~{n * statistics.fmean(walls) / 3600:.1f} h at the {len(walls)} recorded run(s)' mean" if walls else "no timing yet"
            print(f"{size}: {n} run(s) to do, {est}")
        return 0
    if not todo:
        print("nothing to do: every requested run is in the JSON")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    from sparsetrain.data.corpus import default_cache_dir

    cache = str(default_cache_dir(args.cache_dir))
    out.mkdir(parents=True, exist_ok=True)
    started = job_stamp()  # before any run: the code that runs is the code stamped
    print(f"{len(todo)} run(s) to do; commit {started.get('commit')} dirty {started.get('dirty')}", flush=True)
    while todo:
        ran = _run_all(todo, args, path, cache, started)
        todo = plan(args, load(path))[0] if not args.lrs else []
        if not ran:  # everything was done by a job beside this one; nothing new to learn from
            break
    return 0


def _run_all(todo, args, path: Path, cache: str, started: dict) -> int:
    """Runs the (size, row, lr, seed) in ``todo`` that are not recorded yet; returns how many ran."""
    ran = 0
    for size, row, lr, seed in todo:
        if any(_key(r) == (size, row, float(lr), seed, args.steps, tuple(config(size, row, lr, args.steps)))
               for r in load(path)):
            continue  # a job beside this one did it meanwhile
        work = Path(tempfile.mkdtemp(prefix="pq_scale_"))
        try:
            r = run_one(size, row, lr, seed, args.steps, work, cache)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # checkpoints: ~MBs per run, thousands of runs
        record = {
            "size": size, **SIZES[size], "ffn_params": ffn_params(size), "row": row, "lr": float(lr), "seed": seed,
            "steps": args.steps, "batch_size": BATCH_SIZE, "final_val_loss": r["final_val_loss"],
            "final_train_loss": r.get("final_train_loss"), "val_curve": r.get("val_curve"),
            "flip_rate": r.get("flip_rate"), "final_flip_rate": r.get("final_flip_rate"), "wall_s": r.get("wall_s"),
            "config": config(size, row, lr, args.steps),
            "commit": started.get("commit"), "dirty": started.get("dirty"), "command": started.get("command"),
            "stamp": started,
        }
        add_record(path, record)
        ran += 1
        print(f"{size} {row:>22s} lr {lr:g} seed {seed}: val loss {r['final_val_loss']:.4f} "
              f"({r.get('wall_s', 0):.0f} s)", flush=True)
    return ran


if __name__ == "__main__":
    sys.exit(main())
