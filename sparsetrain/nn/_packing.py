"""Bit-packing of boolean masks: 1 bit per weight instead of a byte.

A transposable mask is real training state (it is refreshed only every few steps, so it does not
follow from the weights); it is stored packed, 8 entries per ``uint8``, in row-major order of the
flattened mask, zero-padded to a multiple of 8.
"""

from __future__ import annotations

import torch

__all__ = ["pack_mask", "unpack_mask", "packed_numel"]

_BITS = (1, 2, 4, 8, 16, 32, 64, 128)


def packed_numel(numel: int) -> int:
    """Bytes needed for ``numel`` mask entries."""
    return (numel + 7) // 8


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor -> a flat ``uint8`` tensor of ``ceil(numel / 8)`` bytes (bit k of byte i is entry 8i+k)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BITS, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of `pack_mask`: the bool tensor of ``shape``."""
    shape = torch.Size(shape)
    weights = torch.tensor(_BITS, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) & weights) != 0  # (bytes, 8)
    return bits.reshape(-1)[: shape.numel()].reshape(shape)
