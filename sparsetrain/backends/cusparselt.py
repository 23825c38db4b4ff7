"""The cuSPARSELt backend: 2:4 semi-structured GEMMs on Ampere/Hopper sparse tensor cores.

With ``W~`` the 2:4 effective weight ``(out, in)``, ``X`` the tokens ``(T, in)``:

- forward ``Y = X W~^T``: ``W~`` compressed once per optimizer step, then
  ``_cslt_sparse_mm(W~c, X^T, transpose_result=True)`` writes ``Y`` row-major directly;
- weight gradient ``dW = MVUE(dY^T) X``: the MVUE kernel writes ``dY^T`` (2:4 along tokens)
  row-major, it is compressed and multiplied by ``X``; without MVUE the product is dense;
- input gradient ``dX = dY W~``: sparse as ``(W~^T)c x dY^T`` when the mask is transposable (then
  ``W~^T`` is 2:4 too), a dense GEMM otherwise.

Shapes: cuSPARSELt wants the sparse operand's dims multiples of 16 (32 in FP8) and the dense
operand's multiples of 8 (16 in FP8), as in ``torch.sparse.SparseSemiStructuredTensorCUSPARSELT``.
The weight dims are checked by `can_use`; the token count is padded with zero rows here.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..ops import fp8 as _fp8
from ..ops.mvue import draw_generator, mvue24 as _mvue24

__all__ = ["can_use", "linear", "CuSparseLtLinearFunction", "semi_structured_weight", "to_semi_structured"]

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn)
# Multiple the sparse operand's dims must be (torch's SparseSemiStructuredTensorCUSPARSELT table).
_SPARSE_MULTIPLE = {torch.float16: 16, torch.bfloat16: 16, torch.float8_e4m3fn: 32}
# Multiple the dense operand's dims must be; the token dim is padded up to it.
_DENSE_MULTIPLE = {torch.float16: 8, torch.bfloat16: 8, torch.float8_e4m3fn: 16}
# Token padding for the weight gradient, where the tokens are the sparse operand's inner dim.
_TOKEN_MULTIPLE = 32

# When True, the first product of each shape tries `_cslt_sparse_mm_search`'s algorithm and keeps
# it only if it is faster than alg 0 and gives the same result (it has been seen to return
# algorithms that are slower or wrong).
ALG_SEARCH = True
_ALG_CACHE: dict = {}


def _fmt_dtype(d) -> str:
    return str(d).replace("torch.", "")


def can_use(weight: torch.Tensor, x: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tuple[bool, str]:
    """Whether the cuSPARSELt backend can multiply by ``weight``, and if not why.

    Args:
        weight: the ``(out, in)`` weight (its device and shape matter).
        x: the input, if known (its device and last dim are checked).
        dtype: the GEMM dtype (default ``weight.dtype``): float16, bfloat16, or float8_e4m3fn
            (FP8 needs sm90+: cuSPARSELt's e4m3 kernels are Hopper ones; on sm89 PyTorch's own FP8
            sparse tests are expected failures).

    Returns:
        ``(True, "")`` or ``(False, reason)`` with a sentence naming what is missing.

    Example:
        >>> can_use(torch.zeros(64, 64))[0]
        False
    """
    dtype = dtype or weight.dtype
    # The device first: it settles every CPU layer, and torch.compile can read it where it cannot
    # trace `torch.backends.cusparselt.is_available()` (a graph break in the first forward).
    if not weight.is_cuda:
        return False, f"the weight is on {weight.device.type}; cuSPARSELt needs a CUDA device"
    if not torch.backends.cusparselt.is_available():
        return False, "this PyTorch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
    cap = torch.cuda.get_device_capability(weight.device)
    name = torch.cuda.get_device_name(weight.device)
    if cap < (8, 0):
        return False, f"{name} is sm{cap[0]}{cap[1]}; 2:4 sparse tensor cores need sm80 (Ampere) or newer"
    if dtype not in SUPPORTED_DTYPES:
        valid = ", ".join(_fmt_dtype(d) for d in SUPPORTED_DTYPES)
        return False, f"dtype {_fmt_dtype(dtype)} is not supported by cuSPARSELt 2:4 GEMMs (valid: {valid})"
    if dtype == torch.float8_e4m3fn and cap < (9, 0):
        return False, (
            f"FP8 sparse GEMMs (cuSPARSELt e4m3) need sm90 or newer, {name} is sm{cap[0]}{cap[1]} "
            "(the dense backend still runs FP8 GEMMs from sm89)"
        )
    if weight.dim() != 2:
        return False, f"the weight must be 2-D, got shape {tuple(weight.shape)}"
    mult = _SPARSE_MULTIPLE[dtype]
    if weight.shape[0] % mult or weight.shape[1] % mult:
        return False, (
            f"weight shape {tuple(weight.shape)} is not a multiple of {mult} in both dims, "
            f"as cuSPARSELt requires for {_fmt_dtype(dtype)}"
        )
    if x is not None:
        if x.device != weight.device:
            return False, f"input on {x.device} but weight on {weight.device}"
        if x.shape[-1] != weight.shape[1]:
            return False, f"input last dim {x.shape[-1]} does not match weight in_features {weight.shape[1]}"
    return True, ""


# ---------------------------------------------------------------------------------------------
# Products
# ---------------------------------------------------------------------------------------------


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """``t`` with zero rows appended up to a multiple of ``multiple``, always row-major.

    cuSPARSELt reads a dense operand as row-major when it is contiguous and as the transpose of a
    row-major tensor otherwise, so a strided view (a slice of hidden states, or the expanded
    gradient of ``y.sum()``) must be copied first.
    """
    pad = (-t.shape[0]) % multiple
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t.contiguous()


def _time_ms(fn, reps: int = 5) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _plan_key(compressed: torch.Tensor, dense: torch.Tensor, transpose_result: bool, bias=None, alpha=None,
              out_dtype=None) -> tuple:
    """Everything a cuSPARSELt matmul plan depends on, so a cached algorithm is only reused for the
    same plan: device, operand shapes, strides and dtypes, whether there is a bias (and its dtype),
    whether alpha is a scalar or a per-row vector, the output dtype and the result layout."""
    return (
        dense.device, compressed.dtype, tuple(compressed.shape), dense.dtype, tuple(dense.shape), dense.stride(),
        transpose_result,
        None if bias is None else (bias.dtype, tuple(bias.shape)),
        None if alpha is None else (alpha.dtype, alpha.numel()),
        out_dtype,
    )


def _alg_id(compressed: torch.Tensor, dense: torch.Tensor, transpose_result: bool, **kw) -> int:
    """The algorithm for this product's plan: alg 0 unless a verified faster one was found."""
    key = _plan_key(compressed, dense, transpose_result, **kw)
    if key in _ALG_CACHE:
        return _ALG_CACHE[key]
    if dense.is_cuda and torch.cuda.is_current_stream_capturing():
        return 0  # the check below syncs with the host: not inside a CUDA graph capture (not cached)
    alg = 0
    if ALG_SEARCH:
        try:
            cand = int(torch._cslt_sparse_mm_search(compressed, dense, transpose_result=transpose_result, **kw))
            if cand != 0:
                ref = torch._cslt_sparse_mm(compressed, dense, transpose_result=transpose_result, alg_id=0, **kw)
                got = torch._cslt_sparse_mm(compressed, dense, transpose_result=transpose_result, alg_id=cand, **kw)
                same = torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
                t0 = _time_ms(lambda: torch._cslt_sparse_mm(compressed, dense, transpose_result=transpose_result, alg_id=0, **kw))
                t1 = _time_ms(lambda: torch._cslt_sparse_mm(compressed, dense, transpose_result=transpose_result, alg_id=cand, **kw))
                if same and t1 < t0:
                    alg = cand
                log.debug("cuSPARSELt alg for %s: search=%d (%.3f ms, same=%s) alg0=%.3f ms -> %d", key, cand, t1, same, t0, alg)
        except RuntimeError as err:  # search is best effort; alg 0 always works
            log.debug("cuSPARSELt algorithm search failed for %s: %s", key, err)
    _ALG_CACHE[key] = alg
    return alg


