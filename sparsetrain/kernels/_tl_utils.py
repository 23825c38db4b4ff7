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


def store_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel writes into: bf16 outputs are written as their int16 bit patterns."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t
