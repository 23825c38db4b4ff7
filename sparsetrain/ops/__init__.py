"""Plain-torch reference implementations of every tensor operation sparsetrain uses.

`sparsetrain.kernels` holds faster Triton twins of some of these; they are tested against these.
"""

from .nm import check_finite, group_view, nm_mask, project_nm, soft_threshold, sste_scale
from .mvue import MVUE_CHOICES, mvue24, mvue24_probabilities
from .transposable import TRANSPOSABLE_METHODS, is_transposable_nm, transposable_error, transposable_mask
from .fp8 import fp8_cast_roundtrip, fp8_scale

__all__ = [
    "nm_mask",
    "project_nm",
    "soft_threshold",
    "sste_scale",
    "group_view",
    "check_finite",
    "mvue24",
    "mvue24_probabilities",
    "MVUE_CHOICES",
    "transposable_mask",
    "transposable_error",
    "is_transposable_nm",
    "TRANSPOSABLE_METHODS",
    "fp8_scale",
    "fp8_cast_roundtrip",
]
