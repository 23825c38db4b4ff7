"""The `sparsetrain` command end to end on a few steps: fit, checkpoint, resume, validate, export, reload."""

import csv
import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from sparsetrain.cli import main, nm_violations

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny-s-ste.yaml")


class Killed(Exception):
    """Stands in for a run killed mid-way."""


class KillAtStep(L.Callback):
    """Raise `Killed` when training reaches ``step`` (after the checkpoint of the step before)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise Killed(trainer.global_step)


def _args(root: Path, cache: Path, *extra):
    # A tiny model and corpus: the recipe's settings with sizes cut down.
    return [
        "--config", RECIPE,
        "--trainer.max_steps", "8",
        "--trainer.val_check_interval", "4",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(root),
        "--trainer.callbacks.init_args.every_n_train_steps", "4",
        "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "64",
        "--model.warmup_steps", "2",
        "--data.block_size", "64", "--data.batch_size", "4",
        "--data.max_files", "40", "--data.val_fraction", "0.1", "--data.max_val_blocks", "8",
        "--data.cache_dir", str(cache),
        *extra,
    ]


def _metrics(run: Path) -> list[dict]:
    rows = []
    for f in sorted(run.glob("logs/version_*/metrics.csv")):
        rows += list(csv.DictReader(f.open()))
    return rows


def _series(rows, key):
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One 8-step run; returns its run directory (``ROOT/run_0``) and the token cache."""
    root = tmp_path_factory.mktemp("full")
    cache = tmp_path_factory.mktemp("cache")
    assert main(["fit", *_args(root, cache)]) == 0
    return root / "run_0", cache


def test_fit_logs_and_checkpoints(uninterrupted):
    root, _ = uninterrupted
    rows = _metrics(root)
    loss = _series(rows, "train/loss")
    assert sorted(loss) == list(range(8))
    assert all(math.isfinite(v) for v in loss.values())
    assert loss[7] < loss[0]
    for key in ("train/ppl", "lr", "train/tokens_per_s", "sparsity/flip_rate", "sparsity/beta_mean",
                "sparsity/zero_fraction"):
        assert _series(rows, key), key
    ppl = _series(rows, "train/ppl")
    assert ppl[3] == pytest.approx(math.exp(loss[3]), rel=1e-4)
    assert _series(rows, "sparsity/zero_fraction")[7] == pytest.approx(0.5, abs=1e-3)
    assert set(_series(rows, "val/loss")) == {3, 7}
    assert (root / "checkpoints" / "last.ckpt").exists()
    assert sorted(p.name for p in root.parent.iterdir()) == ["run_0"]


def test_resume_from_last_gives_the_same_loss_curve(uninterrupted, tmp_path, capsys):
    full_root, cache = uninterrupted
    kill = json.dumps({"class_path": "test_cli.KillAtStep", "init_args": {"step": 6}})
    with pytest.raises(Killed):
        main(["fit", *_args(tmp_path, cache, "--run_name", "killed", "--trainer.callbacks+=" + kill)])
    run = tmp_path / "killed"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4  # the kill came after the step-4 checkpoint, before step 8
    capsys.readouterr()
    assert main(["fit", *_args(tmp_path, cache, "--ckpt_path", "last")]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run / 'checkpoints' / 'last.ckpt'} (step 4)" in out  # says which
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed"]  # no new run directory
    assert not list(run.glob("checkpoints/*-v*.ckpt"))  # last.ckpt replaced, no last-v1.ckpt beside it
    full = _series(_metrics(full_root), "train/loss")
    resumed = _series(_metrics(run), "train/loss")
    assert sorted(resumed) == list(range(8))
    for step in range(8):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    full_val, resumed_val = _series(_metrics(full_root), "val/loss"), _series(_metrics(run), "val/loss")
    assert resumed_val[7] == pytest.approx(full_val[7], rel=1e-5)


def test_export_is_nm_and_reloads_with_the_same_val_loss(uninterrupted, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from sparsetrain.data import TextDataModule

    root, cache = uninterrupted
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(root / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    info = json.loads((out / "sparsetrain.json").read_text())
    assert len(info["nm_checked_layers"]) == 4  # c_fc and c_proj of 2 blocks
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    for name in info["nm_checked_layers"]:
        layer = model.get_submodule(name)
        assert isinstance(layer, Conv1D)
        w = layer.weight.detach().t()  # (out, in)
        # Independent check: every group of 4 along the input dim has exactly 2 zeros or more.
        groups = w.reshape(w.shape[0], -1, 4)
        assert bool(((groups == 0).sum(-1) >= 2).all())
        assert nm_violations(w, 2, 4) == 0
    # Validation loss of the reloaded model over the same blocks, with a plain loop.
    dm = TextDataModule(**{k: v for k, v in info["data"].items()})
    dm.setup("validate")
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            logits = model(input_ids=x).logits
            total += torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1),
                                                       reduction="sum").item()
            count += y.numel()
    logged = _series(_metrics(root), "val/loss")[7]
    assert total / count == pytest.approx(logged, rel=1e-4)