def _sparse_mm(compressed, dense, *, transpose_result=False, **kw):
    alg = _alg_id(compressed, dense, transpose_result, **kw)
    return torch._cslt_sparse_mm(compressed, dense, transpose_result=transpose_result, alg_id=alg, **kw)


def _compressed_weights(w_eff: torch.Tensor, cache: Optional[dict], need_t: bool, fp8: bool):
    """``(W~c, W~^T c or None, fp8 scale or None, W~ as the backward sees it)``.

    Reused while ``cache["key"]`` is unchanged: the layer sets it to something that changes
    whenever ``W~`` does (the weight's ``_version``, plus the mask step), so micro-batches of one
    optimizer step share one compression. Without a key every call compresses. With FP8 the
    forward multiplies by the e4m3 ``W~``, and the backward by the same values read back in the
    GEMM dtype (the input gradient of the dense backend uses them too).
    """
    key = (cache or {}).get("key")
    entry = (cache or {}).get("cusparselt")
    # The layer's key follows the weight's values; the GEMM dtype and the device are part of the
    # entry too, so `.half()`, `.to()` or an autocast dtype change never reuses a stale compression.
    full_key = (key, need_t, fp8, w_eff.dtype, w_eff.device)
    if key is not None and entry is not None and entry["key"] == full_key:
        return entry["w"], entry["wt"], entry["scale"], entry["w_bwd"]
    w = w_eff.detach()
    scale = None
    if fp8:
        wq, scale = _fp8.fp8_quantize(w, _fp8.FORWARD_DTYPE)  # zeros stay zero: still 2:4
        wc = torch._cslt_compress(wq)
        w_bwd = (wq.float() / scale).to(w.dtype)
    else:
        w_bwd = w.contiguous()
        wc = torch._cslt_compress(w_bwd)
    # W~^T is compressed in the GEMM dtype (the backward runs in bf16/fp16, see `linear`).
    wtc = torch._cslt_compress(w_bwd.t().contiguous()) if need_t else None
    if cache is not None and key is not None:
        cache["cusparselt"] = {"key": full_key, "w": wc, "wt": wtc, "scale": scale, "w_bwd": w_bwd}
    return wc, wtc, scale, w_bwd


