"""cuSPARSELt's compressed 2:4 operand for 16-bit types: the plain-torch reference of its layout.

``torch._cslt_compress(A)`` turns a row-major ``(rows, cols)`` fp16/bf16 matrix that is 2:4 along
its rows into one flat buffer that ``torch._cslt_sparse_mm`` reads as the structured operand. The
buffer is not documented by NVIDIA; PyTorch writes the same buffer itself in
``torch._sparse_semi_structured_tile(..., use_cutlass=False)`` (``MetadataCuSparseLt`` in
``aten/src/ATen/native/sparse/cuda/SparseSemiStructuredTile.cu``, whose comment calls the format
reverse-engineered), and that code, read as a thread program, is what this module restates in
closed form. `tests/reference.py` runs the thread program itself, lane by lane, as the reference
these formulas are tested against; the ``gpu`` tests compare both with ``torch._cslt_compress``.

For ``A`` with its 2:4 mask (exactly two kept per group of 4 consecutive columns), the buffer has
``rows*cols/2 + rows*cols/16`` elements of ``A``'s dtype:

- **values**, ``rows x cols/2`` row-major: per row, each group's two kept entries in column order;
- **metadata**, ``rows*cols/16`` 16-bit words (stored in the same dtype's bits). Each group gets a
  nibble ``i0 | i1 << 2`` (the kept positions, ``i0 < i1``); the four groups of 16 consecutive
  columns ``16c .. 16c+15`` of row ``r`` make one 16-bit word (group ``g`` at bits ``4g``). The
  words sit in 32x32 tiles of 64 words each: inside a tile, row ``r`` (0..31) and half ``h``
  (columns 0-15 or 16-31) land at ``8*(r%8) + 4*(r//16) + 2*h + (r//8)%2``; tiles go through a
  128x64 block row-tile first (4 tiles, 64 words apart), then column-tile (256 words); blocks go
  down the rows first (512 words each), then across the columns (``512 * rows/128``).

So ``rows`` and ``cols`` must be multiples of 128 (PyTorch's packer demands the same). A kept zero
is still a kept position: the mask, not the values, decides the metadata, so a group with fewer
than two non-zeros may be encoded differently from ``_cslt_compress``'s own choice; the product is
the same.

`sparsetrain.kernels.activation.sparsify_pack24_forward` is the Triton twin of `sparsify_pack24`:
the mask, ``X~`` and this buffer in one read of the activations.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .activation import sparsify_activation

__all__ = ["PACK_MULTIPLE", "packed_numel", "meta_word_positions", "pack24", "unpack24", "sparsify_pack24"]

PACK_MULTIPLE = 128  # rows and cols: the metadata is laid out in 128x64 blocks (and 32-col tiles)
_PACKED_DTYPES = (torch.float16, torch.bfloat16)


def _check_shape(rows: int, cols: int) -> None:
    if rows % PACK_MULTIPLE or cols % PACK_MULTIPLE or rows <= 0 or cols <= 0:
        raise ValueError(
            f"cuSPARSELt's packed 2:4 layout needs rows and cols that are positive multiples of "
            f"{PACK_MULTIPLE}, got ({rows}, {cols}); pad the rows (tokens) with zeros first"
        )


def packed_numel(rows: int, cols: int) -> int:
    """Elements of the flat buffer: ``rows*cols/2`` values plus ``rows*cols/16`` metadata words."""
    _check_shape(rows, cols)
    return rows * cols // 2 + rows * cols // 16


def meta_word_positions(rows: int, cols: int, device=None) -> torch.Tensor:
    """``(rows, cols/16)`` int64: where each row's 16-column metadata word sits among the words."""
    _check_shape(rows, cols)
    r = torch.arange(rows, device=device)[:, None]  # (rows, 1)
    c = torch.arange(0, cols, 16, device=device)[None, :]  # (1, cols/16): first column of the word
    block = (r // 128) * 512 + (c // 64) * (512 * (rows // 128))
    tile = ((r % 128) // 32) * 64 + ((c % 64) // 32) * 256
    r32 = r % 32
    inside = 8 * (r32 % 8) + 4 * (r32 // 16) + 2 * ((c % 32) // 16) + (r32 // 8) % 2
    return block + tile + inside


def _check_operand(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"`{name}` must be 2-D (rows, cols), got shape {tuple(x.shape)}")
    if x.dtype not in _PACKED_DTYPES:
        raise TypeError(f"`{name}` must be float16 or bfloat16 for cuSPARSELt's packed layout, got {x.dtype}")
    _check_shape(*x.shape)


def pack24(x_tilde: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The flat buffer ``torch._cslt_compress(x_tilde)`` returns, given the 2:4 mask that made it.

    Args:
        x_tilde: ``(rows, cols)`` float16/bfloat16, zero where ``mask`` is False.
        mask: ``(rows, cols)`` bool with exactly two True in every group of 4 along the rows.

    Example:
        >>> x = torch.zeros(128, 128, dtype=torch.float16)
        >>> x[:, 1::4] = 1.0; x[:, 2::4] = 2.0
        >>> buf = pack24(x, x != 0)
        >>> buf[:4].tolist(), buf.numel()
        ([1.0, 2.0, 1.0, 2.0], 9216)
    """
    _check_operand(x_tilde, "x_tilde")
    rows, cols = x_tilde.shape
    if mask.shape != x_tilde.shape or mask.dtype != torch.bool:
        raise ValueError(f"`mask` must be a bool tensor of shape {tuple(x_tilde.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    groups = mask.reshape(rows, cols // 4, 4)
    if not bool((groups.sum(-1) == 2).all()):
        raise ValueError("`mask` must keep exactly 2 of every 4 consecutive columns (a 2:4 mask)")
    values = x_tilde.reshape(rows, cols // 4, 4)[groups].reshape(rows, cols // 2)  # kept, in column order
    pos = torch.arange(4, device=mask.device)
    first = torch.where(groups, pos, 4).amin(-1)  # (rows, cols/4): the lower kept position
    second = torch.where(groups, pos, -1).amax(-1)  # the higher one
    nibble = (first | (second << 2)).reshape(rows, cols // 16, 4)
    words = (nibble << (4 * pos)).sum(-1)  # (rows, cols/16): group g at bits 4g
    meta = torch.empty(rows * cols // 16, dtype=torch.int64, device=mask.device)
    meta[meta_word_positions(rows, cols, mask.device).reshape(-1)] = words.reshape(-1)
    meta16 = torch.where(meta >= 1 << 15, meta - (1 << 16), meta).to(torch.int16)  # two's complement bits
    return torch.cat([values.reshape(-1), meta16.view(x_tilde.dtype)])


def unpack24(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The dense ``(rows, cols)`` matrix a packed buffer stands for (the inverse of `pack24`).

    Example:
        >>> x = torch.zeros(128, 128, dtype=torch.bfloat16); x[:, ::2] = 3.0
        >>> torch.equal(unpack24(pack24(x, x != 0), 128, 128), x)
        True
    """
    if buffer.dim() != 1 or buffer.dtype not in _PACKED_DTYPES:
        raise ValueError(f"`buffer` must be a 1-D float16/bfloat16 tensor, got {buffer.dtype} {tuple(buffer.shape)}")
    if buffer.numel() != packed_numel(rows, cols):
        raise ValueError(f"`buffer` has {buffer.numel()} elements; a ({rows}, {cols}) operand packs into {packed_numel(rows, cols)}")
    n_values = rows * cols // 2
    values = buffer[:n_values].reshape(rows, cols // 4, 2)
    meta = buffer[n_values:].view(torch.int16).to(torch.int64) & 0xFFFF
    words = meta[meta_word_positions(rows, cols, buffer.device)]  # (rows, cols/16)
    nibble = (words[..., None] >> (4 * torch.arange(4, device=buffer.device))) & 0xF  # (rows, cols/16, 4)
    nibble = nibble.reshape(rows, cols // 4)
    out = torch.zeros(rows, cols // 4, 4, dtype=buffer.dtype, device=buffer.device)
    out.scatter_(-1, torch.stack([nibble & 3, nibble >> 2], -1), values)
    return out.reshape(rows, cols)


def sparsify_pack24(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X~, mask, buffer)`` of a ``(rows, cols)`` activation: its 2:4 mask along the rows (the rule
    of `ops.nm.nm_mask`), the masked matrix and cuSPARSELt's packed buffer of it.

    The Triton twin (`kernels.sparsify_pack24`) runs on CUDA and makes all three in one pass.

    Example:
        >>> x = torch.arange(128 * 128, dtype=torch.float32).reshape(128, 128).to(torch.bfloat16)
        >>> xt, mask, buf = sparsify_pack24(x)
        >>> xt[0, :4].tolist(), buf[:2].tolist()
        ([0.0, 0.0, 2.0, 3.0], [2.0, 3.0])
    """
    from .. import kernels  # the Triton twin; imported lazily (it imports no triton itself)

    _check_operand(x, "x")
    if kernels.available(x):
        return kernels.sparsify_pack24(x)
    xt, mask = sparsify_activation(x, 2, 4)
    return xt, mask, pack24(xt, mask)
