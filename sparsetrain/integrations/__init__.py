"""Adapters of `sparsetrain.Sparsifier` for training frameworks (imported on first use)."""