def _mvue_tokens_t(dy2: torch.Tensor, method: str, generator) -> torch.Tensor:
    """``MVUE(dY)^T`` as a row-major ``(out, T)`` tensor, 2:4 along tokens, ready to compress."""
    if isinstance(generator, torch.Tensor):  # the layer's (seed, offset) draw
        generator = draw_generator(generator, dy2.device)
    g_t = torch.empty(dy2.shape[1], dy2.shape[0], dtype=dy2.dtype, device=dy2.device)
    _mvue24(dy2, dim=0, method=method, generator=generator, out=g_t.t())  # the kernel writes it in place
    return g_t


class CuSparseLtLinearFunction(torch.autograd.Function):
    """``y = x @ w_eff^T + b`` with 2:4 sparse GEMMs; see the module docstring for each product."""

    @staticmethod
    def forward(ctx, x, w_eff, bias, mvue, generator, fp8, cache, transposable):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])  # (T, in): all leading dims are tokens
        t = x2.shape[0]
        w = w_eff.to(dtype)
        gemm_dtype = _fp8.FORWARD_DTYPE if fp8 else dtype
        x2p = _pad_rows(x2, _DENSE_MULTIPLE[gemm_dtype])  # (Tp, in)
        wc, wtc, w_scale, w_bwd = _compressed_weights(w, cache, transposable, fp8)
        if fp8:
            xq, x_scale = _fp8.fp8_quantize(x2p, _fp8.FORWARD_DTYPE)
            # One de-quantisation factor per output feature: a vector alpha is read on the device,
            # where a 1-element alpha would be copied to the host (a sync) by torch.
            alpha = (1.0 / (w_scale * x_scale)).float().expand(w.shape[0]).contiguous()
            y = _sparse_mm(wc, xq.t(), alpha=alpha, out_dtype=dtype, transpose_result=True)
            if bias is not None:
                y = y + bias.to(dtype)
            x_saved = (xq.float() / x_scale).to(dtype)[:t]  # the operand the GEMM saw
        else:
            b = bias.to(dtype) if bias is not None else None
            y = _sparse_mm(wc, x2p.t(), bias=b, transpose_result=True)  # (Tp, out)
            x_saved = x2
        y = y[:t]
        # The dense input-gradient GEMM needs W~; with a transposable mask W~^T c replaces it.
        ctx.save_for_backward(x_saved, None if wtc is not None else w_bwd)
        ctx.wtc = wtc
        ctx.dtype = dtype
        ctx.mvue, ctx.generator, ctx.fp8 = mvue, generator, fp8
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w = ctx.saved_tensors
        dtype = ctx.dtype
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)  # (T, out)
        db = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.bias_dtype)  # exact, from the un-quantised dY (as the dense backend)
        e4m3, e5m2 = _fp8.FORWARD_DTYPE, _fp8.BACKWARD_DTYPE
        # cuSPARSELt has no e5m2 kernels: with FP8 its sparse products take dY rounded as e5m2
        # would store it, in bf16/fp16; the dense ones are real FP8 GEMMs (`fp8.scaled_mm`).
        sparse_dx = ctx.needs_input_grad[0] and ctx.wtc is not None
        sparse_dw = ctx.needs_input_grad[1] and ctx.mvue is not None
        dyq = _fp8.fp8_cast_roundtrip(dy2, e5m2) if ctx.fp8 and (sparse_dx or sparse_dw) else dy2
        t = dy2.shape[0]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            if ctx.wtc is not None:
                dyp = _pad_rows(dyq, _DENSE_MULTIPLE[dtype])
                dx = _sparse_mm(ctx.wtc, dyp.t(), transpose_result=True)[:t]  # (W~^T dY^T)^T = dY W~
            elif ctx.fp8:
                dx = _fp8.scaled_mm(dy2, w, e5m2, e4m3, out_dtype=dtype)
            else:
                dx = dy2 @ w
            dx = dx.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if ctx.mvue is not None:
                # Zero token rows form all-zero groups, which MVUE keeps at zero.
                dyp = _pad_rows(dyq, _TOKEN_MULTIPLE)
                xp = _pad_rows(x2, _TOKEN_MULTIPLE)
                g_t = _mvue_tokens_t(dyp, ctx.mvue, ctx.generator)  # (out, Tp), 2:4 along tokens
                if ctx.fp8:  # an FP8 pipeline stores the sparse gradient as e5m2 too
                    g_t = _fp8.fp8_cast_roundtrip(g_t, e5m2)
                dw = _sparse_mm(torch._cslt_compress(g_t), xp)  # (out, Tp) @ (Tp, in)
            elif ctx.fp8:
                dw = _fp8.scaled_mm(dy2.t(), x2, e5m2, e4m3, out_dtype=dtype)
            else:
                dw = dy2.t() @ x2
        return dx, dw, db, None, None, None, None, None


