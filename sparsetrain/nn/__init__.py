"""Sparse layers and the functions that swap them into a model."""

from .convert import densify, export, select_targets, sparse_layers, sparsify
from .linear import SparseLinear

__all__ = ["SparseLinear", "sparsify", "densify", "export", "select_targets", "sparse_layers"]
