"""The command line after the first `fit` (issue 20, items 7-10 and 12): evaluating, resuming,
exporting and reporting a run, on one short run (2 layers, 32 wide, 3 steps)."""

import contextlib
import csv
import io
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from sparsetrain.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny-s-ste.yaml")


def _args(root: Path, cache: Path, *extra, steps: int = 3):
    return [
        "--config", RECIPE,
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", "3",
        "--trainer.log_every_n_steps", "2",  # the engine's metrics at step 2, not at the last step (3)
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(root),
        "--trainer.callbacks.init_args.every_n_train_steps", "1",
        "--trainer.callbacks.init_args.save_top_k", "-1",  # every step's checkpoint stays
        "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32",
        "--model.warmup_steps", "1",
        "--data.block_size", "32", "--data.batch_size", "2",
        "--data.max_files", "20", "--data.val_fraction", "0.1", "--data.max_val_blocks", "4",
        "--data.cache_dir", str(cache),
        "--threads", "1",
        *extra,
    ]


def _run(argv) -> tuple[int, str, str, list[str]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue(), [str(x.message) for x in w]


def _rows(run: Path) -> list[dict]:
    rows = []
    for f in sorted(run.glob("logs/version_*/metrics.csv")):
        rows += list(csv.DictReader(f.open()))
    return rows


def _last(rows, key) -> tuple[int, float]:
    found = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    return found[-1]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines and len(lines) <= 2, err
    return lines[0]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """``ROOT/run_0``: 3 steps, a checkpoint per step; returns (run dir, cache, stdout)."""
    root = tmp_path_factory.mktemp("root")
    cache = tmp_path_factory.mktemp("cache")
    rc, out, err, _ = _run(["fit", *_args(root, cache)])
    assert rc == 0, err
    return root / "run_0", cache, out


def _copy_root(run: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(run, root / run.name)
    return root


# ------------------------------------------------------------------------------------ item 12: fit summary

def _mlp_weights(ckpt_path: Path) -> dict:
    """The FFN weights of a checkpoint as (out, in) matrices: groups of 4 run along the last dim."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    out = {}
    for key, w in state.items():
        if key.endswith(("mlp.c_fc.weight", "mlp.c_proj.weight")):
            fan_in = 32 if ".c_fc." in key else 128  # n_embd 32, FFN 4 x 32
            out[key] = w if w.shape[1] == fan_in else w.t()
    assert len(out) == 4, list(state)
    return out


def _top2_mask(w: torch.Tensor) -> torch.Tensor:
    """2:4 mask by brute force: the two largest |w| of every group of four consecutive inputs."""
    groups = w.abs().reshape(w.shape[0], -1, 4)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return mask.reshape(w.shape)


def test_fit_summary_has_zero_fraction_and_flip_rate_whatever_the_log_interval(short_run):
    run, _, out = short_run
    summary = out[out.index("run finished"):]
    ckpts = run / "checkpoints"
    before, after = _mlp_weights(ckpts / "epoch=0-step=2.ckpt"), _mlp_weights(ckpts / "epoch=0-step=3.ckpt")
    flips = sum(int((_top2_mask(after[k]) != _top2_mask(before[k])).sum()) for k in after)
    total = sum(w.numel() for w in after.values())
    # S-STE keeps the 2 largest of 4 shrunk by the third: W~ is zero exactly off the top-2 mask.
    zeros = sum(int((~_top2_mask(w)).sum()) for w in after.values())
    assert f"zero fraction {zeros / total:.4f}, flip rate {flips / total:.2e}" in summary, summary
    assert flips > 0  # a changed mask, so the number says something


# ------------------------------------------------------------------------------------ items 7, 8: evaluations

def test_validate_and_test_without_ckpt_path_evaluate_the_newest_run_and_record_it(short_run, tmp_path):
    from sparsetrain.report import load_run

    run0, cache, _ = short_run
    root = _copy_root(run0, tmp_path)
    run = root / "run_0"
    logged_step, logged_val = _last(_rows(run), "val/loss")
    last_train = _last(_rows(run), "train/loss")

    rc, out, err, _ = _run(["validate", *_args(root, cache)])
    assert rc == 0, err
    assert f"evaluating {run / 'checkpoints' / 'last.ckpt'} (step 3; the newest checkpoint: no --ckpt_path" in out
    rc, out, err, _ = _run(["test", *_args(root, cache)])
    assert rc == 0, err
    assert sorted(p.name for p in root.iterdir()) == ["run_0"]  # no new run directory
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["version_0"]  # no step-0 log
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "evaluations.jsonl", "logs"]

    records = [json.loads(l) for l in (run / "evaluations.jsonl").read_text().splitlines()]
    assert [(r["command"], r["step"]) for r in records] == [("validate", 3), ("test", 3)]
    assert records[0]["checkpoint"] == str((run / "checkpoints" / "last.ckpt").resolve())
    # The trained model, not a fresh one: the same blocks' loss as fit's own last validation.
    assert records[0]["metrics"]["val/loss"] == pytest.approx(logged_val, rel=1e-5)
    assert set(records[1]["metrics"]) == {"test/loss", "test/ppl"}

    # `report` still draws the training run, and lists the evaluations apart.
    rc, out, err, _ = _run(["report", str(run), "--out", str(tmp_path / "r.png"), "--json", str(tmp_path / "r.json")])
    assert rc == 0, err
    row = json.loads((tmp_path / "r.json").read_text())[0]
    assert row["step"] == logged_step and row["train/loss"] == pytest.approx(last_train[1])
    assert row["val/loss"] == pytest.approx(logged_val)
    assert [(e["command"], e["step"]) for e in row["evaluations"]] == [("validate", 3), ("test", 3)]
    assert "validate of last.ckpt (after 3 steps): val/loss" in out and "test of last.ckpt (after 3 steps)" in out
    merged = load_run(str(run), merge_versions=True)
    assert merged.series["val/loss"] == [(logged_step, pytest.approx(logged_val))]  # no step-0 point


def test_evaluating_with_no_run_is_one_line_and_creates_nothing(tmp_path):
    root = tmp_path / "nothing"
    rc, _, err, _ = _run(["validate", *_args(root, tmp_path / "cache")])
    assert rc == 2
    line = _one_line(err)
    assert "nothing to validate: no --ckpt_path given and no run with a checkpoint" in line
    assert "sparsetrain fit" in line and not root.exists()


def test_evaluation_help_says_what_is_evaluated_and_where_it_goes():
    rc, out, _, _ = _run(["test", "--help"])
    assert rc == 0
    assert "(default for validate/test: `last`; the result goes to the run's" in out
    assert "evaluations.jsonl" in out and "to evaluate (default: the newest)" in out
    rc, out, _, _ = _run(["fit", "--help"])
    assert "default for validate/test" not in out and "(default: the next run_N)" in out


def test_evaluating_a_checkpoint_outside_a_run_records_nothing(short_run, tmp_path):
    run, cache, _ = short_run
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(run / "checkpoints" / "last.ckpt", loose / "model.ckpt")
    rc, out, err, _ = _run(["validate", *_args(tmp_path / "root", cache, "--ckpt_path", str(loose / "model.ckpt"))])
    assert rc == 0, err
    assert "not recorded" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loose"]
    assert sorted(p.name for p in loose.iterdir()) == ["model.ckpt"]


# ------------------------------------------------------------------------------------ item 9: resume

class BarProbe(L.Callback):
    """Records the progress bar's count and total when training ends."""

    seen: list = []

    def on_train_end(self, trainer, pl_module) -> None:
        from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

        bar = trainer.progress_bar_callback
        if isinstance(bar, RichProgressBar):
            task = bar.progress.tasks[bar.train_progress_bar_id]
            BarProbe.seen.append((task.completed, task.total))
        elif isinstance(bar, TQDMProgressBar):
            BarProbe.seen.append((bar.train_progress_bar.n, bar.train_progress_bar.total))


@pytest.mark.parametrize("rich", [True, False], ids=["rich-bar", "tqdm-bar"])
def test_resume_of_a_moved_run_replaces_last_ckpt_and_counts_steps(short_run, tmp_path, monkeypatch, rich):
    # The run directory is copied elsewhere (as a relative `default_root_dir` resumed by absolute
    # path also renames it): its checkpoints still belong to it.
    import lightning.pytorch.utilities.imports as lightning_imports

    if rich and not lightning_imports._RICH_AVAILABLE:
        pytest.skip("rich is not installed")
    monkeypatch.setattr(lightning_imports, "_RICH_AVAILABLE", rich)  # without rich, the bar is tqdm's
    run0, cache, _ = short_run
    root = _copy_root(run0, tmp_path)
    run = root / "run_0"
    probe = json.dumps({"class_path": "test_cli_lifecycle.BarProbe"})
    BarProbe.seen.clear()
    rc, out, err, caught = _run(["fit", *_args(root, cache, "--ckpt_path", "last", "--trainer.max_steps", "5",
                                               "--trainer.enable_progress_bar", "true",
                                               "--trainer.callbacks+=" + probe)])
    assert rc == 0, err
    assert not [w for w in caught if "dirpath has changed" in w], caught
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt", "epoch=0-step=4.ckpt",
                     "epoch=0-step=5.ckpt", "last.ckpt"]  # no last-v1.ckpt
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["global_step"] == 5
    assert f"checkpoint: {run / 'checkpoints' / 'last.ckpt'}" in out
    assert BarProbe.seen == [(5, 5)]  # steps out of max_steps, not batches of this process out of steps left


def test_checkpoint_state_of_a_relative_root_is_rebased_onto_the_absolute_folder(tmp_path):
    # What `fit` saved with `default_root_dir: runs/x` (relative), resumed through the checkpoint's
    # absolute path: every saved path in the old folder now names the same file in the new one.
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sparsetrain.cli import _rebase_checkpoint_states

    new = tmp_path / "runs" / "x" / "run_0" / "checkpoints"
    cb = ModelCheckpoint(dirpath=str(new), save_last=True)
    old = "runs/x/run_0/checkpoints"
    saved = {"dirpath": old, "last_model_path": f"{old}/last.ckpt", "best_model_path": f"{old}/epoch=0-step=4.ckpt",
             "kth_best_model_path": f"{old}/epoch=0-step=4.ckpt", "best_k_models": {f"{old}/epoch=0-step=4.ckpt": 1.0},
             "best_model_score": None, "kth_value": 1.0, "monitor": None, "current_score": None}
    checkpoint = {"callbacks": {cb.state_key: saved}}
    _rebase_checkpoint_states(checkpoint, [cb])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "The dirpath has changed" would be raised here
        cb.load_state_dict(checkpoint["callbacks"][cb.state_key])
    assert cb.last_model_path == str(new / "last.ckpt")
    assert cb.best_model_path == cb.kth_best_model_path == str(new / "epoch=0-step=4.ckpt")
    assert cb.best_k_models == {str(new / "epoch=0-step=4.ckpt"): 1.0}


def test_resume_of_a_finished_run_says_to_raise_max_steps(short_run, tmp_path):
    run0, cache, _ = short_run
    root = _copy_root(run0, tmp_path)
    before = sorted(str(p) for p in root.rglob("*"))
    rc, _, err, _ = _run(["fit", *_args(root, cache, "--ckpt_path", "last")])
    assert rc == 2
    line = _one_line(err)
    assert "is at step 3 and --trainer.max_steps is 3: nothing left to train" in line
    assert "raise --trainer.max_steps" in line
    assert sorted(str(p) for p in root.rglob("*")) == before


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_recipes_leave_checkpoints_and_logs_to_the_run_directory(recipe):
    # A fixed `dirpath` or logger makes every run of the recipe share one folder: `--ckpt_path last`,
    # a bare `validate` and the summary's checkpoint line look in the run directory.
    import yaml

    trainer = yaml.safe_load((REPO / "recipes" / recipe).read_text()).get("trainer") or {}
    assert "logger" not in trainer
    for cb in trainer.get("callbacks") or []:
        assert "dirpath" not in (cb.get("init_args") or {}), cb


def test_summary_names_a_checkpoint_written_outside_the_run_directory(short_run, tmp_path):
    _, cache, _ = short_run
    shared = tmp_path / "shared"
    rc, out, err, _ = _run(["fit", *_args(tmp_path / "root", cache, "--trainer.max_steps", "1",
                                           "--trainer.callbacks.init_args.dirpath", str(shared))])
    assert rc == 0, err
    assert f"checkpoint: {shared / 'last.ckpt'}" in out
    line = next(l for l in out.splitlines() if "export: sparsetrain export" in l)
    assert f"--ckpt {shared / 'last.ckpt'} --out" in line
    assert torch.load(shared / "last.ckpt", weights_only=False, map_location="cpu")["global_step"] == 1


# ------------------------------------------------------------------------------------ item 10: unreachable data

@pytest.mark.timeout(120)
def test_unreachable_hf_dataset_is_one_line(tmp_path, monkeypatch):
    # Offline switches: the probe fails at once, as it does (after a DNS timeout) without network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root = tmp_path / "root"
    rc, _, err, _ = _run(["fit", *_args(root, tmp_path / "cache", "--data.hf_dataset", "no-such-user/no-such-set")])
    assert rc == 2
    line = _one_line(err)
    assert line.startswith("sparsetrain fit: error: Hugging Face dataset 'no-such-user/no-such-set'")
    assert "cannot be reached" in line and "--data.files" in line
    assert not root.exists()


# ------------------------------------------------------------------------------------ item 12: export

def test_export_refuses_a_non_empty_directory_unless_overwrite(short_run, tmp_path):
    run, _, _ = short_run
    out = tmp_path / "exported"
    rc, printed, err, _ = _run(["export", "--ckpt", str(run), "--out", str(out)])
    assert rc == 0, err
    stale = out / "model-00002-of-00002.safetensors"  # a file of an earlier, bigger export
    stale.write_bytes(b"old")
    rc, _, err, _ = _run(["export", "--ckpt", str(run), "--out", str(out)])
    assert rc == 2 and "already holds an earlier export; pass --overwrite" in _one_line(err)
    assert stale.exists()
    rc, _, err, _ = _run(["export", "--ckpt", str(run), "--out", str(out), "--overwrite"])
    assert rc == 0, err
    assert not stale.exists() and (out / "sparsetrain.json").is_file()

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    rc, _, err, _ = _run(["export", "--ckpt", str(run), "--out", str(other), "--overwrite"])
    assert rc == 2 and "no earlier export" in _one_line(err)
    assert (other / "todo.txt").read_text() == "mine"


def test_export_message_is_code_that_loads_the_model(short_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _, _ = short_run
    out = tmp_path / "exp"
    rc, printed, err, _ = _run(["export", "--ckpt", str(run), "--out", str(out)])
    assert rc == 0, err
    line = next(l for l in printed.splitlines() if l.startswith("Load it with transformers: "))
    model_call, tok_call = line.removeprefix("Load it with transformers: ").split(", ")
    names = {"AutoModelForCausalLM": AutoModelForCausalLM, "AutoTokenizer": AutoTokenizer}
    model, tok = eval(model_call, names), eval(tok_call, names)  # noqa: S307 - our own printed text
    ids = tok("def f(x):", return_tensors="pt")["input_ids"]
    assert ids.tolist()[0] == list(b"def f(x):")  # the byte tokenizer: UTF-8 bytes are the ids
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_gitignore_covers_what_the_commands_write():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["runs/tiny-s-ste/run_0/checkpoints/last.ckpt", "exported/tiny-s-ste-run_0/config.json",
             "pruned/tiny-prox/config.json"]
    done = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True)
    assert sorted(done.stdout.split()) == sorted(paths)
