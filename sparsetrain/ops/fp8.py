"""Per-tensor scaled FP8, as in S-STE's recipe: e4m3 for forward operands, e5m2 for backward ones.

A tensor ``x`` is stored as ``q = cast(x * scale)`` with ``scale = max_finite(dtype) / amax(|x|)``,
so its largest entry lands on the format's largest finite value, and is read back as
``q / scale``. On sm89/sm90 `scaled_mm` runs the product in real FP8 (``torch._scaled_mm``); on
every other device it multiplies the round-tripped tensors, which has the same rounding of the
operands and so lets CPU tests cover the numerics.
"""

from __future__ import annotations

import torch

__all__ = [
    "BACKWARD_DTYPE",
    "FORWARD_DTYPE",
    "FP8_DTYPES",
    "fp8_cast_roundtrip",
    "fp8_gemm_supported",
    "fp8_quantize",
    "fp8_scale",
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


def fp8_quantize(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None):
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
    out_dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a @ b (+ bias)`` with both operands per-tensor scaled to FP8 (``a_dtype``, ``b_dtype``).

    On sm89+ this is one ``torch._scaled_mm`` call (FP8 tensor cores, float32 accumulation)
    unless both operands are e5m2 (cuBLASLt has no e5m2 x e5m2 kernel: in a backward product
    ``a`` is the e5m2 gradient and ``b`` e4m3). cuBLASLt wants every dim a multiple of 16: other
    sizes (a token count of 1000, say) are zero-padded, which changes neither the product nor
    the amax scales, and the result is sliced back.
    Any layout of ``a`` and ``b`` is accepted (e.g. transposed views): the quantised ``a`` is made
    row-major and ``b`` column-major, the TN layout cuBLASLt FP8 requires. ``bias`` (shape
    ``(N,)``) is fused into the GEMM where ``_scaled_mm`` allows it (a bf16/fp16 bias with the
    same ``out_dtype``), otherwise added to the float32 product. Elsewhere: the round-tripped
    operands are multiplied in float32, ``bias`` added, and the result cast to ``out_dtype``
    (default ``a``'s dtype), which is the real path's math up to the order of float32 rounding.
    """
    _check_fp8_dtype(a_dtype)
    _check_fp8_dtype(b_dtype)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"`a` and `b` must be 2-D and chainable, got {tuple(a.shape)} and {tuple(b.shape)}")
    if bias is not None and tuple(bias.shape) != (b.shape[1],):
        raise ValueError(f"`bias` must have shape ({b.shape[1]},), got {tuple(bias.shape)}")
    out_dtype = out_dtype or a.dtype
    real = fp8_gemm_supported(a.device) and not (a_dtype == b_dtype == torch.float8_e5m2)
    if real:
        (m, k), n = a.shape, b.shape[1]
        pm, pk, pn = (-m) % 16, (-k) % 16, (-n) % 16
        if pm or pk:
            a = torch.nn.functional.pad(a, (0, pk, 0, pm))
        if pk or pn:
            b = torch.nn.functional.pad(b, (0, pn, 0, pk))
        if bias is not None and pn:
            bias = torch.nn.functional.pad(bias, (0, pn))
        qa, sa = fp8_quantize(a, a_dtype)
        qb, sb = fp8_quantize(b, b_dtype)
        # The cast keeps its input's strides: a transposed `a` would give a column-major qa.
        qa = qa.contiguous()  # row-major first operand
        qb = qb.t().contiguous().t()  # column-major second operand (no copy if already so)
        fuse = bias is not None and out_dtype in (torch.bfloat16, torch.float16) and bias.dtype == out_dtype
        mm_dtype = out_dtype if bias is None or fuse else torch.float32
        # _scaled_mm multiplies by scale_a * scale_b: pass the de-quantisation factors (0-dim fp32).
        out = torch._scaled_mm(
            qa, qb, sa.reciprocal(), sb.reciprocal(), bias=bias if fuse else None, out_dtype=mm_dtype
        )
        if bias is not None and not fuse:
            out = out.add_(bias.float()).to(out_dtype)
        return out[:m, :n] if pm or pn else out
    qa = fp8_cast_roundtrip(a.float(), a_dtype)
    qb = fp8_cast_roundtrip(b.float(), b_dtype)
    out = qa @ qb
    if bias is not None:
        out = out.add_(bias.float())
    return out.to(out_dtype)
