"""The benchmark suite exits cleanly, saying so, on a machine without a GPU."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_suite_without_gpu_exits_zero(tmp_path):
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no CUDA device" in res.stdout
    assert not list(tmp_path.iterdir())  # nothing written
