"""Lightning callbacks."""

from .sparse_training import SparseTraining

__all__ = ["SparseTraining"]
