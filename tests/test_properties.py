"""The numerical contract of every op and its Triton twin, as Hypothesis properties.

Stated in the docstrings of `sparsetrain.ops.nm`, `ops.mvue` and `ops.transposable`:
structure (at most n per group, exactly n per transposable tile row and column, MVUE at most 2 of 4
for any uniforms), one tie rule shared by op and kernel (bit-equal masks), non-finite in gives NaN
out for the whole group, and MVUE unbiasedness (a variance-derived statistical bound).

Strategies draw shapes, dtypes (float32, bfloat16, float16), exact ties, zero groups, +-inf, NaN,
denormals and magnitudes near each dtype's largest value. Every op is checked against a plain
Python reference written here and against its kernel under Triton's interpreter.

Example counts are sized for CI (the file runs in well under a minute); for a longer local run::

    pytest tests/test_properties.py --hypothesis-profile=long
"""

import itertools
import math
from statistics import NormalDist

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import exact_mvue_probabilities
from sparsetrain import ops
from sparsetrain.ops.transposable import TRANSPOSABLE_METHODS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NM = [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (3, 6)]
NAN, INF = float("nan"), float("inf")

_SCALE = 20 if settings.get_current_profile_name() == "long" else 1


def _props(examples):
    """Each property's own example budget for CI, 20x under ``--hypothesis-profile=long``."""
    return settings(settings.default, max_examples=examples * _SCALE, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


needs_triton = pytest.mark.skipif(not _triton(), reason="triton is not installed")


# ------------------------------------------------------------------------------------ strategies


def _specials(dtype, finite_only=False):
    fi = torch.finfo(dtype)
    vals = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, float(fi.tiny), float(fi.tiny) / 4, float(fi.max) / 8,
            -float(fi.max) / 8, float(fi.eps)]
    if not finite_only:
        vals += [NAN, INF, -INF]
    return vals


