"""Lightning's FSDP2 strategy (`ModelParallelStrategy`, `fully_shard`) on 2 gloo CPU processes.

Under FSDP2 each rank holds half the rows of every weight; the engine's beta and metrics are sums
over the shards (reference: beta of the whole weight, computed here in float64), and the
checkpoint is restored after the strategy's setup (after `on_fit_start`), which the adapter must
survive to resume exactly (reference: the uninterrupted run).
"""

import os
import subprocess
import sys

import pytest
import torch

import sparsetrain as st
from lightning_helpers import TinyRegressor


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    script = os.path.join(os.path.dirname(__file__), "lightning_fsdp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, script, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_fsdp2_ranks_agree_and_resume_exactly(fsdp_run):
    r0, r1 = fsdp_run
    assert r0["sharded"] and r1["sharded"]  # the weights really were DTensor shards
    assert r0["metrics"] == r1["metrics"]
    for name in r0["full"]:
        for a, b in zip(r0["full"][name], r1["full"][name]):
            assert torch.equal(a, b), name
        # a resume from the step-2 checkpoint reaches the same weights, beta and MVUE draws
        for a, b in zip(r0["full"][name], r0["resumed"][name]):
            assert torch.equal(a, b), name


def test_fsdp2_beta_matches_a_single_process_run(fsdp_run):
    """beta is taken at fit start from the whole weight: sum <W,S(W)> / sum <S,S> over both shards."""
    torch.manual_seed(0)
    model = TinyRegressor()
    st.sparsify(model, st.SparsityConfig(method="s-ste", targets="all"))
    for name, layer in st.sparse_layers(model):
        w = layer.weight.detach().double()
        s = st.ops.soft_threshold(w)
        beta = float((w * s).sum() / (s * s).sum())
        assert float(fsdp_run[0]["full"][name][1]) == pytest.approx(beta, rel=1e-6), name
        assert float(fsdp_run[1]["full"][name][1]) == pytest.approx(beta, rel=1e-6), name
    # and every gathered W~ is exactly 2:4
    for name, (w_eff, _) in fsdp_run[0]["full"].items():
        assert int((w_eff != 0).reshape(w_eff.shape[0], -1, 4).sum(-1).max()) <= 2, name
