"""A CPU stand-in for ``torch._cslt_compress`` / ``_cslt_sparse_mm`` / ``_cslt_sparse_mm_search``.

No GPU runs in CI, so the cuSPARSELt backend's wiring (which operand is compressed, transposes,
padding, layouts, alpha, bias, the once-per-step cache) is checked against this emulation. It
computes the product in float32 and rounds once to the output dtype, as cuSPARSELt does with
its float32 accumulators, and it refuses every call the real op would get wrong or reject.

The contract, read from PyTorch's ``aten/src/ATen/native/sparse/cuda/cuSPARSELtOps.cpp`` and
``SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS``:

- ``_cslt_compress(A)``: A is 2-D, row-major, fp16/bf16/fp32/int8/e4m3, with at most 2
  non-zeros in every group of 4 along its rows (cuSPARSELt does not check this: it silently
  keeps 2 of 4). Its dims are multiples of 16 (32 for 8-bit types).
- ``_cslt_sparse_mm(Ac, B, bias, alpha, out_dtype, transpose_result, alg_id)``: ``A @ B`` with
  ``B`` (k, n) read as row-major when ``B.is_contiguous()`` and as the transpose of a row-major
  tensor otherwise (anything else reads the wrong memory); B's dims are multiples of 8 (16 for
  8-bit types); ``bias`` has one entry per row of A, in the output dtype; ``alpha`` is float32
  with 1 or m entries (one per row of A); ``out_dtype`` is only accepted for 8-bit inputs (an
  e4m3 product without it returns e4m3); the result is (m, n), or (n, m) with
  ``transpose_result``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_EIGHT_BIT = (torch.int8, torch.float8_e4m3fn)
_SPARSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, *_EIGHT_BIT)


class CusparseLtContractError(AssertionError):
    """A call the real cuSPARSELt op would reject or silently get wrong."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise CusparseLtContractError(msg)


@dataclass
class Compressed:
    """What the fake ``_cslt_compress`` returns: the pruned matrix, kept dense for the product."""

    dense: torch.Tensor
    shape: torch.Size = field(init=False)
    dtype: torch.dtype = field(init=False)

    def __post_init__(self):
        self.shape = self.dense.shape
        self.dtype = self.dense.dtype


