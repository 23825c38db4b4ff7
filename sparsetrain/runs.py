"""Run directories and checkpoints: where a `sparsetrain fit` run writes, and which checkpoint to use.

A run lives in its own directory under the recipe's ``trainer.default_root_dir``::

    runs/tiny-s-ste/                  trainer.default_root_dir (one per recipe)
      run_3/                          one run: ``--run_name`` or the next free ``run_N``
        checkpoints/*.ckpt            this run's checkpoints (``save_top_k`` counts here)
        logs/version_0/metrics.csv    CSV logs; a resume adds version_1, ...
        logs/version_0/config.yaml    the full config the run was started with
        evaluations.jsonl             `validate` / `test` results: command, checkpoint, step, metrics

Nothing here imports Lightning; torch only where a checkpoint is read.
"""

from __future__ import annotations

import difflib
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "CheckpointError",
    "RUN_PREFIX",
    "new_run_dir",
    "find_runs",
    "latest_run",
    "run_checkpoints",
    "checkpoint_problem",
    "latest_good_checkpoint",
    "resolve_checkpoint",
    "load_checkpoint",
    "run_dir_of",
    "config_mismatch",
    "closest",
    "EVALUATIONS",
    "read_evaluations",
]

RUN_PREFIX = "run_"
CKPT_DIR = "checkpoints"
# `sparsetrain validate` / `test` results of a run, one JSON object per line (see `read_evaluations`).
EVALUATIONS = "evaluations.jsonl"

# Fields of `CausalLMModule` that fix the shape of the model's parameters: a checkpoint cannot be
# loaded into a model built with other values. (`vocab_size` follows the data's tokenizer when the
# model is built, so the CLI compares `data.tokenizer` instead.) `activation` leaves the shapes
# alone but changes the function the weights were trained for, so a resume must match it too.
MODEL_SHAPE_FIELDS = ("model_type", "n_layer", "n_head", "n_embd", "block_size", "n_inner",
                      "n_kv_head", "tie_word_embeddings", "pad_vocab_to", "hf_config", "activation")
# The `SparsityConfig` fields a resume must keep are its "math" and "schedule" fields, as the
# config declares them (`sparsetrain.config.resume_fields`; read when a checkpoint is, so that this
# module imports no torch).


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used; the message says why and what to do instead."""


def closest(name: str, valid) -> Optional[str]:
    """The valid name closest to ``name`` (a likely typo), or None."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return match[0] if match else None


# ------------------------------------------------------------------------------------------ runs

def _run_number(p: Path) -> Optional[int]:
    m = re.fullmatch(re.escape(RUN_PREFIX) + r"(\d+)", p.name)
    return int(m.group(1)) if m else None


def new_run_dir(root: Path, name: Optional[str] = None) -> Path:
    """The directory of a new run under ``root``: ``root/name``, or ``root/run_N`` with the next free N.

    The directory is not created. A ``name`` that is taken already is an error: a new run never
    writes into another run's directory (resume it with ``--ckpt_path last`` instead).
    """
    root = Path(root)
    if name is not None:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"`run_name`={name!r} must be a plain directory name")
        path = root / name
        if path.exists() and any(path.iterdir()):
            raise ValueError(f"run {str(path)!r} exists already; pick another `--run_name`, or resume it "
                             f"with `--run_name {name} --ckpt_path last`")
        return path
    taken = [n for n in (_run_number(p) for p in root.glob(RUN_PREFIX + "*")) if n is not None]
    return root / f"{RUN_PREFIX}{max(taken, default=-1) + 1}"


def find_runs(root: Path) -> List[Path]:
    """Run directories under ``root`` (those with a ``checkpoints`` folder), oldest first by last write."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / CKPT_DIR).is_dir() and run_checkpoints(p)]
    return sorted(runs, key=lambda p: max(c.stat().st_mtime for c in run_checkpoints(p)))


def latest_run(root: Path) -> Optional[Path]:
    """The run under ``root`` that wrote a checkpoint last, or None."""
    runs = find_runs(root)
    return runs[-1] if runs else None


def run_checkpoints(run_dir: Path) -> List[Path]:
    """The ``.ckpt`` files of a run, newest first (``last.ckpt`` before a step checkpoint of the same time)."""
    ckpts = [p for p in (Path(run_dir) / CKPT_DIR).glob("*.ckpt") if p.is_file()]
    return sorted(ckpts, key=lambda p: (p.stat().st_mtime, p.name.startswith("last")), reverse=True)


def run_dir_of(ckpt: Path) -> Optional[Path]:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/x.ckpt`` -> ``RUN``), else None."""
    ckpt = Path(ckpt).resolve()
    return ckpt.parent.parent if ckpt.parent.name == CKPT_DIR else None


def read_evaluations(run_dir: Path) -> List[Dict[str, Any]]:
    """The `validate` / `test` records of a run, oldest first (lines that do not parse are skipped).

    Each is ``{"command", "checkpoint", "step", "metrics": {name: value}, "time"}``.
    """
    import json

    path = Path(run_dir) / EVALUATIONS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a killed process
            continue
        if isinstance(record, dict) and isinstance(record.get("metrics"), dict):
            records.append(record)
    return records


# ------------------------------------------------------------------------------------------ checkpoints

