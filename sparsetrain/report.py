"""`sparsetrain report`: curves and final numbers of finished (or running) runs, from their CSV logs.

::

    sparsetrain report RUN_DIR [RUN_DIR ...] [--dense DENSE_RUN_DIR] [--out report.png] [--json FILE]

Reads each run's ``metrics.csv`` (written by Lightning's `CSVLogger`, which the recipes configure),
draws four panels into one PNG — train and validation loss, the validation-loss gap to the dense
run (``--dense``), the mask flip rate and the zero fraction of the target layers, all over optimizer
steps — and prints the final numbers as a table.

Which log is read: ``RUN_DIR`` may be a ``metrics.csv`` file, a directory holding one, or any
directory above (a run directory, a recipe's output root). When several ``metrics.csv`` lie below it,
the newest is read, by the number of its ``version_N`` folder (then by modification time); the
table's ``log`` column says which. ``--merge-versions`` reads all of them instead, in version order,
a later version's value replacing an earlier one's at the same step (a run resumed into a new
``version_N``).

Only training logs are curves: a ``metrics.csv`` with no ``train/loss`` value beside others that
have one was written by ``sparsetrain validate`` / ``test`` before their results were recorded apart
(a single step-0 point), and is skipped. ``validate`` / ``test`` results are read from the run's
``evaluations.jsonl`` and listed below the table, with the step of the checkpoint they evaluated.

"Final" means the last logged value of each metric. The gap is this run's validation loss minus the
dense run's, at the last step where both were validated.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
FLIP_RATE = "sparsity/flip_rate"
ZERO_FRACTION = "sparsity/zero_fraction"
BETA_MEAN = "sparsity/beta_mean"
KNOWN_METRICS = (TRAIN_LOSS, VAL_LOSS, FLIP_RATE, ZERO_FRACTION, BETA_MEAN)
# Table columns: (header, metric key or computed name).
COLUMNS = (
    ("step", "step"),
    ("train/loss", TRAIN_LOSS),
    ("val/loss", VAL_LOSS),
    ("val gap", "val_gap"),
    ("flip_rate", FLIP_RATE),
    ("zero_frac", ZERO_FRACTION),
    ("beta_mean", BETA_MEAN),
)

_VERSION = re.compile(r"^version_(\d+)$")


class ReportError(ValueError):
    """A problem with the runs given to `report`, worded for a one-line message."""


@dataclass
class Run:
    """One run's metrics: ``series[key]`` is a step-sorted list of ``(step, value)``."""

    label: str
    logs: list[Path]
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    evaluations: list[dict] = field(default_factory=list)  # `sparsetrain validate` / `test` records
    skipped: list[Path] = field(default_factory=list)  # logs without training rows

    def last(self, key: str) -> Optional[float]:
        s = self.series.get(key)
        return s[-1][1] if s else None

    def last_step(self) -> Optional[int]:
        steps = [s[-1][0] for s in self.series.values() if s]
        return max(steps) if steps else None


def _version_of(csv_path: Path, root: Path) -> int:
    """The number of the nearest ``version_N`` folder above ``csv_path`` (below ``root``), or -1."""
    for parent in csv_path.relative_to(root).parents:
        m = _VERSION.match(parent.name)
        if m:
            return int(m.group(1))
    return -1


def find_logs(run_dir: str, merge_versions: bool = False) -> list[Path]:
    """The ``metrics.csv`` file(s) to read for ``run_dir`` (see the module doc for which).

    Raises:
        ReportError: ``run_dir`` does not exist or holds no ``metrics.csv``.
    """
    p = Path(run_dir).expanduser()
    if not p.exists():
        raise ReportError(f"RUN_DIR {run_dir!r} does not exist")
    if p.is_file():
        if p.suffix != ".csv":
            raise ReportError(f"RUN_DIR {run_dir!r} is a file but not a CSV log (metrics.csv)")
        return [p]
    found = sorted(p.rglob("metrics.csv"))
    if not found:
        raise ReportError(
            f"no CSV log (metrics.csv) under {run_dir!r}; runs write one when their trainer uses "
            "lightning.pytorch.loggers.CSVLogger, as the recipes do"
        )
    order = sorted(found, key=lambda f: (_version_of(f, p), f.stat().st_mtime_ns, str(f)))
    training = [f for f in order if _has_training_rows(f)]
    if training:
        order = training
    return order if merge_versions else [order[-1]]