@dataclass
class FakeCusparseLt:
    """Installs with `install(monkeypatch)`; records every call for the tests to inspect."""

    search_result: int = 0
    wrong_algs: set = field(default_factory=set)  # alg ids whose products come out wrong
    compressed: list = field(default_factory=list)  # shapes of the compressed operands, in order
    products: list = field(default_factory=list)  # dicts describing each product
    searches: list = field(default_factory=list)  # dicts describing each algorithm search
    # packed=True: fp16/bf16 operands whose dims are multiples of 128 compress to the flat buffer of
    # `ops.cslt_layout` (checked against PyTorch's packer in test_cslt_layout), as the real op
    # returns a flat buffer; products then decode such buffers. Anything else stays `Compressed`.
    packed: bool = False

    def install(self, monkeypatch) -> "FakeCusparseLt":
        monkeypatch.setattr(torch, "_cslt_compress", self.compress)
        monkeypatch.setattr(torch, "_cslt_sparse_mm", self.sparse_mm)
        monkeypatch.setattr(torch, "_cslt_sparse_mm_search", self.search)
        return self

    # ------------------------------------------------------------------------------------------
    def compress(self, a: torch.Tensor) -> Compressed:
        _check(isinstance(a, torch.Tensor) and a.dim() == 2, f"compress needs a 2-D tensor, got {getattr(a, 'shape', a)}")
        _check(a.dtype in _SPARSE_DTYPES, f"compress: unsupported dtype {a.dtype}")
        _check(a.is_contiguous(), f"compress reads a row-major matrix; got strides {a.stride()} for {tuple(a.shape)}")
        mult = 32 if a.dtype in _EIGHT_BIT else 16
        _check(a.shape[0] % mult == 0 and a.shape[1] % mult == 0,
               f"compress: shape {tuple(a.shape)} is not a multiple of {mult} in both dims for {a.dtype}")
        nnz = (a.reshape(a.shape[0], -1, 4) != 0).sum(-1)
        _check(bool((nnz <= 2).all()), f"compress: {tuple(a.shape)} is not 2:4 along its rows "
               f"(a group has {int(nnz.max())} non-zeros; cuSPARSELt would silently drop them)")
        self.compressed.append(tuple(a.shape))
        if self.packed and a.dtype in (torch.float16, torch.bfloat16) and a.shape[0] % 128 == 0 and a.shape[1] % 128 == 0:
            from sparsetrain.ops import cslt_layout, nm_mask

            return cslt_layout.pack24(a, nm_mask(a, 2, 4))  # nm_mask(X~) is the mask that made X~
        return Compressed(a.clone())

    @staticmethod
    def _decode(ac, k: int):
        """A flat 16-bit buffer of an (m, k) operand holds m*k*9/16 elements: decode it."""
        from sparsetrain.ops import cslt_layout

        _check(ac.dim() == 1 and ac.dtype in (torch.float16, torch.bfloat16) and (ac.numel() * 16) % (9 * k) == 0,
               f"a flat compressed_A of {ac.numel()} {ac.dtype} elements cannot be a 2:4 operand with k={k}")
        return Compressed(cslt_layout.unpack24(ac, ac.numel() * 16 // (9 * k), k))

    def _product(self, ac, b, bias, alpha, out_dtype, transpose_result, alg_id):
        if self.packed and isinstance(ac, torch.Tensor) and b.dim() == 2:
            ac = self._decode(ac, b.shape[0])
        _check(isinstance(ac, Compressed), f"compressed_A must come from _cslt_compress, got {type(ac).__name__}")
        a = ac.dense
        _check(b.dim() == 2, f"dense_B must be 2-D, got {b.dim()}-D")
        _check(b.dtype == a.dtype, f"inputs must have the same dtype, got {a.dtype} and {b.dtype}")
        m, k = a.shape
        _check(b.shape[0] == k, f"A is {tuple(a.shape)} but dense_B is {tuple(b.shape)}")
        n = b.shape[1]
        _check(b.is_contiguous() or b.t().is_contiguous(),
               f"dense_B with strides {b.stride()} is neither row- nor column-major; cuSPARSELt would misread it")
        mult = 16 if a.dtype in _EIGHT_BIT else 8
        _check(k % mult == 0 and n % mult == 0, f"dense_B {tuple(b.shape)} dims must be multiples of {mult}")
        if a.dtype in _EIGHT_BIT:
            out = out_dtype or b.dtype
            _check(out in (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.int32),
                   f"out_dtype {out_dtype} not supported for {a.dtype}")
        else:
            _check(out_dtype is None, "out_dtype support only available for int8/fp8 inputs")
            out = b.dtype
        acc = a.float() @ b.float()  # (m, n), float32 accumulators
        if alpha is not None:
            _check(alpha.dtype == torch.float32, f"alpha must be float32, got {alpha.dtype}")
            _check(alpha.numel() in (1, m), f"alpha must have 1 or m={m} entries, got {alpha.numel()}")
            acc = acc * alpha.reshape(-1, 1)
        if bias is not None:
            _check(bias.shape == (m,), f"bias must have one entry per row of A ({m}), got {tuple(bias.shape)}")
            _check(bias.dtype == out, f"bias dtype {bias.dtype} differs from the output dtype {out}")
            acc = acc + bias.float().reshape(-1, 1)
        if alg_id in self.wrong_algs:
            acc = acc * 1.5 + 1.0  # what a broken algorithm choice looks like
        res = acc.to(out)
        return (res.t().contiguous() if transpose_result else res), dict(
            m=m, k=k, n=n, dtype=a.dtype, out=out, transpose_result=transpose_result,
            bias=bias is not None, alpha=None if alpha is None else alpha.numel(), alg_id=alg_id,
        )

    def sparse_mm(self, compressed_A, dense_B, bias=None, alpha=None, out_dtype=None, transpose_result=False,
                  alg_id=0, split_k=1, split_k_mode=-1):
        res, info = self._product(compressed_A, dense_B, bias, alpha, out_dtype, transpose_result, alg_id)
        self.products.append(info)
        return res

    def search(self, compressed_A, dense_B, bias=None, alpha=None, out_dtype=None, transpose_result=False):
        _, info = self._product(compressed_A, dense_B, bias, alpha, out_dtype, transpose_result, 0)
        self.searches.append(info)
        return self.search_result


# ----------------------------------------------------------------------------------------------
# Outside pytest: the GPU suite's `--smoke-cpu` mode runs its cuSPARSELt probes against this
# emulation, so their code path is rehearsed on CPU before a GPU call is spent on them.


class Patcher:
    """``setattr`` with ``undo``, the two pieces of pytest's ``monkeypatch`` that `install` uses."""

    def __init__(self):
        self._saved = []

    def setattr(self, obj, name, value):
        self._saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self):
        while self._saved:
            obj, name, value = self._saved.pop()
            setattr(obj, name, value)


def fake_to_sparse_semi_structured(w: torch.Tensor) -> torch.Tensor:
    """`torch.sparse.to_sparse_semi_structured` on CPU: checks what cuSPARSELt's ``from_dense``
    checks (2-D, row-major, fp16/bf16, dims multiples of 16, 2:4 along the last dim) and keeps the
    values as a dense tensor."""
    _check(w.dim() == 2 and w.is_contiguous(), f"semi-structured: a 2-D row-major tensor, got {tuple(w.shape)}")
    _check(w.dtype in (torch.float16, torch.bfloat16), f"semi-structured: float16/bfloat16, got {w.dtype}")
    _check(w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0, f"semi-structured: {tuple(w.shape)} not multiples of 16")
    _check(bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()), "semi-structured: not 2:4 along the last dim")
    return w.clone()


def emulate_sm90_on_cpu(patcher, cusparselt_module) -> FakeCusparseLt:
    """Make CPU tensors run the cuSPARSELt backend as on an emulated sm90 GPU.

    Installs the fake ``torch._cslt_*`` ops and semi-structured conversion, reports cuSPARSELt
    available on an sm90 device, and makes ``cusparselt_module.can_use`` judge a CPU weight's
    dtype and shape as it would a CUDA one's. ``patcher.undo()`` restores everything.
    """
    import types

    fake = FakeCusparseLt().install(patcher)
    patcher.setattr(torch.sparse, "to_sparse_semi_structured", fake_to_sparse_semi_structured)
    patcher.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    patcher.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    patcher.setattr(torch.cuda, "get_device_name", lambda *a: "Emulated sm90")
    real_can_use = cusparselt_module.can_use

    def can_use(weight, x=None, dtype=None):
        as_cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=weight.dtype,
                                        shape=torch.Size(weight.shape), dim=weight.dim)
        return real_can_use(as_cuda, None, dtype)

    patcher.setattr(cusparselt_module, "can_use", can_use)
    return fake