def checkpoint_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a readable checkpoint (missing, empty, truncated, not a torch file), or None.

    A torch checkpoint is a zip archive whose central directory sits at the end of the file, so a
    write cut short (a killed run, a full disk) loses it; this check reads only the directory.
    """
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a directory"
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK"):
            return f"is truncated ({size} bytes; the write was cut short)"
        return "is not a PyTorch checkpoint"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return f"is damaged ({e})"
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return "is a zip file but not a PyTorch checkpoint"
    return None


def latest_good_checkpoint(run_dir: Path) -> Path:
    """The newest readable checkpoint of a run.

    Raises:
        CheckpointError: the run has no checkpoint, or its newest one is unreadable (the message
            names it and offers the newest good one: that one is never taken silently).
    """
    run_dir = Path(run_dir)
    ckpts = run_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"run {str(run_dir)!r} has no checkpoint in {str(run_dir / CKPT_DIR)!r}")
    problem = checkpoint_problem(ckpts[0])
    if problem is None:
        return ckpts[0]
    good = next((c for c in ckpts[1:] if checkpoint_problem(c) is None), None)
    offer = (f"the newest good one is {str(good)!r}: pass that path to use it" if good is not None
             else "the run has no other readable checkpoint")
    raise CheckpointError(f"{str(ckpts[0])!r} {problem} (the newest checkpoint of run {str(run_dir)!r}); {offer}")


def resolve_checkpoint(path: str, *, root: Optional[Path] = None, run_name: Optional[str] = None,
                       what: str = "ckpt_path") -> Path:
    """A checkpoint file from what a user typed.

    Args:
        path: a ``.ckpt`` file, a run directory (its newest good checkpoint), or ``"last"``: the newest
            good checkpoint of run ``run_name`` under ``root``, or of the run under ``root`` that
            wrote a checkpoint last.
        root: the runs' root (``trainer.default_root_dir``), for ``"last"``.
        run_name: the run, for ``"last"``.
        what: the argument's name in messages.

    Raises:
        CheckpointError: nothing usable; the message names the argument, the path and the problem.
    """
    if path == "last":
        if root is None:
            raise CheckpointError(f"`{what}`='last' needs `trainer.default_root_dir` (where the runs are)")
        root = Path(root)
        if run_name is not None:
            run = root / run_name
            if not run.is_dir():
                raise CheckpointError(f"`{what}`='last': run {str(run)!r} does not exist; runs under {str(root)!r}: "
                                      f"{', '.join(p.name for p in find_runs(root)) or 'none'}")
        else:
            run = latest_run(root)
            if run is None:
                raise CheckpointError(f"`{what}`='last': no run with a checkpoint under {str(root)!r}; "
                                      "train one first, or pass a .ckpt path")
        return latest_good_checkpoint(run)
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / CKPT_DIR).is_dir():
            return latest_good_checkpoint(p)
        raise CheckpointError(f"`{what}`={path!r} is a directory but not a run directory (no {CKPT_DIR}/ inside)")
    problem = checkpoint_problem(p)
    if problem is not None:
        hint = ""
        run = run_dir_of(p)
        if run is not None and run.is_dir():
            good = next((c for c in run_checkpoints(run) if checkpoint_problem(c) is None), None)
            if good is not None:
                hint = f"; the newest good one is {str(good)!r}: pass that path to use it"
        raise CheckpointError(f"`{what}`={path!r} {problem}{hint}")
    return p


def load_checkpoint(path: Path, what: str = "ckpt_path") -> Dict[str, Any]:
    """``torch.load`` of a checkpoint on the CPU, memory-mapped; a failure is a `CheckpointError`."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"`{what}`={str(path)!r} cannot be read: {first}") from e


# ------------------------------------------------------------------------------------------ resume checks


def config_mismatch(ckpt: Dict[str, Any], model: Dict[str, Any], sparsity: Optional[Dict[str, Any]]
                    ) -> Optional[Tuple[str, Any, Any]]:
    """The first field in which a run's config and the checkpoint it resumes differ in a way that matters.

    Args:
        ckpt: the loaded checkpoint (``hyper_parameters`` and ``sparsity_config`` are read).
        model: the model section of the new run (its constructor arguments).
        sparsity: the sparsity section of the new run (`SparsityConfig` fields), or None.

    Returns:
        ``("model.n_embd", checkpoint value, new value)``, or None when the run can resume.
    """
    from .config import field_info, resume_fields, resume_value

    hp = ckpt.get("hyper_parameters") or {}
    for field in MODEL_SHAPE_FIELDS:
        if field in hp and field in model and resume_value(hp[field]) != resume_value(model[field]):
            return f"model.{field}", hp[field], model[field]
    old = ckpt.get("sparsity_config")
    if old is None:
        old = {"method": "dense"} if "hyper_parameters" in ckpt else None
    if old is not None and sparsity is not None:
        from . import methods

        default = field_info("method")["default"]
        old_method, new_method = old.get("method", default), sparsity.get("method", default)
        if old_method != new_method:
            return "sparsity.method", old_method, new_method
        if old_method in methods.names() and not methods.get(old_method).sparse \
                and old.get("activation_sparsity") is None and sparsity.get("activation_sparsity") is None:
            return None  # the baseline: the other fields act on nothing
        for field in resume_fields():
            if field in old and field in sparsity and resume_value(old[field]) != resume_value(sparsity[field]):
                return f"sparsity.{field}", old[field], sparsity[field]
    return None
