"""cuSPARSELt's packed 2:4 operand (`ops.cslt_layout` and its Triton twin) against PyTorch's packer.

The reference is `reference.cslt_pack24_by_threads`: PyTorch's ``_sparse_semi_structured_tile``
thread program run lane by lane in plain Python (warp shuffles as lookups), with the mask from the
selection loop `reference.loop_mask`. It shares no formula with the code under test. The ``gpu``
cases compare with ``torch._cslt_compress`` itself, the layout's only ground truth.
"""

import pytest
import torch

from reference import cslt_pack24_by_threads, loop_mask
from sparsetrain.ops import cslt_layout

SHAPES = [(128, 128), (256, 128), (128, 384), (384, 256)]
DTYPES = [torch.bfloat16, torch.float16]


def _input(shape, dtype, kind, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "relu2":  # mostly exact zeros: groups with fewer than 2 non-zeros, ties among zeros
        x = torch.relu(x - 0.5) ** 2
        x = torch.where(torch.rand(shape, generator=g) < 0.1, -x, x)
        flat = x.view(-1)
        flat[7::13] = -flat[6::13][: flat[7::13].numel()]  # |x| ties of opposite sign
    return x.to(dtype=dtype, device=device)


def _reference(x):
    """``(mask, X~, buffer)`` from the loop mask and the thread program."""
    # The selection loop ranks |key|: NaN above +inf above every number (ops.nm's rule).
    key = x.double().cpu()
    key = torch.where(key.isinf(), 1e308, torch.where(key.isnan(), float("inf"), key))
    mask = torch.tensor(loop_mask(key.tolist(), 2, 4))
    xt = torch.where(mask, x.cpu(), torch.zeros((), dtype=x.dtype))
    values, meta = cslt_pack24_by_threads(xt.double().tolist(), mask.tolist())
    meta16 = torch.tensor([w - (1 << 16) if w >= 1 << 15 else w for w in meta], dtype=torch.int16)
    buf = torch.cat([torch.tensor(values, dtype=torch.float64).to(x.dtype), meta16.view(x.dtype)])
    return mask, xt, buf


def _bits(t):
    return t.cpu().view(torch.int16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "relu2"])
def test_pack_matches_the_thread_program(dtype, shape, kind):
    x = _input(shape, dtype, kind, seed=shape[0] + shape[1])
    mask, xt, expect = _reference(x)
    buf = cslt_layout.pack24(xt, mask)
    assert buf.dtype == dtype and buf.shape == (cslt_layout.packed_numel(*shape),) == expect.shape
    assert torch.equal(_bits(buf), _bits(expect))
    # The inverse: the thread program's buffer decodes to X~, bit for bit.
    assert torch.equal(_bits(cslt_layout.unpack24(expect, *shape)), _bits(xt))
    # And the torch path that makes all three from X.
    got_xt, got_mask, got_buf = cslt_layout.sparsify_pack24(x)
    assert torch.equal(got_mask, mask) and torch.equal(_bits(got_xt), _bits(xt)) and torch.equal(_bits(got_buf), _bits(expect))


def test_every_code_lands_in_its_own_word():
    """Each (row, 16 columns) word gets a distinct place: changing one group's kept pair changes
    exactly one metadata word of the thread program's buffer and of ours, the same one."""
    x = _input((256, 256), torch.bfloat16, "normal")
    mask, xt, base = _reference(x)
    n_values = 256 * 256 // 2
    for r, c in [(0, 0), (9, 20), (37, 100), (130, 64), (255, 252)]:
        m2 = mask.clone()
        m2[r, c : c + 4] = torch.tensor([True, False, False, True]) if not (m2[r, c] and m2[r, c + 3]) else torch.tensor([False, True, True, False])
        xt2 = torch.where(m2, x, torch.zeros((), dtype=x.dtype))
        values, meta = cslt_pack24_by_threads(xt2.double().tolist(), m2.tolist())
        ours = cslt_layout.pack24(xt2, m2)
        changed = (_bits(ours)[n_values:] != _bits(base)[n_values:]).nonzero().flatten().tolist()
        theirs = [i for i, w in enumerate(meta) if w != (int(_bits(base)[n_values + i]) & 0xFFFF)]
        assert len(changed) == 1 and changed == theirs