def test_prune_a_training_checkpoint(uninterrupted, tmp_path):
    """`sparsetrain prune --model CKPT`: a `fit` checkpoint (S-STE layers inside) is exported, pruned
    2:4 on every block layer (attention too) and saved; the saved model loads with transformers."""
    from transformers import AutoModelForCausalLM

    root, _ = uninterrupted
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", str(root / "checkpoints" / "last.ckpt"), "--method", "sparsegpt",
               "--out", str(out), "--calib-seqs", "4", "--eval-seqs", "2", "--seq-len", "32",
               "--max-bytes", "200000"])
    assert rc == 0
    report = json.loads((out / "prune_report.json").read_text())
    layers = report["report"]["layers"]
    assert len(layers) == 8 and all(r["rel_error"] >= 0 for r in layers)
    assert report["perplexity_after"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    for block in model.transformer.h:
        for conv in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert nm_violations(conv.weight.t(), 2, 4) == 0


def test_validate_subcommand_matches_the_logged_val_loss(uninterrupted, tmp_path):
    root, cache = uninterrupted
    run = tmp_path / "copy"
    shutil.copytree(root, run)
    logged = _series(_metrics(run), "val/loss")[7]
    args = _args(tmp_path, cache, "--ckpt_path", str(run))  # a run directory: its newest checkpoint
    assert main(["validate", *args]) == 0
    # The result is an evaluation of the run (its evaluations.jsonl), not a new training log.
    (record,) = [json.loads(l) for l in (run / "evaluations.jsonl").read_text().splitlines()]
    assert record["command"] == "validate" and record["step"] == 8
    assert record["metrics"]["val/loss"] == pytest.approx(logged, rel=1e-5)


def _short_error(capsys) -> str:
    """The stderr of a failed command, checked to be at most two lines."""
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) <= 2, err
    return err


def test_unknown_config_field_fails_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layers: 3\n")
    assert main(["fit", "--config", RECIPE, "--config", str(bad)]) == 2
    err = _short_error(capsys)
    assert f"{bad}:2: unknown field `model.n_layers`; did you mean `model.n_layer`?" in err


def test_ill_typed_config_field_fails_naming_it(tmp_path, capsys):
    assert main(["fit", "--config", RECIPE, "--data.batch_size", "many",
                 "--trainer.default_root_dir", str(tmp_path)]) == 2
    err = _short_error(capsys)
    assert "data.batch_size" in err
    assert not any(tmp_path.iterdir())


def test_bad_sparsity_value_fails_before_training(tmp_path, capsys):
    assert main(["fit", "--config", RECIPE, "--sparsity.method", "magic",
                 "--trainer.default_root_dir", str(tmp_path)]) == 2
    err = _short_error(capsys)
    assert "invalid `sparsity` section: Unknown `method`='magic'; valid choices:" in err
    assert not any(tmp_path.iterdir())


