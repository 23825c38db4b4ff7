"""`sparsetrain fit` wall time by CPU thread setting, with other processes keeping cores busy.

Runs the default recipe for ``--steps`` steps three ways, side by side in one run: torch's default
(one thread per core: ``--threads <cores>``), ``--threads 1``, and the default of ``sparsetrain fit``
(no ``--threads``: the cores not busy with other processes). ``--busy K`` starts K spinning processes
first, to stand in for the other jobs of a shared machine. Writes ``benchmarks/results/fit_threads.json``.

    python benchmarks/fit_threads.py [--steps 100] [--busy 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stamp import stamp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _fit(root: str, steps: int, threads) -> dict:
    cmd = [sys.executable, "-m", "sparsetrain.cli", "fit", "--config", str(REPO / "recipes" / "tiny-s-ste.yaml"),
           "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", root]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    wall = float(re.search(r"wall time ([\d.]+) s", out).group(1))
    chosen = re.search(r"threads: (\d+)", out).group(1)
    return {"fit_wall_s": wall, "threads": int(chosen), "steps_per_s": round(steps / wall, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--busy", type=int, default=1, help="spinning processes started first")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    started = stamp()  # before the spinners: its load average is the machine's own
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    stop = mp.Event()
    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for s in spinners:
        s.start()
    time.sleep(2)
    table = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, threads in ((f"torch default ({cores} threads)", cores), ("--threads 1", 1),
                                  ("sparsetrain default (auto)", None)):
                table[name] = _fit(tmp, args.steps, threads)
                print(f"{name:32s} {table[name]}")
    finally:
        stop.set()
        for s in spinners:
            s.join(timeout=5)
    base = table[f"torch default ({cores} threads)"]["fit_wall_s"]
    for row in table.values():
        row["speedup_vs_torch_default"] = round(base / row["fit_wall_s"], 2)
    result = {
        "benchmark": "fit_threads",
        "stamp": started,
        "steps": args.steps,
        "busy_processes": args.busy,
        "table": table,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit_threads.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'fit_threads.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
