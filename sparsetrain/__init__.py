"""sparsetrain: 2:4 and N:M sparse pre-training and pruning for PyTorch and Lightning.

Example:
    >>> import sparsetrain as st
    >>> cfg = st.SparsityConfig(method="s-ste", n=2, m=4, targets="mlp", mvue="exact")
    >>> sparsity = st.Sparsifier(model, cfg)                 # any loop: swap, then
    >>> sparsity.attach(optimizer, max_steps=10_000)         # per-step rules on optimizer.step()
    >>> trainer = L.Trainer(callbacks=[st.SparseTraining(cfg)])           # Lightning
    >>> trainer = transformers.Trainer(model, args, callbacks=[st.SparseTrainerCallback(sparsity)])
"""

from . import ops
from .config import SparsityConfig
from .engine import Sparsifier
from .nn import SparseLinear, densify, export, sparse_layers, sparsify

__version__ = "0.1.0"

# Heavier parts load on first use, so `import sparsetrain` stays quick for layer-only users.
_LAZY = {
    "SparseTraining": ("sparsetrain.callbacks", "SparseTraining"),  # imports Lightning
    "SparseTrainerCallback": ("sparsetrain.integrations.transformers", "SparseTrainerCallback"),
    "TextDataModule": ("sparsetrain.data", "TextDataModule"),
    "CausalLMModule": ("sparsetrain.models", "CausalLMModule"),
    "pruning": ("sparsetrain.pruning", None),
    "prune": ("sparsetrain.pruning", "prune"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'sparsetrain' has no attribute {name!r}")

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
