"""Start-up cost of `import sparsetrain` and of the `sparsetrain` command, side by side with what the
package used to load eagerly (torch, the ops, the layers and the Lightning callback).

Each case runs in a fresh interpreter, ``--repeats`` times; the table keeps the fastest wall time
(the least disturbed by other processes) and the ``python -X importtime`` total of the top-level
modules of that run. Writes ``benchmarks/results/cli_startup.json``.

    python benchmarks/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stamp import stamp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

CASES = {
    # what `import sparsetrain` costs now (everything public loads on first use)
    "import sparsetrain": "import sparsetrain",
    # the top-level help of the console script
    "sparsetrain --help": "from sparsetrain.cli import main; main(['--help'])",
    # a layer user: the package, then SparsityConfig + sparsify (torch, no Lightning)
    "import sparsetrain; st.sparsify": "import sparsetrain as st; st.sparsify; st.SparsityConfig",
    # what the old eager __init__ imported (ops, config, nn and the Lightning callback)
    "old eager import (ops, nn, callbacks)":
        "import sparsetrain.ops, sparsetrain.config, sparsetrain.nn, sparsetrain.callbacks",
    # the floor any torch user pays
    "import torch": "import torch",
    # `sparsetrain fit --help`: the short page with the sparsity options (no Lightning)
    "sparsetrain fit --help": "from sparsetrain.cli import main; main(['fit', '--help'])",
}


def _run(code: str) -> tuple[float, float, list[str]]:
    """(wall seconds, importtime total seconds, heavy modules loaded) of one fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probe = code + "; import sys; print('LOADED', [m for m in ('torch', 'lightning', 'transformers') if m in sys.modules])"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], capture_output=True, text=True,
                          env=env, check=True)
    wall = time.perf_counter() - t0
    total_us = 0
    for line in proc.stderr.splitlines():
        # "import time:  self [us] | cumulative | imported package"; top-level modules have no indent
        if line.startswith("import time:") and "|" in line:
            parts = line.split("|")
            name = parts[2]
            if parts[1].strip().isdigit() and name.startswith(" ") and not name.startswith("  "):
                total_us += int(parts[1])
    loaded = eval(next(l for l in proc.stdout.splitlines() if l.startswith("LOADED"))[len("LOADED "):])
    return wall, total_us / 1e6, loaded


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    started = stamp()
    table = {}
    for name, code in CASES.items():
        runs = [_run(code) for _ in range(args.repeats)]
        wall, imports, loaded = min(runs)
        table[name] = {"wall_s": round(wall, 3), "importtime_s": round(imports, 3), "loads": loaded,
                       "all_wall_s": [round(r[0], 3) for r in runs]}
        print(f"{name:40s} wall {wall:6.2f} s   imports {imports:6.2f} s   loads {loaded}")
    old = table["old eager import (ops, nn, callbacks)"]["wall_s"]
    for name in ("import sparsetrain", "sparsetrain --help", "import sparsetrain; st.sparsify"):
        table[name]["speedup_vs_old_eager_import"] = round(old / table[name]["wall_s"], 1)
    result = {
        "benchmark": "cli_startup",
        "stamp": started,
        "repeats": args.repeats,
        "note": "fastest of the repeats, each a fresh interpreter; importtime_s sums the top-level modules",
        "table": table,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli_startup.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'cli_startup.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
