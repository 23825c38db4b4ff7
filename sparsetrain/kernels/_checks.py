"""Argument checks shared by the math layers (`kernels` and `ops`), in plain Python.

They live here, at the bottom of the package, because the kernels validate their own arguments
(they are public entry points) and may import nothing above them; `ops` re-exports both names.
"""

from __future__ import annotations

__all__ = ["check_nm", "fmt_choices", "MVUE_CHOICES", "check_mvue_method", "PROJECTION_MODES"]

# The projections W -> W~ a method maps to: the N:M projection, or S-STE's scaled soft threshold.
PROJECTION_MODES = ("hard", "soft")

# The unbiased 2:4 estimators of `ops.mvue` and their kernel twin; `SparsityConfig.mvue` adds None
# (exact gradients).
MVUE_CHOICES = ("exact", "approx")


def fmt_choices(choices) -> str:
    """Valid choices as an error message lists them: ``'a', 'b', None``."""
    return ", ".join(repr(c) for c in choices)


def check_nm(n: int, m: int) -> None:
    """Raise a `ValueError` unless ``0 < n < m`` are integers."""
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__})")
    if m < 2:
        raise ValueError(f"`m` must be at least 2, got m={m}")
    if not 0 < n < m:
        raise ValueError(f"`n` must satisfy 0 < n < m, got n={n}, m={m}")


def check_mvue_method(method: str) -> None:
    """Raise a `ValueError` unless ``method`` names an MVUE estimator."""
    if method not in MVUE_CHOICES:
        raise ValueError(f"Unknown MVUE `method`={method!r}; valid choices: {fmt_choices(MVUE_CHOICES)}")
