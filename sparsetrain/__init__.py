"""sparsetrain: 2:4 and N:M sparse pre-training and pruning for PyTorch and Lightning.

Example:
    >>> import sparsetrain as st
    >>> cfg = st.SparsityConfig(method="s-ste", n=2, m=4, targets="mlp", mvue="exact")
    >>> sparsity = st.Sparsifier(model, cfg)                 # any loop: swap, then
    >>> sparsity.attach(optimizer, max_steps=10_000)         # per-step rules on optimizer.step()
    >>> trainer = L.Trainer(callbacks=[st.SparseTraining(cfg)])           # Lightning
    >>> trainer = transformers.Trainer(model, args, callbacks=[st.SparseTrainerCallback(sparsity)])
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Every public name loads on first use (PEP 562), so `import sparsetrain` and the `sparsetrain`
# command's help cost neither torch nor Lightning (Lightning alone took 3.4 s of a 5.5 s import);
# layer-only users never load Lightning, and a base install (torch and numpy only) imports every
# name but the Lightning, `transformers` and app ones, which name their extra when it is missing.
# Name -> (module, attribute; None for the module itself).
_LAZY = {
    "ops": ("sparsetrain.ops", None),
    "SparsityConfig": ("sparsetrain.config", "SparsityConfig"),
    "SparseLinear": ("sparsetrain.nn", "SparseLinear"),
    "sparsify": ("sparsetrain.nn", "sparsify"),
    "densify": ("sparsetrain.nn", "densify"),
    "export": ("sparsetrain.nn", "export"),
    "sparse_layers": ("sparsetrain.nn", "sparse_layers"),
    "Sparsifier": ("sparsetrain.engine", "Sparsifier"),
    "SparseTraining": ("sparsetrain.callbacks", "SparseTraining"),  # imports Lightning
    "SparseTrainerCallback": ("sparsetrain.integrations.transformers", "SparseTrainerCallback"),
    "TextDataModule": ("sparsetrain.data", "TextDataModule"),
    "CausalLMModule": ("sparsetrain.models", "CausalLMModule"),
    "pruning": ("sparsetrain.pruning", None),
    "prune": ("sparsetrain.pruning", "prune"),
}

if TYPE_CHECKING:  # static tools see the real names
    from . import ops, pruning
    from .callbacks import SparseTraining
    from .config import SparsityConfig
    from .data import TextDataModule
    from .engine import Sparsifier
    from .integrations.transformers import SparseTrainerCallback
    from .models import CausalLMModule
    from .nn import SparseLinear, densify, export, sparse_layers, sparsify
    from .pruning import prune


# Names that need an optional extra (see `sparsetrain._extras`); everything else runs on torch alone.
_EXTRA = {"SparseTraining": "lightning", "SparseTrainerCallback": "hf", "TextDataModule": "app",
          "CausalLMModule": "app"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            from ._extras import from_import_error

            nicer = from_import_error(err, f"sparsetrain.{name}", _EXTRA.get(name))
            if nicer is None:
                raise
            raise nicer from err
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'sparsetrain' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "SparsityConfig",
    "Sparsifier",
    "SparseTrainerCallback",
    "SparseLinear",
    "SparseTraining",
    "sparsify",
    "densify",
    "export",
    "sparse_layers",
    "ops",
    "TextDataModule",
    "CausalLMModule",
    "pruning",
    "prune",
]
