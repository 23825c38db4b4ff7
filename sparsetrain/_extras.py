"""Which optional extra brings which package, and the error that names it.

``pip install sparsetrain`` brings torch and numpy (and Triton on Linux x86-64): enough for the
layers, the engine (`Sparsifier` in any loop), the ops and one-shot pruning. The rest comes with
extras declared in ``pyproject.toml``:

* ``[lightning]``: the Lightning callback `SparseTraining`;
* ``[hf]``: the `transformers` Trainer callback and GPT-2 style models;
* ``[app]``: the ``sparsetrain`` command and its recipes (both of the above, plus data loading,
  tokenizers, the config parser and plots);
* ``[dev]``: the app and the test tools.

This module imports nothing from sparsetrain (and nothing heavy), so any layer may use it.
"""

from __future__ import annotations

import importlib.util
from typing import Iterable

# import name -> the extra that installs it (the smallest one that does)
PROVIDED_BY = {
    "lightning": "lightning",
    "transformers": "hf",
    "accelerate": "hf",
    "torchmetrics": "app",
    "jsonargparse": "app",
    "datasets": "app",
    "tokenizers": "app",
    "matplotlib": "app",
    "yaml": "app",
    "tqdm": "app",
    "scipy": "app",
}


class MissingExtra(ModuleNotFoundError):
    """A package of an optional extra is not installed. ``name`` is the missing module, so code
    that handles a ModuleNotFoundError by its name keeps working."""


def missing(modules: Iterable[str]) -> list[str]:
    """The top-level modules of ``modules`` that cannot be imported here (found without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def message(what: str, extra: str, modules: Iterable[str]) -> str:
    mods = ", ".join(f"`{m}`" for m in modules)
    return f"{what} needs the {extra} extra ({mods} not installed): pip install 'sparsetrain[{extra}]'"


def require(what: str, extra: str, modules: Iterable[str]) -> None:
    """Raise `MissingExtra` naming ``extra`` when any of ``modules`` is not installed."""
    absent = missing(modules)
    if absent:
        raise MissingExtra(message(what, extra, absent), name=absent[0])


def from_import_error(err: ModuleNotFoundError, what: str, extra: str | None = None):
    """`MissingExtra` for ``err`` when it is a missing optional package (and not, say, a typo
    inside sparsetrain); None otherwise. ``extra`` defaults to the one that provides the package."""
    top = (err.name or "").split(".")[0]
    if top not in PROVIDED_BY or not missing([top]):
        return None
    return MissingExtra(message(what, extra or PROVIDED_BY[top], [top]), name=top)
