"""The GPU benchmark suite: it exits cleanly without a GPU, and its whole code path runs on CPU."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
KERNELS = {"project_ste", "project_sste", "mvue_exact_dim0", "mvue_approx_dim0", "transposable24"}


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_suite", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _error_keys(obj, path="") -> list:
    """Every key named like an error anywhere in ``obj``, with where it is."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "error" in str(k):
                found.append(f"{path}.{k}: {v}")
            found += _error_keys(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _error_keys(v, f"{path}[{i}]")
    return found


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_suite_without_gpu_exits_zero(tmp_path):
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--out", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no CUDA device" in res.stdout
    assert not list(tmp_path.iterdir())  # nothing written


def test_smoke_cpu_runs_every_section(tmp_path):
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, str(SUITE), "--smoke-cpu", "--out", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=240, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    path = tmp_path / "gpu_suite_cpu_smoke.json"
    assert path.exists(), res.stdout[-2000:]
    result = json.loads(path.read_text())
    assert not _error_keys(result), _error_keys(result)
    assert result["mode"] == "smoke-cpu" and result["device"] == "cpu" and result["complete"] is True
    assert result["gpu_tests"] == {"skipped": "--smoke-cpu"}
    assert result["peak_GBps"] is None

    layers = result["layers"]
    assert {r["module"] for r in layers} == {"linear", "ffn"}
    for module in ("linear", "ffn"):
        assert {r["method"] for r in layers if r["module"] == module} >= {"dense", "ste", "s-ste", "s-ste+mvue", "transposable"}
    for row in layers:
        assert row["ms"] > 0 and row["ms_recompress"] > 0 and row["peak_mem_bytes"] is None
        if row["method"] == "dense":
            continue
        assert row["backend"] == "dense"  # no cuSPARSELt on CPU: the fall-back is visible
        assert row["backends"] == (["dense"] if row["module"] == "linear" else ["dense", "dense"])
        assert row["fallback_reason"]
        assert row["dense_ms"] > 0 and row["speedup"] > 0 and row["speedup_recompress"] > 0
        assert "meets_target" not in row  # the target shape is not in the smoke run

    kernels = result["kernels"]
    assert {r["kernel"] for r in kernels} == KERNELS
    for row in kernels:
        assert row["ms"] > 0 and row["GBps"] > 0 and row["interpreted"] is True
        assert row["fraction_of_peak"] is None and row["meets_target"] is None

    (e2e,) = result["end_to_end"]
    for variant in ("dense", "s-ste+mvue"):
        assert e2e[variant]["ms"] > 0
        assert e2e[variant]["final_loss"] == pytest.approx(e2e[variant]["final_loss"])  # finite, not NaN
    assert e2e["s-ste+mvue"]["sparse_layers"] == 4  # c_fc and c_proj of 2 blocks
    assert e2e["s-ste+mvue"]["backends"] == {"dense": 4}
    assert e2e["speedup"] > 0

    assert set(result["targets"]) == {"ffn_speedup", "kernel_fraction_of_peak", "end_to_end_speedup"}
    assert all(t["met"] is None for t in result["targets"].values())  # nothing a target applies to on CPU
    assert elapsed < 120, f"the smoke run took {elapsed:.0f} s; keep it quick for CI"


def test_targets_apply_where_the_issue_sets_them():
    suite = _load_suite()
    assert ("d4096-ff16384", 4096, 16384) in suite.FFN_SHAPES
    row = {"module": "ffn", "d": 4096, "ff": 16384, "tokens": 16384, "method": "s-ste+mvue"}
    assert suite.ffn_target(row) == 1.3
    assert suite.ffn_target({**row, "tokens": 4096}) is None
    assert suite.ffn_target({**row, "module": "linear"}) is None
    assert suite.ffn_target({**row, "method": "dense"}) is None

    def layer(method, speedup):
        return {**row, "method": method, "speedup": speedup, "target_speedup": 1.3,
                "meets_target": None if speedup is None else speedup >= 1.3}

    def kernel(frac, l2):
        return {"kernel": "k", "shape": [8, 8], "fraction_of_peak": frac, "fits_in_l2": l2,
                "target_fraction": 0.7, "meets_target": None if frac is None else frac >= 0.7}

    result = {
        "layers": [layer("ste", 1.5), layer("s-ste+mvue", 1.2)],
        "kernels": [kernel(0.9, True), kernel(0.75, False)],
        "end_to_end": [{"model": "gpt2-124m", "speedup": 1.2, "target_speedup": 1.1, "meets_target": True},
                       {"model": "gpt2-774m", "speedup": None, "target_speedup": 1.1, "meets_target": None}],
    }
    t = suite.summarize_targets(result)
    assert t["ffn_speedup"]["met"] is False  # the primary method, S-STE+MVUE, misses it
    assert t["ffn_speedup"]["met_by"] == ["ste"]
    assert t["kernel_fraction_of_peak"]["met"] is True  # the row read from L2 does not count
    assert list(t["kernel_fraction_of_peak"]["results"]) == ["k@8x8"]
    assert t["end_to_end_speedup"]["met"] is None  # 774M not measured: not evaluated
    result["end_to_end"][1].update(speedup=1.0, meets_target=False)
    assert suite.summarize_targets(result)["end_to_end_speedup"]["met"] is False
    assert suite.summarize_targets({"layers": {"error": "x"}})["ffn_speedup"]["met"] is None
