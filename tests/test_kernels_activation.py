"""The activation sparsification kernel against its torch twin (`ops.activation`), bit for bit.

On CPU the kernel runs in Triton's interpreter (`kernels._launch.DualKernel`); the ``gpu`` cases
compile it on CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")

from reference import loop_mask  # noqa: E402
from sparsetrain.kernels.activation import _sparsify_activation, sparsify_activation_forward  # noqa: E402
from sparsetrain.ops.activation import activation_mask  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CASES = [((3, 8), 2, 4), ((5, 2, 12), 2, 4), ((37, 132), 2, 4), ((4, 16), 1, 4), ((6, 24), 4, 8), ((7, 18), 3, 6)]


def relu2_input(shape, dtype, device, seed=0):
    """Squared-ReLU-like: ~60% exact zeros (ties among zeros), equal magnitudes of both signs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(shape, generator=g) - 0.25) ** 2
    x = torch.where(torch.rand(shape, generator=g) < 0.1, -x, x)
    flat = x.view(-1)
    flat[7::13] = -flat[6::13][: flat[7::13].numel()]  # |x| ties of opposite sign
    return x.to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n,m", CASES)
def test_bit_exact_against_reference(device, dtype, shape, n, m):
    x = relu2_input(shape, dtype, device, seed=n + m)
    xt, mask = sparsify_activation_forward(x, n, m)
    expect = torch.tensor(loop_mask(x.double().reshape(-1, shape[-1]).tolist(), n, m)).reshape(shape)
    assert mask.dtype == torch.bool and xt.dtype == dtype and xt.shape == x.shape
    assert torch.equal(mask.cpu(), expect)
    assert torch.equal(mask, activation_mask(x, n, m))
    assert torch.equal(xt, torch.where(expect.to(device), x, torch.zeros((), dtype=dtype, device=device)))
    # Every group keeps exactly n entries and X~ has at most n non-zeros per group.
    assert bool((mask.reshape(-1, m).sum(-1) == n).all())
    assert bool(((xt.reshape(-1, m) != 0).sum(-1) <= n).all())
    if device == "cpu":
        assert _sparsify_activation.last_mode == "interpreted"


def test_bf16_denormals_and_nonfinite():
    tiny = torch.tensor(1e-40).to(torch.bfloat16)  # a bf16 denormal: the interpreter would flush it
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    x[0, 2] = tiny
    x2 = torch.tensor([[1.0, float("nan"), float("inf"), -2.0], [float("-inf"), 1.0, 3.0, -3.0]], dtype=torch.bfloat16)
    for t in (x, x2, x2.float(), x2.half()):
        xt, mask = sparsify_activation_forward(t)
        assert torch.equal(mask, activation_mask(t))
        kept = t[mask]
        assert torch.equal(xt[mask].isnan(), kept.isnan()) and torch.equal(xt[mask].nan_to_num(), kept.nan_to_num())
        assert bool((xt[~mask] == 0).all())
    assert sparsify_activation_forward(x)[0][0, 2] == tiny  # the denormal is kept, not flushed


def test_float64_ranks_without_rounding():
    # Two magnitudes equal in float32 but not in float64: the larger (second) one must win.
    a = 1.0 + 2.0**-40
    x = torch.tensor([[1.0, a, 0.0, 0.0]], dtype=torch.float64)
    _, mask = sparsify_activation_forward(x, 1, 4)
    assert mask.tolist() == [[False, True, False, False]]


def test_errors():
    with pytest.raises(ValueError, match="multiple of m=4"):
        sparsify_activation_forward(torch.zeros(2, 6))
    with pytest.raises(TypeError, match="floating"):
        sparsify_activation_forward(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="0 < n < m"):
        sparsify_activation_forward(torch.zeros(2, 8), 4, 4)
