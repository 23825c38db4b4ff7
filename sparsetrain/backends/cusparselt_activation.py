"""cuSPARSELt products for a layer whose *input* is 2:4 per token (sparse activations).

With ``X`` the tokens ``(T, in)``, ``mask`` its 2:4 mask along ``in`` (per token), ``X~ = X * mask``
and ``W~`` the ``(out, in)`` effective weight (dense, or 2:4 itself):

- forward ``Y = X~ W~^T``: ``X~`` is 2:4 along the reduction dim, so it is the structured operand:
  ``_cslt_sparse_mm(X~c, W~^T)`` with ``X~c = _cslt_compress(X~)`` (one compression per call: the
  activations change every micro-batch). ``W~^T`` is read as the transpose of the row-major
  ``W~``, so no copy is made; the result ``(T, out)`` is row-major. cuSPARSELt adds a bias per row
  of the sparse operand (per token here), so the per-feature bias is added after the product.
  With 2:4 weights too only one operand of a GEMM can be the structured one; the activations are
  chosen, so the weight needs no forward compression at all.
- input gradient ``dX = mask * (dY W~)``: the reduction runs over ``out``, along which neither
  operand is structured, so it is a dense GEMM, masked afterwards. The exception is the
  transposable weight mask: ``W~^T`` is then 2:4 along ``out`` and the product is sparse, as in the
  weight path (`backends.cusparselt`).
- weight gradient ``dW~ = dY^T X~``: the reduction runs over tokens; ``X~`` is 2:4 along features,
  not tokens, so it is dense too, unless MVUE is on (``MVUE(dY^T)`` is 2:4 along tokens and becomes
  the structured operand, as in the weight path).

`docs/sparse-activations.md` explains this choice against Haziza et al. 2025 (arXiv 2503.16672).

Making ``X~c``: when ``in`` is a multiple of 128, one Triton pass (`ops.cslt_layout.sparsify_pack24`)
writes the mask, ``X~`` and cuSPARSELt's compressed operand together, in the layout PyTorch's own
packer writes. NVIDIA does not document that layout, so it is trusted only after
`packed_layout_matches` has compared it byte for byte with ``torch._cslt_compress`` on this device
and dtype (once per process); otherwise, and for other widths, the masking kernel runs and
``torch._cslt_compress`` compresses ``X~`` afterwards (two passes).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..ops import cslt_layout
from ..ops.activation import sparsify_activation
from . import cusparselt as _cs

__all__ = ["activation_linear", "CuSparseLtActivationLinearFunction", "can_use", "packed_layout_matches",
           "compresses_fused"]

log = logging.getLogger(__name__)

_LAYOUT_MATCHES: dict = {}  # (device, dtype) -> whether our packed buffer equals _cslt_compress's


def packed_layout_matches(device, dtype) -> bool:
    """Whether `ops.cslt_layout`'s buffer is byte-equal to ``torch._cslt_compress``'s here.

    Checked once per device and dtype on a random 256x256 operand (no ties, no zeros: the buffer is
    then unique); a mismatch is logged once as a warning and the two-pass compression is used.
    """
    key = (str(torch.device(device)), dtype)
    if key not in _LAYOUT_MATCHES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 256, generator=g).to(device=device, dtype=dtype)
        why = "the buffers differ"
        try:
            xt, _, buf = cslt_layout.sparsify_pack24(x)
            ref = torch._cslt_compress(xt)
            ok = (isinstance(ref, torch.Tensor) and ref.dtype == buf.dtype and ref.shape == buf.shape
                  and torch.equal(ref.view(torch.int16), buf.view(torch.int16)))
        except Exception as err:  # noqa: BLE001 - a failing check means: do not use the fused pass
            ok, why = False, f"the check failed: {type(err).__name__}: {err}"[:300]
        if not ok:
            log.warning(
                "sparse activations: the fused 2:4 compression does not match this cuSPARSELt's "
                "layout on %s (%s; %s); compressing in two passes (mask, then torch._cslt_compress)",
                key[0], dtype, why,
            )
        _LAYOUT_MATCHES[key] = ok
    return _LAYOUT_MATCHES[key]


def compresses_fused(width: int, device, dtype) -> bool:
    """Whether inputs of ``width`` features are masked and compressed in one pass here (else two)."""
    return width % cslt_layout.PACK_MULTIPLE == 0 and packed_layout_matches(device, dtype)


def _mask_and_compress(x2: torch.Tensor):
    """``(X~, mask, X~c)`` of the ``(T, in)`` tokens; ``X~c`` covers ``T`` padded with zero rows.

    Zero rows are 2:4 whatever the mask keeps in them, and their products are cut off afterwards.
    """
    t, k = x2.shape
    if compresses_fused(k, x2.device, x2.dtype):
        xt, mask, xc = cslt_layout.sparsify_pack24(_cs._pad_rows(x2, cslt_layout.PACK_MULTIPLE))
        return xt[:t], mask[:t], xc
    xt, mask = sparsify_activation(x2, 2, 4)  # (T, in) each; the Triton kernel on CUDA
    return xt, mask, torch._cslt_compress(_cs._pad_rows(xt, _cs._SPARSE_MULTIPLE[x2.dtype]))


def can_use(weight: torch.Tensor, x: Optional[torch.Tensor] = None, dtype=None, n: int = 2, m: int = 4):
    """Whether the activation-sparse cuSPARSELt product can run, and if not why.

    The weight is the dense operand here, but the sparse operand ``X~`` is ``(tokens, in)`` with
    ``in`` a multiple of 16, and ``out`` must be a multiple of 8: `cusparselt.can_use`'s check of the
    weight (multiples of 16 in both dims) covers both.
    """
    if (n, m) != (2, 4):
        return False, f"cuSPARSELt runs 2:4 only, got activation sparsity {n}:{m}"
    dtype = dtype or weight.dtype
    if dtype == torch.float8_e4m3fn:
        return False, "FP8 is not implemented for sparse activations (the activation is compressed in bf16/fp16)"
    return _cs.can_use(weight, x, dtype)


class CuSparseLtActivationLinearFunction(torch.autograd.Function):
    """``y = (x * mask(x)) @ w_eff^T + b`` with ``X~`` as cuSPARSELt's structured operand."""

    @staticmethod
    def forward(ctx, x, w_eff, bias, mvue, generator, cache, transposable):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])  # (T, in): all leading dims are tokens
        t = x2.shape[0]
        w = w_eff.to(dtype)
        xt, mask, xc = _mask_and_compress(x2)  # X~c: (Tp, in) compressed, Tp >= T
        y = _cs._sparse_mm(xc, w.t())[:t]  # (Tp, in) x (in, out) -> (T, out)
        if bias is not None:
            y = y + bias.to(dtype)
        wtc = None
        if transposable:  # W~^T c for the input gradient; compressed once per optimizer step
            wtc = _cs._compressed_weights(w, cache, True, False)[1]
        ctx.save_for_backward(xt, mask, None if wtc is not None else w)
        ctx.wtc = wtc
        ctx.dtype = dtype
        ctx.mvue, ctx.generator = mvue, generator
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xt, mask, w = ctx.saved_tensors
        dtype = ctx.dtype
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)  # (T, out)
        t = dy2.shape[0]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if ctx.wtc is not None:
                dyp = _cs._pad_rows(dy2, _cs._DENSE_MULTIPLE[dtype])
                g = _cs._sparse_mm(ctx.wtc, dyp.t(), transpose_result=True)[:t]  # (W~^T dY^T)^T = dY W~
            else:
                g = dy2 @ w
            # The derivative of the masking: the gradient reaches the kept inputs only.
            dx = torch.where(mask, g, torch.zeros((), dtype=g.dtype, device=g.device)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if ctx.mvue is not None:
                dyp = _cs._pad_rows(dy2, _cs._TOKEN_MULTIPLE)
                xp = _cs._pad_rows(xt, _cs._TOKEN_MULTIPLE)
                g_t = _cs._mvue_tokens_t(dyp, ctx.mvue, ctx.generator)  # (out, Tp), 2:4 along tokens
                dw = _cs._sparse_mm(torch._cslt_compress(g_t), xp)  # (out, Tp) @ (Tp, in)
            else:
                dw = dy2.t() @ xt
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None


def activation_linear(x, w_eff, bias, *, mvue=None, generator=None, cache=None, transposable=False):
    """cuSPARSELt product ``(x * mask_2:4(x)) @ w_eff^T + bias``, differentiable in all three.

    Args:
        x: ``(..., in)`` CUDA input in float16/bfloat16; made 2:4 per token along ``in``.
        w_eff: ``(out, in)`` effective weight (dense, or 2:4 along ``in``).
        bias: ``(out,)`` or None.
        mvue: None (dense weight gradient) or ``"exact"``/``"approx"`` (sparse, unbiased).
        generator: `torch.Generator` on ``x``'s device for MVUE draws.
        cache: the layer's dict (``cache["key"]`` reuses the compressed ``W~^T`` when transposable).
        transposable: ``w_eff``'s mask is transposable, so the input gradient is sparse too.

    Raises:
        ValueError: when `can_use` says cuSPARSELt cannot run this product.
    """
    ok, reason = can_use(w_eff, x, x.dtype)
    if not ok:
        raise ValueError(f"`backend`='cusparselt' cannot run this layer's sparse activations: {reason}")
    return CuSparseLtActivationLinearFunction.apply(x, w_eff, bias, mvue, generator, cache, transposable)