def linear(x, w_eff, bias, *, mvue=None, generator=None, fp8=False, cache=None, transposable=False):
    """cuSPARSELt product ``x @ w_eff^T + bias``, differentiable in all three.

    Args:
        x: ``(..., in)`` CUDA input in float16/bfloat16 (the GEMM dtype).
        w_eff: ``(out, in)`` effective weight, 2:4 along ``in`` (zeros off the mask).
        bias: ``(out,)`` or None.
        mvue: None (dense weight gradient) or ``"exact"``/``"approx"`` (sparse, unbiased).
        generator: `torch.Generator` on ``x``'s device for MVUE draws, or a draw ``(seed, offset)``
            (an int64 CPU tensor, see `ops.mvue.draw_generator`).
        fp8: forward in e4m3 on sm90+ (real FP8 sparse GEMM), gradients rounded as e5m2.
        cache: the layer's dict; set ``cache["key"]`` to reuse the compressed weight.
        transposable: ``w_eff``'s mask is transposable (``w_eff.t()`` is 2:4), so the input
            gradient is a sparse GEMM too.

    Raises:
        ValueError: when `can_use` says cuSPARSELt cannot run this product.
    """
    ok, reason = can_use(w_eff, x, _fp8.FORWARD_DTYPE if fp8 else x.dtype)
    if ok and fp8 and x.dtype not in (torch.float16, torch.bfloat16):
        ok, reason = False, f"FP8 needs a float16/bfloat16 input to return, got {x.dtype}"
    if not ok:
        raise ValueError(f"`backend`='cusparselt' cannot run this layer: {reason}")
    return CuSparseLtLinearFunction.apply(x, w_eff, bias, mvue, generator, fp8, cache, transposable)


# ---------------------------------------------------------------------------------------------
# Inference export
# ---------------------------------------------------------------------------------------------


def _is_24(w: torch.Tensor) -> bool:
    return bool(((w.reshape(-1, 4) != 0).sum(-1) <= 2).all())


def semi_structured_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` (2:4 along its last dim) as a ``torch.sparse`` semi-structured tensor for inference.

    Raises:
        ValueError: if ``w`` is not 2:4, or the GPU, dtype or shape cannot hold it (the reason
            comes from `can_use`).

    Example (needs an Ampere or newer GPU)::

        w = semi_structured_weight(layer.effective_weight().half().cuda())
        y = torch.nn.functional.linear(x, w)
    """
    if w.dim() != 2 or w.shape[-1] % 4:
        raise ValueError(f"`w` must be 2-D with a last dim multiple of 4, got shape {tuple(w.shape)}")
    ok, reason = can_use(w, dtype=w.dtype)
    if ok and w.dtype == torch.float8_e4m3fn:
        ok, reason = False, "semi-structured export supports float16 and bfloat16 weights"
    if not ok:
        raise ValueError(f"Cannot export `w` as a semi-structured sparse tensor: {reason}")
    if not _is_24(w):
        raise ValueError("`w` is not 2:4 sparse (some group of 4 along the last dim has more than 2 non-zeros)")
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(w.detach().contiguous())


def to_semi_structured(module: nn.Module, weight: Optional[torch.Tensor] = None) -> nn.Module:
    """Swap ``module.weight`` for its semi-structured form, in place, for inference.

    Args:
        module: an ``nn.Linear`` (or anything with a 2-D ``weight``) on a supported GPU.
        weight: the 2:4 weight to store (default ``module.weight``; pass a sparse layer's
            ``effective_weight()``).

    Returns:
        ``module``, whose ``weight`` is now a frozen ``SparseSemiStructuredTensor`` parameter.
    """
    w = module.weight if weight is None else weight
    module.weight = nn.Parameter(semi_structured_weight(w.detach()), requires_grad=False)
    return module
