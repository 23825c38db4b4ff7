"""One-shot N:M pruning of trained models: magnitude, Wanda, SparseGPT and the 2:4 proximal
operator of Kübler et al. (2025), each optionally followed by masked refinement.

Example:
    >>> from sparsetrain.pruning import prune
    >>> report = prune(model, calibration_batches, method="prox")  # doctest: +SKIP
    >>> print(report)  # doctest: +SKIP
"""

from .calibration import GramCollector, find_blocks, select_targets
from .methods import local_loss, magnitude_prune, sparsegpt_prune, wanda_prune
from .prox import prox_2to4, prox_prune, regularizer_2to4
from .prune import PRUNE_METHODS, LayerReport, PruneReport, prune
from .refine import REFINE_SOLVERS, refine_masked
from .registry import MID_TRAINING_PRUNERS, PRUNERS, Pruner

__all__ = [
    "prune",
    "PruneReport",
    "LayerReport",
    "PRUNE_METHODS",
    "PRUNERS",
    "MID_TRAINING_PRUNERS",
    "Pruner",
    "prox_2to4",
    "regularizer_2to4",
    "prox_prune",
    "refine_masked",
    "REFINE_SOLVERS",
    "local_loss",
    "magnitude_prune",
    "wanda_prune",
    "sparsegpt_prune",
    "GramCollector",
    "find_blocks",
    "select_targets",
]
