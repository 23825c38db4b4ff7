"""`sparsetrain report`: curves into a PNG and the final numbers, from CSV logs written here."""

import csv
import json
import os
import re
import struct
import zlib
from pathlib import Path

import pytest

from sparsetrain.cli import main

FIELDS = ["epoch", "lr", "sparsity/beta_mean", "sparsity/flip_rate", "sparsity/zero_fraction", "step",
          "train/loss", "train/ppl", "val/loss", "val/ppl"]


def _write_log(path: Path, steps: int, loss0: float, val_every: int, sparse: bool = True) -> dict:
    """A Lightning-style metrics.csv: one row per training step, separate rows for validation.

    Values carry at most 4 significant digits, so the table (printed with 4) shows them exactly.
    Returns the last value of each metric as written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    last = {}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for step in range(steps):
            row = {"epoch": 0, "step": step, "lr": "0.001", "train/loss": f"{loss0 - 0.01 * step:.3f}",
                   "train/ppl": "10.0"}
            if sparse:
                row["sparsity/flip_rate"] = f"{0.01 / (step + 1):.3g}"
                row["sparsity/zero_fraction"] = "0.5"
                row["sparsity/beta_mean"] = f"{1.1 + 0.001 * step:.4g}"
            w.writerow(row)
            last.update({k: float(v) for k, v in row.items() if k not in ("epoch", "step")})
            if (step + 1) % val_every == 0:
                val = {"epoch": 0, "step": step, "val/loss": f"{loss0 - 0.2 - 0.005 * step:.4g}", "val/ppl": "9"}
                w.writerow(val)
                last.update({k: float(v) for k, v in val.items() if k not in ("epoch", "step")})
    last["step"] = steps - 1
    return last


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature and the chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:29]
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(kind + body)
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", body[:8])


def _table_row(out: str, label: str) -> list[str]:
    for line in out.splitlines():
        if line.startswith(label + " ") and ": read" not in line:
            return line[len(label):].split()
    raise AssertionError(f"no table row for {label!r} in:\n{out}")


def test_report_table_png_and_json(tmp_path, capsys):
    sparse_dir, dense_dir = tmp_path / "s-ste", tmp_path / "dense"
    want = _write_log(sparse_dir / "logs" / "version_0" / "metrics.csv", steps=40, loss0=5.0, val_every=10)
    want_dense = _write_log(dense_dir / "logs" / "version_0" / "metrics.csv", steps=40, loss0=4.9, val_every=10,
                            sparse=False)
    png, js = tmp_path / "out" / "r.png", tmp_path / "r.json"
    rc = main(["report", str(sparse_dir), "--dense", str(dense_dir), "--out", str(png), "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    # The table's numbers are the last values written (step 39; the last validation at step 39).
    cells = _table_row(out, str(sparse_dir))
    step, train, val, gap, flip, zero, beta = cells
    assert int(step) == want["step"] == 39
    assert float(train) == want["train/loss"] == 4.61
    assert float(val) == want["val/loss"] == pytest.approx(5.0 - 0.2 - 0.005 * 39)
    assert float(gap) == pytest.approx(want["val/loss"] - want_dense["val/loss"])  # 4.605 - 4.505
    assert float(gap) == pytest.approx(0.1)
    assert float(flip) == want["sparsity/flip_rate"] == 0.00025
    assert float(zero) == want["sparsity/zero_fraction"] == 0.5
    assert float(beta) == want["sparsity/beta_mean"] == 1.139
    dense_cells = _table_row(out, f"{dense_dir} (dense)")
    assert float(dense_cells[2]) == want_dense["val/loss"] and dense_cells[4] == "-"  # dense: no flip rate
    assert f"read {sparse_dir / 'logs' / 'version_0' / 'metrics.csv'}" in out
    # JSON: the same numbers at full precision.
    rows = json.loads(js.read_text())
    assert rows[0]["train/loss"] == want["train/loss"] and rows[0]["val_gap_step"] == 39
    assert rows[0]["val_gap"] == want["val/loss"] - want_dense["val/loss"]
    # A valid PNG of the size drawn (12 x 8 in at 100 dpi), big enough to hold four panels of curves.
    assert _png_size(png) == (1200, 800)
    assert png.stat().st_size > 20_000


def test_report_reads_the_newest_version_or_merges_them(tmp_path, capsys):
    run = tmp_path / "run"
    _write_log(run / "logs" / "version_0" / "metrics.csv", steps=20, loss0=6.0, val_every=10)
    newest = _write_log(run / "logs" / "version_2" / "metrics.csv", steps=30, loss0=3.0, val_every=10)
    _write_log(run / "logs" / "version_1" / "metrics.csv", steps=25, loss0=4.0, val_every=5)
    # Make version_1 the most recently modified: the version number decides, not the time.
    os.utime(run / "logs" / "version_1" / "metrics.csv", (2e9, 2e9))
    assert main(["report", str(run), "--out", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    cells = _table_row(out, str(run))
    assert int(cells[0]) == 29 and float(cells[1]) == newest["train/loss"]
    assert "version_2" in out and "version_1" not in out
    assert cells[3] == "-"  # no dense run, no gap

    # Merged: version 0, 1, 2 in order; steps 0..29 come from version_2, which is read last.
    js = tmp_path / "m.json"
    assert main(["report", str(run), "--merge-versions", "--out", str(tmp_path / "b.png"), "--json", str(js)]) == 0
    (row,) = json.loads(js.read_text())
    assert [Path(p).parent.name for p in row["log"]] == ["version_0", "version_1", "version_2"]
    assert row["train/loss"] == newest["train/loss"] and row["step"] == 29


def test_report_skips_evaluation_only_logs_and_lists_evaluations(tmp_path, capsys):
    # Before evaluations were recorded apart, `sparsetrain validate` added a version_N holding one
    # step-0 validation row: it must neither replace the training curves nor join them.
    run = tmp_path / "run"
    trained = _write_log(run / "logs" / "version_0" / "metrics.csv", steps=20, loss0=6.0, val_every=10)
    _csv(run / "logs" / "version_1", "epoch,step,val/loss,val/ppl\n0,0,3.25,25.8\n")
    (run / "evaluations.jsonl").write_text(
        json.dumps({"command": "test", "checkpoint": str(run / "checkpoints" / "last.ckpt"), "step": 20,
                    "metrics": {"test/loss": 3.5}, "time": "t"}) + "\n" + '{"command": "validate", "chec\n')
    js = tmp_path / "r.json"
    for merge in ([], ["--merge-versions"]):
        assert main(["report", str(run), *merge, "--out", str(tmp_path / "a.png"), "--json", str(js)]) == 0
        out = capsys.readouterr().out
        (row,) = json.loads(js.read_text())
        assert [Path(p).parent.name for p in row["log"]] == ["version_0"]
        assert row["step"] == 19 and row["val/loss"] == trained["val/loss"] and row["train/loss"] == trained["train/loss"]
        assert "version_1" in out and "no training rows" in out
        # The cut-short second line is skipped, the first listed with its numbers.
        assert [e["command"] for e in row["evaluations"]] == ["test"]
        assert f"{run}: test of last.ckpt (after 20 steps): test/loss 3.5" in out


def test_report_with_a_dense_run_that_never_validated_draws_the_rest(tmp_path, capsys):
    _write_log(tmp_path / "s" / "metrics.csv", steps=12, loss0=5.5, val_every=6)
    _write_log(tmp_path / "d" / "metrics.csv", steps=12, loss0=5.4, val_every=100, sparse=False)
    png = tmp_path / "r.png"
    assert main(["report", str(tmp_path / "s"), "--dense", str(tmp_path / "d"), "--out", str(png)]) == 0
    captured = capsys.readouterr()
    assert "logged no val/loss" in captured.err and "val gap is left out" in captured.err
    assert _table_row(captured.out, str(tmp_path / "s"))[3] == "-"
    assert _png_size(png) == (1200, 800)


def test_report_compares_several_runs(tmp_path, capsys):
    a = _write_log(tmp_path / "a" / "metrics.csv", steps=12, loss0=5.5, val_every=6)
    b = _write_log(tmp_path / "b" / "metrics.csv", steps=18, loss0=5.2, val_every=6)
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b" / "metrics.csv"),
                 "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert float(_table_row(out, str(tmp_path / "a"))[1]) == a["train/loss"]
    assert float(_table_row(out, str(tmp_path / "b" / "metrics.csv"))[2]) == b["val/loss"]
    _png_size(tmp_path / "c.png")


def _csv(folder: Path, text: str) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(text)


@pytest.mark.parametrize("name, make, message", [
    ("missing", lambda d: None, r"RUN_DIR '.*missing' does not exist"),
    ("empty", lambda d: (d / "checkpoints").mkdir(parents=True), r"no CSV log \(metrics.csv\) under '.*empty'"),
    ("other", lambda d: _csv(d, "a,b\n1,2\n"), r"is not a Lightning CSV log: it has no 'step' column"),
    ("foreign", lambda d: _csv(d, "step,acc\n1,0.5\n"), r"holds none of train/loss"),
    ("garbled", lambda d: _csv(d, "step,train/loss\n1,2.5\n2,oops\n"),
     r"metrics.csv' line 3: column 'train/loss' holds 'oops', not a number"),
])
def test_report_errors_are_one_line(tmp_path, capsys, name, make, message):
    make(tmp_path / name)
    assert main(["report", str(tmp_path / name), "--out", str(tmp_path / "x.png")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sparsetrain report: error: ")  # no usage dump, no traceback
    assert re.search(message, lines[0])
    assert not (tmp_path / "x.png").exists()