def _has_training_rows(path: Path) -> bool:
    """Whether a CSV log holds a ``train/loss`` value (an evaluation-only log does not)."""
    try:
        with open(path, newline="") as f:
            return any(row.get(TRAIN_LOSS) for row in csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return True  # not ours to judge here: `read_metrics` reports what is wrong with it


def find_evaluations(log: Path, top: Path) -> list[dict]:
    """The ``evaluations.jsonl`` records of the run ``log`` belongs to (searched from ``log`` up to ``top``)."""
    from .runs import EVALUATIONS, read_evaluations

    top = top.resolve()
    for folder in log.resolve().parents:
        if (folder / EVALUATIONS).is_file():
            return read_evaluations(folder)
        if folder == top or top not in folder.parents:
            break
    return []


def _number(value: str, path: Path, line: int, column: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ReportError(f"{str(path)!r} line {line}: column {column!r} holds {value!r}, not a number") from None


def read_metrics(paths: Sequence[Path]) -> dict[str, list[tuple[int, float]]]:
    """Every metric column of the CSV log(s) as step-sorted ``(step, value)`` lists; empty cells skipped.

    A later file's value replaces an earlier one's at the same step.
    """
    merged: dict[str, dict[int, float]] = {}
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "step" not in reader.fieldnames:
                raise ReportError(f"{str(path)!r} is not a Lightning CSV log: it has no 'step' column")
            for row in reader:
                if not row.get("step"):
                    continue
                step = int(_number(row["step"], path, reader.line_num, "step"))
                for key, value in row.items():
                    if key in ("step", "epoch") or key is None or value in (None, ""):
                        continue
                    merged.setdefault(key, {})[step] = _number(value, path, reader.line_num, key)
    return {k: sorted(v.items()) for k, v in merged.items()}


def load_run(run_dir: str, merge_versions: bool = False, label: Optional[str] = None) -> Run:
    """Find, read and check one run's log."""
    logs = find_logs(run_dir, merge_versions)
    series = read_metrics(logs)
    if not any(k in series for k in KNOWN_METRICS):
        raise ReportError(
            f"{str(logs[-1])!r} holds none of {', '.join(KNOWN_METRICS)}; is it a sparsetrain run's log?"
        )
    top = Path(run_dir).expanduser()
    top = top.parent if top.is_file() else top
    skipped = [] if not top.is_dir() else sorted(
        f for f in top.rglob("metrics.csv") if f not in logs and not _has_training_rows(f))
    return Run(label=label or run_dir, logs=logs, series=series, evaluations=find_evaluations(logs[-1], top),
               skipped=skipped)


def val_gap(run: Run, dense: Run) -> list[tuple[int, float]]:
    """``(step, run val/loss - dense val/loss)`` at the steps where both runs were validated."""
    d = dict(dense.series.get(VAL_LOSS, []))
    return [(s, v - d[s]) for s, v in run.series.get(VAL_LOSS, []) if s in d]


def summary(run: Run, dense: Optional[Run] = None) -> dict:
    """The final numbers of ``run`` (None where it did not log the metric)."""
    out = {"run": run.label, "log": [str(p) for p in run.logs], "step": run.last_step()}
    for key in KNOWN_METRICS:
        out[key] = run.last(key)
    gap = val_gap(run, dense) if dense is not None else []
    out["val_gap"] = gap[-1][1] if gap else None
    out["val_gap_step"] = gap[-1][0] if gap else None
    out["evaluations"] = list(run.evaluations)
    out["skipped_logs"] = [str(p) for p in run.skipped]
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table: one line per run, the columns of `COLUMNS`, then which log each line read."""
    headers = ["run"] + [h for h, _ in COLUMNS]
    cells = [[r["run"]] + [_fmt(r[k]) for _, k in COLUMNS] for r in rows]
    widths = [max(len(headers[i]), *(len(c[i]) for c in cells)) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    for c in cells:
        lines.append("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
    for r in rows:
        skipped = r.get("skipped_logs") or []
        note = f"; skipped {', '.join(skipped)} (no training rows: an evaluation)" if skipped else ""
        lines.append(f"  {r['run']}: read {', '.join(r['log'])}{note}")
    evaluated = [(r["run"], e) for r in rows for e in r.get("evaluations") or []]
    if evaluated:
        lines.append("evaluations (sparsetrain validate / test; not part of the curves):")
        for label, e in evaluated:
            numbers = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(e["metrics"].items()))
            ckpt = Path(str(e.get("checkpoint", "?"))).name
            lines.append(f"  {label}: {e.get('command', '?')} of {ckpt} (after {_fmt(e.get('step'))} steps): {numbers}")
    return "\n".join(lines)


def plot(runs: Sequence[Run], dense: Optional[Run], out: Path) -> Path:
    """Draw the four panels into ``out`` (PNG) with matplotlib's Agg backend; returns ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_gap, ax_flip, ax_zero = fig.subplots(2, 2).ravel()
    palette = [f"C{i}" for i in range(10)]
    everyone = list(runs) + ([dense] if dense is not None else [])
    for i, run in enumerate(everyone):
        is_dense = dense is not None and run is dense
        color = "black" if is_dense else palette[i % len(palette)]
        name = f"{run.label} (dense)" if is_dense else run.label
        if run.series.get(TRAIN_LOSS):
            s, v = zip(*run.series[TRAIN_LOSS])
            ax_loss.plot(s, v, color=color, alpha=0.35, linewidth=0.8, label=f"{name} train")
        if run.series.get(VAL_LOSS):
            s, v = zip(*run.series[VAL_LOSS])
            ax_loss.plot(s, v, color=color, marker="o", linewidth=1.8, label=f"{name} val")
        if is_dense:
            continue
        for ax, key in ((ax_flip, FLIP_RATE), (ax_zero, ZERO_FRACTION)):
            if run.series.get(key):
                s, v = zip(*run.series[key])
                ax.plot(s, v, color=color, linewidth=1.2, label=name)
        if dense is not None:
            gap = val_gap(run, dense)
            if gap:
                s, v = zip(*gap)
                ax_gap.plot(s, v, color=color, marker="o", label=name)
    ax_loss.set(title="loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax_gap.set(title="val loss gap to dense", xlabel="step", ylabel="val/loss - dense val/loss")
    if dense is None or not dense.series.get(VAL_LOSS):
        note = "no dense run given\n(--dense RUN_DIR)" if dense is None else "the dense run logged no val/loss"
        ax_gap.text(0.5, 0.5, note, ha="center", va="center", transform=ax_gap.transAxes, color="gray")
    else:
        ax_gap.axhline(0.0, color="black", linewidth=0.8)
    ax_flip.set(title="mask flip rate", xlabel="step", ylabel="fraction of mask entries changed per step")
    ax_zero.set(title="zero fraction of target layers", xlabel="step", ylabel="fraction of zero weights")
    for ax in (ax_loss, ax_gap, ax_flip, ax_zero):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _labels(dirs: Sequence[str]) -> list[str]:
    # The paths as given, unless two would read the same; then their absolute paths.
    return list(dirs) if len(set(dirs)) == len(dirs) else [str(Path(d).resolve()) for d in dirs]


def _fail(message: str) -> int:
    # One line, no usage dump: the arguments parsed, it is the runs they name that are wrong.
    print(f"sparsetrain report: error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``sparsetrain report``."""
    p = argparse.ArgumentParser(
        prog="sparsetrain report",
        description=(
            "Plot train/val loss, the val-loss gap to a dense run, mask flip rate and zero fraction over "
            "steps from runs' CSV logs into one PNG, and print each run's final numbers. A directory with "
            "several metrics.csv below it is read from the newest version_N (see --merge-versions)."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="a run directory (or any directory above its metrics.csv, or the file itself)")
    p.add_argument("--dense", metavar="RUN_DIR", help="a dense run to compare against: adds the val-loss gap")
    p.add_argument("--out", default="report.png", help="the PNG to write (default: report.png)")
    p.add_argument("--json", metavar="FILE", help="also write the final numbers as JSON")
    p.add_argument("--merge-versions", action="store_true",
                   help="read every version_N log below RUN_DIR in order, not just the newest (a resumed run)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        runs = [load_run(d, args.merge_versions, label) for d, label in zip(args.runs, _labels(args.runs))]
        dense = load_run(args.dense, args.merge_versions) if args.dense else None
    except (ReportError, OSError, ValueError) as e:
        return _fail(str(e))
    if dense is not None and not dense.series.get(VAL_LOSS):
        # The other panels are still worth drawing; the gap panel says why it is empty.
        print(f"sparsetrain report: note: --dense {args.dense!r} logged no val/loss (it never validated), "
              "so the val gap is left out", file=sys.stderr)
    rows = [summary(r, dense) for r in runs]
    if dense is not None:
        rows.append(summary(dense) | {"run": f"{dense.label} (dense)"})
    print(format_table(rows))
    png = plot(runs, dense, Path(args.out))
    print(f"Wrote {png}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
