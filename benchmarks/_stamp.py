"""Where a benchmark result came from: the commit, the command, the date and the machine.

Every script under ``benchmarks/`` puts ``stamp()`` into its results JSON, under the key
``"stamp"``, so a number can be traced to the code and the machine that made it::

    from _stamp import stamp              # benchmarks/ is on the path of `python benchmarks/x.py`
    started = stamp()                     # at the start: the code that runs is the code stamped
    ...
    result = {"benchmark": "x", "stamp": started, ...}

Call it before the run starts: the commit and the dirty flag then describe the code that ran,
not what the tree became while a long run went on. Files under ``benchmarks/results/`` do not
count as dirt (a run rewrites its own results file).
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Outputs, not code: a tree whose only changes are results files ran committed code.
_NOT_DIRT = ("benchmarks/results/",)
_MAX_DIRTY_PATHS = 20


def _git(args: list[str], root: Path) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                          timeout=30).stdout


def source(root: Path = REPO) -> dict:
    """``{"commit", "dirty", "dirty_paths"}`` of the checkout at ``root``; ``commit`` is None
    (with ``"git_error"``) where ``root`` is not a git checkout or git is missing (e.g. a copy of
    the tree on a GPU machine)."""
    try:
        commit = _git(["rev-parse", "HEAD"], root).strip()
        status = _git(["status", "--porcelain", "--untracked-files=all"], root)
    except (OSError, subprocess.SubprocessError) as err:
        return {"commit": None, "dirty": None, "git_error": f"{type(err).__name__}: {err}".strip()[:200]}
    # porcelain v1: "XY path" (or "XY old -> new" for renames)
    paths = [line[3:].split(" -> ")[-1].strip('"') for line in status.splitlines() if line.strip()]
    dirty = sorted(p for p in paths if not p.startswith(_NOT_DIRT))
    out = {"commit": commit, "dirty": bool(dirty)}
    if dirty:
        out["dirty_paths"] = dirty[:_MAX_DIRTY_PATHS] + ([f"... {len(dirty) - _MAX_DIRTY_PATHS} more"]
                                                         if len(dirty) > _MAX_DIRTY_PATHS else [])
    return out


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 7B13"); the architecture where the OS does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "cpu model")) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The CPU, the cores this process may use, the load at stamp time, Python, torch and the GPU.

    torch is imported here if it is installed (every benchmark uses it); ``"torch": None`` where it
    is not. ``gpu`` is None without a CUDA device."""
    info = {"cpu": cpu_model(), "arch": platform.machine(), "cores": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    try:
        # other jobs on the machine slow a timing: the 1/5/15-minute load when stamped
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    info["python"] = platform.python_version()
    info["os"] = f"{platform.system()} {platform.release()}"
    try:
        import torch
    except ImportError:
        info.update(torch=None, gpu=None)
        return info
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info


def command() -> str:
    """The command line that started this process, quoted so a shell runs it again
    (``python benchmarks/x.py --steps 10``). ``sys.orig_argv`` keeps the interpreter and its
    options (``-X importtime``), which ``sys.argv`` drops."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    if argv and os.path.isabs(argv[0]) and os.path.basename(argv[0]).startswith("python"):
        argv[0] = os.path.basename(argv[0])  # a venv's absolute path says nothing to a reader
    return shlex.join(argv)


def stamp(root: Path = REPO) -> dict:
    """``{"commit", "dirty", ["dirty_paths"], "command", "cwd", "date", "machine"}`` for a results JSON."""
    return {
        **source(root),
        "command": command(),
        "cwd": os.path.relpath(os.getcwd(), root) if Path(os.getcwd()).is_relative_to(root) else os.getcwd(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }


if __name__ == "__main__":  # `python benchmarks/_stamp.py`: what a stamp says here, now
    import json

    print(json.dumps(stamp(), indent=1))