@st.composite
def weights(draw, m, dtype=None, finite_only=False, max_rows=4, max_groups=4, nonneg=False):
    """A 2-D tensor ``[rows, groups * m]`` mixing gaussians, exact ties, zeros, extremes."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, max_rows))
    groups = draw(st.integers(1, max_groups))
    fi = torch.finfo(dtype)
    plain = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    # A few values per draw come from a small pool, so exact ties inside a group are common.
    pool = draw(st.lists(st.sampled_from(_specials(dtype, finite_only)) | plain, min_size=1, max_size=3))
    elem = st.sampled_from(pool) | plain | st.sampled_from(_specials(dtype, finite_only))
    vals = draw(st.lists(elem, min_size=rows * groups * m, max_size=rows * groups * m))
    if draw(st.booleans()):  # a whole zero group
        g = draw(st.integers(0, rows * groups - 1))
        vals[g * m:(g + 1) * m] = [0.0] * m
    t = torch.tensor(vals, dtype=torch.float64).clamp(-float(fi.max), float(fi.max))
    t = torch.where(torch.isnan(torch.tensor(vals, dtype=torch.float64)), torch.tensor(NAN, dtype=torch.float64), t)
    t = torch.where(torch.isinf(torch.tensor(vals, dtype=torch.float64)), torch.tensor(vals, dtype=torch.float64), t)
    t = t.to(dtype).reshape(rows, groups * m)
    return t.abs() if nonneg else t


# ------------------------------------------------------------------------------------ references


def _key(x):
    """The documented rank key: |w|, NaN above everything."""
    return INF if math.isnan(x) else abs(x)


def ref_mask(rows, n, m):
    """Keep the n largest keys per group, lowest index first among equals (a selection loop)."""
    out = []
    for row in rows:
        mrow = []
        for s in range(0, len(row), m):
            grp = [_key(v) for v in row[s:s + m]]
            kept = []
            for _ in range(n):
                best = None
                for i, k in enumerate(grp):
                    if i not in kept and (best is None or k > grp[best]):
                        best = i
                kept.append(best)
            mrow += [i in kept for i in range(m)]
        out.append(mrow)
    return torch.tensor(out, dtype=torch.bool)


def _group_finite(row, s, m):
    return all(math.isfinite(v) for v in row[s:s + m])


def ref_project(rows, n, m):
    mask = ref_mask(rows, n, m).tolist()
    out = []
    for row, mrow in zip(rows, mask):
        orow = []
        for s in range(0, len(row), m):
            if not _group_finite(row, s, m):
                orow += [NAN] * m
            else:
                orow += [v if k else 0.0 for v, k in zip(row[s:s + m], mrow[s:s + m])]
        out.append(orow)
    return out


def ref_soft(rows, n, m):
    """sign(w) max(|w| - t, 0) with t the (m-n)-th smallest |w|, exact in float64."""
    out = []
    for row in rows:
        orow = []
        for s in range(0, len(row), m):
            grp = row[s:s + m]
            if not _group_finite(row, s, m):
                orow += [NAN] * m
                continue
            t = sorted(abs(v) for v in grp)[m - n - 1]
            orow += [math.copysign(max(abs(v) - t, 0.0), v) if abs(v) > t else 0.0 for v in grp]
        out.append(orow)
    return out


def _assert_same(got, want_rows, dtype):
    """Equal as values of ``dtype`` (the reference rounded once), NaN where the reference is NaN."""
    want = torch.tensor(want_rows, dtype=torch.float64).to(dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    ok = ~torch.isnan(want)
    assert torch.equal(got[ok], want[ok]), (got, want)


def _finite_groups(w, m):
    return torch.isfinite(w.reshape(w.shape[0], -1, m)).all(-1)  # (rows, G)


# ------------------------------------------------------------------------------------ N:M ops


@_props(60)
@given(data=st.data(), nm=st.sampled_from(NM))
def test_nm_ops_against_loops(data, nm):
    n, m = nm
    w = data.draw(weights(m))
    rows = w.double().tolist()
    mask = ops.nm_mask(w, n, m)
    assert torch.equal(mask, ref_mask(rows, n, m))
    assert bool((mask.reshape(w.shape[0], -1, m).sum(-1) == n).all())  # exactly n, NaN or not
    _assert_same(ops.project_nm(w, n, m), ref_project(rows, n, m), w.dtype)
    soft = ops.soft_threshold(w, n, m)
    _assert_same(soft, ref_soft(rows, n, m), w.dtype)
    fin = _finite_groups(w, m)
    nz = (soft != 0).reshape(w.shape[0], -1, m)
    assert bool((nz.sum(-1)[fin] <= n).all())
    # The support of S(w) lies inside the mask (what makes W~ compressible with the mask).
    assert not bool((nz & ~mask.reshape(nz.shape))[fin].any())
    beta = ops.sste_scale(w, n, m)
    assert bool(torch.isnan(beta)) == (not bool(torch.isfinite(w).all()))


@needs_triton
@_props(40)
@given(data=st.data(), nm=st.sampled_from(NM), beta=st.sampled_from([1.0, 1.5, 0.25]))
def test_projection_kernel_twin(data, nm, beta):
    from sparsetrain.kernels import project_weight

    n, m = nm
    w = data.draw(weights(m))
    for method in ("ste", "s-ste"):
        w_eff, mask = project_weight(w, n, m, "soft" if method == "s-ste" else "hard", beta if method == "s-ste" else None)
        assert torch.equal(mask, ops.nm_mask(w, n, m))  # bit-equal masks, ties and NaN included
        if method == "ste":
            want = ops.project_nm(w, n, m)
        else:
            want = (torch.tensor(beta) * ops.soft_threshold(w.float(), n, m)).to(w.dtype)
        assert torch.equal(torch.isnan(w_eff), torch.isnan(want))
        ok = ~torch.isnan(want)
        assert torch.equal(w_eff[ok], want[ok])


# ------------------------------------------------------------------------------------ MVUE

# u = 0 and the largest float32 below 1 are the edges where rounding used to keep 3 of 4.
_U_EDGE = [0.0, 2.0**-30, 0.5, 1.0 - 2.0**-24]


@st.composite
def uniforms_for(draw, shape):
    r, p, g, q = shape
    vals = draw(st.lists(st.sampled_from(_U_EDGE) | st.floats(0.0, 1.0 - 2.0**-24, width=32),
                         min_size=r * p * g * q, max_size=r * p * g * q))
    return torch.tensor(vals, dtype=torch.float32).reshape(shape)


def _mvue_checks(out, g, method):
    """Structure and non-finite rules for groups along the last dim of ``g`` (rows, 4k)."""
    go, gg = out.reshape(g.shape[0], -1, 4), g.reshape(g.shape[0], -1, 4)
    fin = torch.isfinite(gg.float()).all(-1) & torch.isfinite(gg.float().abs().sum(-1))
    nz = (go != 0) & ~torch.isnan(go)
    assert bool((nz.sum(-1)[fin] <= 2).all())  # never 3 of 4, whatever the uniforms
    assert not bool(torch.isnan(go[fin]).any())
    assert bool(torch.isnan(go[~fin]).all())  # non-finite in: the whole group NaN
    if method == "exact":
        expect = (gg[fin] != 0).sum(-1).clamp(max=2)
        assert torch.equal(nz.sum(-1)[fin], expect)
    # A kept entry keeps its sign and never shrinks (it is g / p with p <= 1).
    kept = nz & fin.unsqueeze(-1)
    gk, ok_ = gg[kept].double(), go[kept].double()
    assert bool((torch.sign(gk) == torch.sign(ok_)).all())
    assert bool((ok_.abs() >= gk.abs() * (1 - 2 * torch.finfo(g.dtype).eps)).all())


@_props(60)
@given(data=st.data(), method=st.sampled_from(["exact", "approx"]))
def test_mvue_structure_for_any_uniforms(data, method):
    g = data.draw(weights(4))
    r = 1 if method == "exact" else 2
    u = data.draw(uniforms_for((r, g.shape[0], g.shape[1] // 4, 1)))
    out = ops.mvue24(g, dim=-1, method=method, uniforms=u)
    assert out.dtype == g.dtype and out.shape == g.shape
    _mvue_checks(out, g, method)


@needs_triton
@_props(40)
@given(data=st.data(), method=st.sampled_from(["exact", "approx"]))
def test_mvue_kernel_twin(data, method):
    from sparsetrain.kernels.mvue import mvue24_forward

    g = data.draw(weights(4))
    r = 1 if method == "exact" else 2
    u = data.draw(uniforms_for((r, g.shape[0], g.shape[1] // 4, 1)))
    want = ops.mvue24(g, dim=-1, method=method, uniforms=u)
    got = mvue24_forward(g, -1, method, uniforms=u)
    _mvue_checks(got, g, method)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got != 0, want != 0)  # the same entries kept, given the same uniforms
    ok = ~torch.isnan(want)
    if method == "exact":
        assert torch.equal(got[ok], want[ok])
    else:  # 1/p may be summed in another order: a few float32 ulp, one ulp of a half dtype
        rtol = 5e-7 if g.dtype == torch.float32 else torch.finfo(g.dtype).eps
        torch.testing.assert_close(got[ok], want[ok], rtol=rtol, atol=0)


# ------------------------------------------------------------------------------------ unbiasedness


def _approx_p(a, eps=1e-30):
    """P(i among two sequential draws), by enumerating the 12 ordered pairs (eps as documented)."""
    e = [float(torch.tensor(x, dtype=torch.float32) + torch.tensor(eps, dtype=torch.float32)) for x in a]
    s = sum(e)
    p = [0.0] * 4
    for i, j in itertools.permutations(range(4), 2):
        pr = e[i] / s * e[j] / sum(e[k] for k in range(4) if k != i)
        p[i] += pr
        p[j] += pr
    return p


ADVERSARIAL = [
    [1.0e4, 1.0e-3, -2.0e-3, 0.0],  # one huge entry
    [1.0, 1.0, 1.0, 1.0],  # all equal
    [-0.5, 0.5, 0.5, -0.5],  # equal magnitudes, mixed signs
    [0.0, 0.0, 3.0, 0.0],  # a single non-zero
    [0.0, 2.0, 0.0, -1.0],  # exactly two
    [2.0, 1.0, 1.0, 0.0],  # the largest equals the rest
    [1e-40, 2e-40, 0.0, -3e-41],  # denormals
    [65000.0, -60000.0, 65504.0, 1000.0],  # near the float16 max (computed in float32)
]
_DRAWS = 20000


def _unbiased(out, method, k=_DRAWS):
    """Per entry: |mean of K draws - g| within z sqrt(Var / K), Var = g^2 (1/p - 1), with a
    Bonferroni-corrected z for all entries at family-wise error 1e-6 (seeded: not flaky)."""
    g = torch.tensor(ADVERSARIAL, dtype=torch.float32).double()  # (8, 4): the values the op sees
    draws = out.double().reshape(k, len(ADVERSARIAL), 4)
    pfun = exact_mvue_probabilities if method == "exact" else _approx_p
    p = torch.tensor([pfun([abs(x) for x in row]) for row in g.tolist()], dtype=torch.float64)
    var = torch.where(p > 0, g**2 * (1 / p.clamp_min(1e-300) - 1), torch.zeros_like(g))
    z = NormalDist().inv_cdf(1 - 1e-6 / (2 * g.numel()))
    # p and g / p are computed in float32 in ~10 roundings (approx), each off by at most 2^-24
    # relative (2^-150 absolute among denormals): a deterministic bias of up to 16 ulp of g.
    bound = z * (var / k).sqrt() + 2.0**-20 * g.abs() + 2.0**-149
    err = (draws.mean(0) - g).abs()
    assert bool((err <= bound).all()), (method, err, bound)
    assert int(((draws != 0).sum(-1) > 2).sum()) == 0


@pytest.mark.parametrize("method", ["exact", "approx"])
def test_mvue_unbiased_on_adversarial_groups(method):
    g = torch.tensor(ADVERSARIAL, dtype=torch.float32).reshape(1, -1).repeat(_DRAWS, 1)  # (K, 32)
    out = ops.mvue24(g, dim=-1, method=method, generator=torch.Generator().manual_seed(11))
    _unbiased(out, method)


@needs_triton
@pytest.mark.parametrize("method", ["exact", "approx"])
def test_mvue_kernel_unbiased_on_adversarial_groups(method):
    from sparsetrain.kernels.mvue import mvue24_forward

    k = 8000  # fewer draws than the torch op: the interpreter is slow (the bound scales with k)
    g = torch.tensor(ADVERSARIAL, dtype=torch.float32).reshape(1, -1).repeat(k, 1)
    out = mvue24_forward(g, -1, method, torch.Generator().manual_seed(12))
    _unbiased(out, method, k)


# ------------------------------------------------------------------------------------ transposable


def _tile_counts_ok(mask, n, m):
    r, c = mask.shape
    for ti in range(0, r, m):
        for tj in range(0, c, m):
            tile = [[bool(mask[ti + i, tj + j]) for j in range(m)] for i in range(m)]
            if any(sum(row) != n for row in tile) or any(sum(col) != n for col in zip(*tile)):
                return False
    return True


@_props(25)
@given(data=st.data(), method=st.sampled_from(TRANSPOSABLE_METHODS),
       nm=st.sampled_from([(2, 4), (1, 4), (2, 8), (4, 8)]))
def test_transposable_exactly_n_per_row_and_column(data, method, nm):
    n, m = nm
    if method == "exact24":
        n, m = 2, 4
    rt, ct = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    w = data.draw(weights(m, finite_only=True, max_rows=rt * m, max_groups=ct, nonneg=True))
    w = w[: (w.shape[0] // m) * m] if w.shape[0] >= m else w.repeat(m, 1)[:m]
    mask = ops.transposable_mask(w, n, m, method=method)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert _tile_counts_ok(mask, n, m)


@needs_triton
@_props(30)
@given(data=st.data())
def test_transposable_kernel_twin_bit_equal(data):
    from sparsetrain.kernels import transposable24

    w = data.draw(weights(4, finite_only=True, max_rows=8, max_groups=3, nonneg=True))
    w = w.repeat(4, 1)[: 4 * max(1, w.shape[0] // 4)]
    got = transposable24(w)
    assert torch.equal(got, ops.transposable_mask(w, 2, 4, method="exact24"))
    assert _tile_counts_ok(got, 2, 4)


@needs_triton
def test_transposable_nonfinite_is_an_error_in_op_and_kernel():
    from sparsetrain.kernels import transposable24

    w = torch.rand(4, 8)
    w[1, 5] = NAN
    with pytest.raises(ValueError, match="1 non-finite"):
        ops.transposable_mask(w, 2, 4, method="exact24")
    with pytest.raises(ValueError, match="1 non-finite"):
        transposable24(w)


def test_sste_layer_mask_is_nm_mask_on_ties():
    """The CPU layer path used the support of S(W) as S-STE's mask; on tied groups that is smaller
    than the kernel's top-n mask, so flip rate and zero count differed between CPU and GPU."""
    from sparsetrain.methods import masked_weight

    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, -2.0, 2.0, 0.5, 0.0, 0.0, 0.0, 0.0]])
    w_eff, mask = masked_weight(w, "s-ste", 2, 4, beta=torch.tensor(1.0))
    assert torch.equal(mask, ref_mask(w.double().tolist(), 2, 4))
    assert mask.tolist() == [[True, True, False, False, True, True, False, False, True, True, False, False]]
    assert not bool(w_eff[~mask].any())  # W~ stays inside the mask