def test_export_rejects_a_missing_checkpoint(tmp_path, capsys):
    assert main(["export", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o")]) == 2
    err = _short_error(capsys)
    assert f"`ckpt`='{tmp_path / 'nope.ckpt'}' does not exist" in err


def test_unknown_subcommand():
    assert main(["train"]) == 2


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(RECIPE).parent).glob("*.yaml")))
def test_every_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(Path(RECIPE).parent / recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "sparsity:" in capsys.readouterr().out


def _quality_benchmark():
    """`benchmarks/pretrain_quality.py` as a module (benchmarks/ is not a package)."""
    import importlib.util

    path = Path(RECIPE).parents[1] / "benchmarks" / "pretrain_quality.py"
    spec = importlib.util.spec_from_file_location("pretrain_quality", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_quality_benchmark_runs(tmp_path):
    # The full table takes ~30 CPU-minutes: `python benchmarks/pretrain_quality.py`. This only checks it runs.
    bench = _quality_benchmark()
    assert bench.main(["--steps", "4", "--val-every", "2", "--seeds", "1", "--methods", "dense", "s-ste",
                       "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "pretrain_quality.json").read_text())
    assert set(result["table"]) == {"dense", "s-ste"}


def test_quality_benchmark_merges_jobs_run_side_by_side(tmp_path, monkeypatch):
    # Two jobs of one setup write the same JSON: what the other job wrote while this one trained is
    # kept, a run of another setup is dropped, and this job's runs replace its own earlier ones.
    bench = _quality_benchmark()
    out = tmp_path / "pretrain_quality.json"
    settings = ["model.n_embd=64"]

    def fake(method, seed, loss, setup=settings):
        return {"method": method, "seed": seed, "steps": 4, "settings": list(setup), "final_val_loss": loss,
                "val_curve": [[2, loss + 0.1], [4, loss]], "flip_rate": 0.0, "final_flip_rate": 0.0, "flip_curve": [],
                "wall_s": 1.0}

    def write(runs):
        out.write_text(json.dumps({"runs": runs}))

    write([fake("dense", 1, 2.0), fake("ste", 1, 9.9), fake("ste", 2, 2.5, setup=["model.n_embd=32"])])

    def run_one(method, seed, steps, val_every, workdir, cache, settings_):
        # meanwhile the other job finished its "sr-ste" row
        write(json.loads(out.read_text())["runs"] + [fake("sr-ste", 1, 2.3)])
        return fake(method, seed, 2.2)

    monkeypatch.setattr(bench, "run_one", run_one)
    assert bench.main(["--steps", "4", "--seeds", "1", "--rows", "ste", "--set", *settings,
                       "--out", str(tmp_path)]) == 0
    runs = {(r["method"], r["seed"]): r["final_val_loss"] for r in json.loads(out.read_text())["runs"]}
    assert runs == {("dense", 1): 2.0, ("ste", 1): 2.2, ("sr-ste", 1): 2.3}


def test_quality_table_statistics_by_hand():
    bench = _quality_benchmark()
    losses = {("dense", 1): 1.0, ("dense", 2): 1.2, ("ste", 1): 1.5, ("ste", 2): 1.6, ("ste", 3): 2.0,
              ("s-ste", 1): 1.25, ("s-ste", 2): 1.3,
              ("dense-lr4e-3", 1): 0.9, ("dense-lr4e-3", 2): 1.0, ("ste-lr4e-3", 1): 1.3, ("ste-lr4e-3", 2): 1.4,
              ("s-ste-lr4e-3", 1): 1.1, ("s-ste-lr4e-3", 2): 1.2}
    runs = [{"method": m, "seed": s, "final_val_loss": v, "flip_rate": 0.0} for (m, s), v in losses.items()]
    table = bench.summarise(runs)
    row = table["s-ste"]
    # of the means over seeds 1-2, the ones s-ste shares with dense and STE: (1.55 - 1.275) / (1.55 - 1.1)
    assert row["ste_gap_closed"] == pytest.approx(0.275 / 0.45)
    assert row["ste_gap_closed_per_seed"] == pytest.approx([0.25 / 0.5, 0.3 / 0.4])
    # paired by seed: -0.25, -0.30; sd 0.05 / sqrt(2); t(0.975, 1 df) = 12.7062
    pd = row["paired_diff_to_ste"]
    assert pd["mean"] == pytest.approx(-0.275)
    half = 12.7062 * (0.05 / 2 ** 0.5) / 2 ** 0.5
    assert pd["ci95"] == pytest.approx([-0.275 - half, -0.275 + half], rel=1e-4)
    assert not pd["excludes_zero"]
    assert row["gap_to_dense"] == pytest.approx(1.275 - 1.1)
    # a row at another lr is measured against dense and STE at that lr
    other = table["s-ste-lr4e-3"]
    assert other["compared_with"] == ["dense-lr4e-3", "ste-lr4e-3"]
    assert other["ste_gap_closed"] == pytest.approx((1.35 - 1.15) / (1.35 - 0.95))
    assert other["paired_diff_to_ste"]["mean"] == pytest.approx(-0.2)


def test_progress_bar_for_step_bounded_runs():
    import types

    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    from sparsetrain.progress import default_progress_bar as _default_progress_bar

    assert _default_progress_bar({"enable_progress_bar": False}, []) is None
    assert _default_progress_bar({"callbacks": [TQDMProgressBar()]}, []) is None
    bar = _default_progress_bar({}, [])
    if not _RICH_AVAILABLE:
        return  # Lightning's tqdm bar has no "/-2"
    bar._trainer = types.SimpleNamespace(max_epochs=-1, max_steps=500)
    assert bar._get_train_description(0).strip() == "Epoch 0 (max 500 steps)"  # not "Epoch 0/-2"
    bar._trainer = types.SimpleNamespace(max_epochs=3, max_steps=-1)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"
