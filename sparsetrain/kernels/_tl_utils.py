"""Small Triton helpers shared by the kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def round_to_bf16_bits(x):
    """Round float32 ``x`` to bfloat16 (nearest, ties to even) and return the bits as int16.

    GPUs round this way in hardware, but triton's CPU interpreter (3.x) truncates float32 ->
    bfloat16, which would make interpreted kernels differ from torch by one bf16 ulp. Doing the
    rounding in integer ops costs 5 ALU ops per element on the GPU, nothing next to the memory
    traffic of these bandwidth-bound kernels, and makes both paths bit-identical to torch.
    """
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    quiet_nan = (u >> 16) | 0x40  # keep NaN a NaN whatever its payload
    bits = tl.where(x != x, quiet_nan, rounded)
    return bits.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def bf16_bits_to_f32(bits):
    """float32 value of bfloat16 numbers loaded as their int16 bit patterns (`load_view`).

    A bf16 number is the top half of a float32, so this is exact, denormals included: triton's
    CPU interpreter flushes bf16 denormals to zero in a plain ``.to(tl.float32)``, which made the
    interpreted kernels drop entries that torch keeps.
    """
    return ((bits.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


def load_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel reads: bf16 inputs are read as their int16 bit patterns."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def store_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel writes into: bf16 outputs are written as their int16 bit patterns."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t