def test_bad_operands_are_refused():
    with pytest.raises(ValueError, match="multiples of 128, got \\(100, 128\\)"):
        cslt_layout.pack24(torch.zeros(100, 128, dtype=torch.float16), torch.zeros(100, 128, dtype=torch.bool))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        cslt_layout.sparsify_pack24(torch.zeros(128, 128))
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        cslt_layout.pack24(torch.zeros(128, 128, dtype=torch.float16), torch.ones(128, 128, dtype=torch.bool))
    with pytest.raises(ValueError, match="128, 128\\) operand packs into 9216"):
        cslt_layout.unpack24(torch.zeros(100, dtype=torch.float16), 128, 128)


# ---------------------------------------------------------------------------------------------
# The Triton twin: interpreted on CPU, compiled on CUDA.

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,kind", [((128, 128), "normal"), ((256, 384), "relu2"), ((384, 128), "relu2")])
def test_kernel_bit_exact(device, dtype, shape, kind):
    pytest.importorskip("triton")
    from sparsetrain.kernels.activation import _sparsify_pack24, sparsify_pack24_forward

    x = _input(shape, dtype, kind, seed=3, device=device)
    if kind == "normal":  # non-finite values rank above every number; a NaN above +inf
        x[0, :4] = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
        x[1, :4] = torch.tensor([float("-inf"), 1.0, float("inf"), -3.0])
        x[2, :4] = torch.tensor([0.0, -0.0, 0.0, -0.0])
        x[3, :4] = torch.tensor([1e-40, 0.0, -1e-40, 0.0]).to(dtype)  # denormals (bf16) or zeros (fp16)
    mask, xt, buf = _reference(x)
    got_xt, got_mask, got_buf = sparsify_pack24_forward(x)
    assert got_mask.dtype == torch.bool and torch.equal(got_mask.cpu(), mask)
    assert torch.equal(_bits(got_xt), _bits(xt))
    assert torch.equal(_bits(got_buf), _bits(buf))
    assert _sparsify_pack24.last_mode == ("interpreted" if device == "cpu" else "compiled")


def test_kernel_refuses_bad_shapes():
    pytest.importorskip("triton")
    from sparsetrain.kernels.activation import sparsify_pack24_forward

    with pytest.raises(ValueError, match="multiples of 128"):
        sparsify_pack24_forward(torch.zeros(128, 96, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="float16/bfloat16"):
        sparsify_pack24_forward(torch.zeros(128, 128))


# ---------------------------------------------------------------------------------------------
# The ground truth: cuSPARSELt itself.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_buffer_is_cslt_compress(dtype):
    """Random operands (no zeros, no ties): the buffer is unique, so it must equal cuSPARSELt's."""
    x = _input((512, 768), dtype, "normal", device="cuda")
    xt, mask, buf = cslt_layout.sparsify_pack24(x)
    ref = torch._cslt_compress(xt)
    assert ref.shape == buf.shape, f"cuSPARSELt's buffer has {ref.numel()} elements, ours {buf.numel()}"
    diff = (ref.view(torch.int16) != buf.view(torch.int16)).nonzero().flatten()
    assert diff.numel() == 0, f"{diff.numel()} elements differ, first at {int(diff[0])} (values end at {512 * 384})"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_products_with_our_buffer(dtype):
    """Squared-ReLU operands (many zeros, where the encoding is not unique): the product with our
    buffer is the product with cuSPARSELt's own and X~ @ B within one rounding."""
    x = _input((256, 512), dtype, "relu2", device="cuda")
    b = torch.randn(512, 136, device="cuda").to(dtype)
    xt, mask, buf = cslt_layout.sparsify_pack24(x)
    ours = torch._cslt_sparse_mm(buf, b)
    theirs = torch._cslt_sparse_mm(torch._cslt_compress(xt), b)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    ref = xt.double() @ b.double()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(ours.double(), ref, rtol=2 * eps, atol=2 * eps * 512**0.5)
