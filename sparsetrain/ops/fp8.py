"""Per-tensor scaled FP8, as in S-STE's recipe: e4m3 for forward operands, e5m2 for backward ones.

A tensor ``x`` is stored as ``q = cast(x * scale)`` with ``scale = max_finite(dtype) / amax(|x|)``,
so its largest entry lands on the format's largest finite value, and is read back as
``q / scale``. On sm89/sm90 `scaled_mm` runs the product in real FP8 (``torch._scaled_mm``); on
every other device it multiplies the round-tripped tensors, which has the same rounding of the
operands and so lets CPU tests cover the numerics.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "FORWARD_DTYPE",
    "BACKWARD_DTYPE",
    "FP8_DTYPES",
    "fp8_scale",
    "fp8_quantize",
    "fp8_cast_roundtrip",
    "fp8_gemm_supported",
    "scaled_mm",
]

FORWARD_DTYPE = torch.float8_e4m3fn  # 3 mantissa bits, max 448: activations and weights
BACKWARD_DTYPE = torch.float8_e5m2  # 2 mantissa bits, max 57344: gradients need the range
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Keeps the scale finite for an all-zero (or denormal-tiny) tensor.
_AMAX_FLOOR = 1e-12


def _check_fp8_dtype(dtype) -> None:
    if dtype not in FP8_DTYPES:
        raise ValueError(f"`dtype` must be one of {', '.join(map(str, FP8_DTYPES))}, got {dtype}")


def fp8_scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-tensor scale ``max_finite(dtype) / amax(|x|)`` as a 0-dim float32 tensor on ``x``'s device.

    Computed on the device without host synchronisation. An all-zero ``x`` gets the scale of
    amax = 1e-12 (any finite scale works for zeros).

    Example:
        >>> fp8_scale(torch.tensor([1.0, -2.0]), torch.float8_e4m3fn)
        tensor(224.)
    """
    _check_fp8_dtype(dtype)
    if not x.is_floating_point():
        raise TypeError(f"`x` must be a floating tensor, got dtype {x.dtype}")
    amax = x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    return torch.finfo(dtype).max / amax.clamp_min(_AMAX_FLOOR)


def fp8_quantize(x: torch.Tensor, dtype: torch.dtype, scale: Optional[torch.Tensor] = None):
    """``(q, scale)``: ``q = (x * scale)`` cast to ``dtype`` (saturated to its finite range)."""
    if scale is None:
        scale = fp8_scale(x, dtype)
    _check_fp8_dtype(dtype)
    fmax = torch.finfo(dtype).max
    # Clamp first: e4m3fn has no inf, and an out-of-range cast would give NaN.
    q = (x.float() * scale).clamp_(-fmax, fmax).to(dtype)
    return q, scale


def fp8_cast_roundtrip(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` quantised to per-tensor scaled ``dtype`` and back, in ``x``'s dtype.

    What a real FP8 GEMM sees of its operand, on any device. Not differentiable through the
    rounding (the backends call it inside their autograd functions).

    Example:
        >>> fp8_cast_roundtrip(torch.tensor([1.0, 0.3]), torch.float8_e4m3fn)
        tensor([1.0000, 0.2857])
    """
    q, scale = fp8_quantize(x, dtype)
    return (q.float() / scale).to(x.dtype)


def fp8_gemm_supported(device: torch.device) -> bool:
    """True on CUDA devices of compute capability 8.9 or newer (Ada, Hopper), where
    ``torch._scaled_mm`` runs FP8 tensor-core GEMMs."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_dtype: torch.dtype = FORWARD_DTYPE,
    b_dtype: torch.dtype = FORWARD_DTYPE,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``a @ b`` with both operands per-tensor scaled to FP8 (``a_dtype``, ``b_dtype``).

    On sm89+ this is one ``torch._scaled_mm`` call (FP8 tensor cores, float32 accumulation); it
    needs ``b`` column-major, which ``b.t().contiguous().t()`` gives, and both inner dims multiple
    of 16 (otherwise the simulated path runs). e5m2 x e5m2 has no FP8 kernel, so the ``a`` of a
    backward product should be the e5m2 one and ``b`` e4m3. Elsewhere: the round-tripped operands
    are multiplied in ``out_dtype`` (default ``a``'s dtype).
    """
    _check_fp8_dtype(a_dtype)
    _check_fp8_dtype(b_dtype)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"`a` and `b` must be 2-D and chainable, got {tuple(a.shape)} and {tuple(b.shape)}")
    out_dtype = out_dtype or a.dtype
    real = (
        fp8_gemm_supported(a.device)
        and not (a_dtype == b_dtype == torch.float8_e5m2)
        and all(d % 16 == 0 for d in (*a.shape, *b.shape))
    )
    if real:
        qa, sa = fp8_quantize(a, a_dtype)
        qb, sb = fp8_quantize(b, b_dtype)
        qb = qb.t().contiguous().t()  # column-major second operand, as cuBLASLt FP8 requires
        # _scaled_mm multiplies by scale_a * scale_b: pass the de-quantisation factors.
        return torch._scaled_mm(qa, qb, (1.0 / sa).float(), (1.0 / sb).float(), out_dtype=out_dtype)
    qa = fp8_cast_roundtrip(a.float(), a_dtype)
    qb = fp8_cast_roundtrip(b.float(), b_dtype)
    return (qa @ qb).to(out_dtype)
