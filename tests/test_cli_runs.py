"""Run directories, checkpoint choice, one-line errors and a quiet, quick command line (issue 11, part A)."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from sparsetrain.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny-s-ste.yaml")


def _args(root: Path, cache: Path, *extra, steps: int = 3):
    # The default recipe, cut down to a few seconds.
    return [
        "--config", RECIPE,
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(root),
        "--trainer.callbacks.init_args.every_n_train_steps", "1",  # save_top_k: 1 keeps one of three
        "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32",
        "--model.warmup_steps", "1",
        "--data.block_size", "32", "--data.batch_size", "2",
        "--data.max_files", "20", "--data.val_fraction", "0.1", "--data.max_val_blocks", "4",
        "--data.cache_dir", str(cache),
        *extra,
    ]


class ThreadProbe(L.Callback):
    """Records torch's thread count when training starts."""

    seen: list = []

    def on_train_start(self, trainer, pl_module) -> None:
        ThreadProbe.seen.append(torch.get_num_threads())


def _short_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) <= 2, err
    return err


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The README's first command twice in a row with different overrides, in one root.

    The second run shows the bar and the model summary, to check what a user sees.
    """
    root = tmp_path_factory.mktemp("runs")
    cache = tmp_path_factory.mktemp("cache")
    import contextlib
    import io

    outs = []
    for extra in (["--trainer.enable_progress_bar", "false"],
                  ["--sparsity.method", "ste", "--threads", "1", "--trainer.enable_model_summary", "true"]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("default")
            assert main(["fit", *_args(root, cache, *extra)]) == 0
        outs.append((out.getvalue(), err.getvalue(), [str(x.message) for x in w]))
    return root, cache, outs


def test_each_run_has_its_own_directory(two_runs):
    root, _, outs = two_runs
    assert sorted(p.name for p in root.iterdir()) == ["run_0", "run_1"]
    for i, (out, _, _) in enumerate(outs):
        run = root / f"run_{i}"
        assert f"run: {run} (new)" in out  # printed at the start
        assert f"run finished: {run}" in out  # and at the end
        # save_top_k counts per run: each keeps its own newest step checkpoint, and the second run
        # deleted nothing of the first.
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]
        assert (run / "logs" / "version_0" / "metrics.csv").is_file()
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
        assert ckpt["global_step"] == 3
        assert ckpt["sparsity_config"]["method"] == ("s-ste", "ste")[i]


def test_summary_names_the_run_and_its_numbers(two_runs):
    import csv

    root, _, outs = two_runs
    out = outs[0][0]
    run = root / "run_0"
    rows = list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()))
    last_loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")][-1]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")][-1]
    zeros = [float(r["sparsity/zero_fraction"]) for r in rows if r.get("sparsity/zero_fraction")][-1]
    summary = out[out.index("run finished"):]
    assert "steps 3, wall time" in summary
    assert f"train/loss {last_loss:.4f}, val/loss {val:.4f}" in summary
    assert f"zero fraction {zeros:.4f}" in summary and zeros == pytest.approx(0.5, abs=1e-3)
    assert f"checkpoint: {run / 'checkpoints' / 'last.ckpt'}" in summary
    assert f"export: sparsetrain export --ckpt {run} --out" in summary


def test_printed_export_command_exports_the_run_just_trained(two_runs, tmp_path, capsys):
    root, _, outs = two_runs
    line = next(l for l in outs[1][0].splitlines() if "export: sparsetrain export" in l)
    argv = shlex.split(line.split("export: sparsetrain ", 1)[1])
    argv[argv.index("--out") + 1] = str(tmp_path / "exported")
    assert main(argv) == 0
    info = json.loads((tmp_path / "exported" / "sparsetrain.json").read_text())
    assert info["checkpoint"] == str((root / "run_1" / "checkpoints" / "last.ckpt").resolve())
    assert info["sparsity_config"]["method"] == "ste"  # the second run's override, not the first run's


def test_ckpt_path_last_means_the_newest_run(two_runs):
    from sparsetrain.runs import resolve_checkpoint

    root, _, _ = two_runs
    assert resolve_checkpoint("last", root=root) == root / "run_1" / "checkpoints" / "last.ckpt"
    assert resolve_checkpoint("last", root=root, run_name="run_0") == root / "run_0" / "checkpoints" / "last.ckpt"


def test_default_output_is_quiet(two_runs):
    _, _, outs = two_runs
    out, err, caught = outs[1]
    text = out + err + "\n".join(caught)
    for noise in ("Total FLOPs", "Tip:", "litlogger", "LeafSpec", "cuSPARSELt", "v_num"):
        assert noise not in text, noise
    assert "model: " in out and "parameters" in out  # the one-line model summary instead of the table
    assert "threads: 1" in out


@pytest.mark.parametrize("as_file", [False, True])
def test_resume_with_another_model_shape_is_one_line(two_runs, tmp_path, capsys, as_file):
    # Lightning itself would silently take the model section from a .ckpt file's hyper-parameters.
    root, cache, _ = two_runs
    run = tmp_path / "r"
    shutil.copytree(root / "run_0", run)
    before = sorted(str(p) for p in run.rglob("*"))
    target = run / "checkpoints" / "last.ckpt" if as_file else run
    assert main(["fit", *_args(tmp_path, cache, "--ckpt_path", str(target), "--model.n_embd", "64")]) == 2
    err = _short_error(capsys)
    assert "model.n_embd=32 but this run has model.n_embd=64" in err
    assert sorted(str(p) for p in run.rglob("*")) == before  # nothing left behind


@pytest.mark.parametrize("override,field", [
    (["--sparsity.targets", "all"], "sparsity.targets='mlp' but this run has sparsity.targets='all'"),
    (["--sparsity.mvue", "exact"], "sparsity.mvue=None but this run has sparsity.mvue='exact'"),
    (["--sparsity.method", "ste"], "sparsity.method='s-ste' but this run has sparsity.method='ste'"),
    # A schedule field the early check missed before the fields were declared in one place (issue 19).
    (["--sparsity.dense_warmup", "1"], "sparsity.dense_warmup=0.1 but this run has sparsity.dense_warmup=1"),
])
def test_resume_with_another_sparsity_config_is_one_line(two_runs, tmp_path, capsys, override, field):
    root, cache, _ = two_runs
    shutil.copytree(root / "run_0", tmp_path / "run_0")
    assert main(["fit", *_args(tmp_path, cache, "--ckpt_path", "last", *override)]) == 2
    assert field in _short_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_0"]


def _truncate(src: Path, dst: Path, keep: float) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    later = time.time() + 5
    os.utime(dst, (later, later))  # the newest file of the run


def test_truncated_newest_checkpoint_is_reported_and_the_good_one_offered(two_runs, tmp_path, capsys):
    root, cache, _ = two_runs
    run = tmp_path / "run_0"
    shutil.copytree(root / "run_0", run)
    good = run / "checkpoints" / "last.ckpt"
    bad = run / "checkpoints" / "step=9.ckpt"
    _truncate(good, bad, 0.5)
    expected = f"{bad}' is truncated"
    for argv in (["export", "--ckpt", str(run), "--out", str(tmp_path / "o")],
                 ["fit", *_args(tmp_path, cache, "--ckpt_path", "last")],
                 ["prune", "--model", str(run), "--out", str(tmp_path / "p")]):
        assert main(argv) == 2, argv
        err = _short_error(capsys)
        assert expected in err and f"the newest good one is '{good}'" in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_0"]
    # The offered checkpoint works.
    assert main(["export", "--ckpt", str(good), "--out", str(tmp_path / "o")]) == 0


@pytest.mark.parametrize("content,problem", [
    (b"", "is empty (0 bytes)"),
    (b"not a checkpoint at all\n", "is not a PyTorch checkpoint"),
    (None, "does not exist"),
])
def test_unusable_checkpoint_files_are_one_line(two_runs, tmp_path, capsys, content, problem):
    _, cache, _ = two_runs
    path = tmp_path / "x.ckpt"
    if content is not None:
        path.write_bytes(content)
    for argv, name in ((["export", "--ckpt", str(path), "--out", str(tmp_path / "o")], "`ckpt`"),
                       (["fit", *_args(tmp_path / "runs", cache, "--ckpt_path", str(path))], "`--ckpt_path`"),
                       (["prune", "--model", str(path), "--out", str(tmp_path / "p")], "")):
        assert main(argv) == 2
        err = _short_error(capsys)
        assert problem in err or (content is None and "does not exist" in err), err
        assert name in err
    assert not (tmp_path / "runs").exists()


def test_ckpt_path_last_without_runs_is_one_line(tmp_path, capsys):
    assert main(["fit", "--config", RECIPE, "--trainer.default_root_dir", str(tmp_path / "none"),
                 "--ckpt_path", "last"]) == 2
    assert "no run with a checkpoint under" in _short_error(capsys)


def test_yaml_typo_names_field_file_line_and_closest_name(tmp_path, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text("sparsity:\n  method: ste\n  metod: s-ste\n")
    assert main(["fit", "--config", RECIPE, "--config", str(bad)]) == 2
    err = _short_error(capsys)
    assert f"{bad}:3: unknown field `sparsity.metod`; did you mean `sparsity.method`?" in err


def test_command_line_typo_names_the_closest_field(capsys):
    assert main(["fit", "--config", RECIPE, "--sparsity.metod", "ste"]) == 2
    assert "unknown field `sparsity.metod`; did you mean `sparsity.method`?" in _short_error(capsys)


def test_bad_yaml_syntax_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("sparsity:\n  method: [ste\n  n: 2\n")
    assert main(["fit", "--config", str(bad)]) == 2
    err = _short_error(capsys)
    assert err.startswith(f"sparsetrain fit: error: {bad}:") and "invalid YAML" in err


def test_missing_config_file_is_one_line(capsys):
    assert main(["fit", "--config", "recipes/tiny-s-st.yaml"]) == 2
    err = _short_error(capsys)
    assert "`--config` file 'recipes/tiny-s-st.yaml' does not exist; did you mean recipes/tiny-s-ste.yaml?" in err


def test_targets_regex_that_does_not_compile(tmp_path, capsys):
    assert main(["fit", *_args(tmp_path, tmp_path / "c", "--sparsity.targets", "mlp(")]) == 2
    assert "`sparsity.targets`='mlp(' is neither 'mlp' nor 'all' nor 'mlp_down' nor a valid regular expression" in _short_error(capsys)
    assert not any(tmp_path.iterdir())


def test_targets_regex_that_matches_nothing_leaves_nothing_behind(two_runs, tmp_path, capsys):
    _, cache, _ = two_runs
    root = tmp_path / "runs"
    assert main(["fit", *_args(root, cache, "--sparsity.targets", "no_such_layer")]) == 2
    err = _short_error(capsys)
    assert "no_such_layer" in err
    assert not root.exists()  # no stray run directory for a later `last` to pick


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="unknown field `sparsity.metod`"):
        main(["fit", "--config", RECIPE, "--sparsity.metod", "ste", "--debug"])


def test_prune_validates_n_m_before_loading(tmp_path, capsys):
    # The model does not exist: an n:m check that ran after loading would report that instead.
    assert main(["prune", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                 "--method", "wanda", "--n", "4", "--m", "4"]) == 2
    assert "`--n` must satisfy 0 < n < m, got n=4, m=4" in _short_error(capsys)


def test_prune_help_documents_every_option_and_the_table(capsys):
    from sparsetrain.pruning.cli import _parser

    help_text = _parser().format_help()
    for action in _parser()._actions:
        assert action.help, action.option_strings
    assert "prox+refine" not in help_text.split("--method")[1].split("--data")[0]
    for column in ("rel.err", "before", "refine", "prox it", "cap", "time s"):
        assert f"  {column} " in help_text


def test_fit_help_shows_sparsity_options_first_in_plain_text(capsys):
    assert main(["fit", "--help"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert any("--sparsity.method" in l for l in lines[:30])
    assert "``" not in text and ":class:" not in text
    assert main(["fit", "--help", "sparsity"]) == 0
    text = capsys.readouterr().out
    assert "--sparsity.mvue" in text and '"dense" (no sparsity' in text and '``' not in text
    assert main(["fit", "--help", "data"]) == 0
    assert "--data.block_size" in capsys.readouterr().out


def test_plain_strips_rst():
    from sparsetrain.cli import plain

    assert plain('``"dense"`` (see :class:`~a.B` and `C`)') == '"dense" (see a.B and C)'


def test_import_and_help_load_neither_torch_nor_lightning():
    code = ("import sys, sparsetrain; from sparsetrain.cli import main; main(['--help']); "
            "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_lazy_names_resolve():
    import sparsetrain as st

    for name in st.__all__:
        assert getattr(st, name) is not None, name
    from sparsetrain.callbacks import SparseTraining

    assert st.SparseTraining is SparseTraining


def test_auto_backend_is_silent_for_cpu_weights():
    from sparsetrain import backends

    backends._WARNED.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert backends.select_backend("auto", torch.zeros(64, 64))[0] == "dense"
    assert not rec


def test_auto_threads_leaves_busy_cores_alone(monkeypatch):
    from sparsetrain import cli

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for load, expected in ((0.0, 8), (2.2, 6), (7.6, 1), (30.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert cli.auto_threads()[0] == expected


def test_threads_apply_to_the_run_only(two_runs, tmp_path):
    # The second fixture run used --threads 1 and recorded what torch used during training.
    root, cache, outs = two_runs
    assert "threads: 1" in outs[1][0]
    before = torch.get_num_threads()
    ThreadProbe.seen.clear()
    probe = json.dumps({"class_path": "test_cli_runs.ThreadProbe"})
    want = 1 if before != 1 else 2
    assert main(["fit", *_args(tmp_path, cache, "--threads", str(want), "--trainer.callbacks+=" + probe,
                               "--trainer.enable_progress_bar", "false", steps=1)]) == 0
    assert ThreadProbe.seen == [want]
    assert torch.get_num_threads() == before  # restored for the caller


def test_threads_must_be_positive(capsys):
    assert main(["fit", "--config", RECIPE, "--threads", "0"]) == 2
    assert "`--threads` must be an int >= 1, got 0" in _short_error(capsys)


def test_bar_metrics_short_names_and_scientific_lr():
    from sparsetrain.progress import bar_metrics

    shown = bar_metrics({"v_num": 3, "train/loss": 2.5, "lr": 0.00021, "sparsity/flip_rate": 0.0012,
                         "val/loss": 2.75})
    assert shown == {"loss": 2.5, "lr": "2.10e-04", "flip": "1.20e-03", "val": 2.75}
    # Lightning's rich bar formats floats with 3 decimals: the whole metrics text stays short, so
    # the bar (description + bar + counts + time ~ 80 columns) fits 160 columns on one line.
    text = " ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in shown.items())
    assert len(text) < 60


def test_lightning_notes_that_would_break_the_bar_are_dropped():
    import logging

    from sparsetrain.cli import _DropTips

    def record(msg):
        return logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, __file__, 1, msg, None, None)

    f = _DropTips()
    assert not f.filter(record("`Trainer.fit` stopped: `max_steps=30` reached."))
    assert not f.filter(record("💡 Tip: For seamless cloud logging and experiment tracking, try installing "
                               "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger"))
    assert f.filter(record("`Trainer.fit` stopped: No training batches."))  # a real problem stays
    assert f.filter(record("GPU available: False, used: False"))


def test_a_new_run_never_reuses_a_name(tmp_path):
    from sparsetrain.runs import new_run_dir

    assert new_run_dir(tmp_path) == tmp_path / "run_0"
    (tmp_path / "run_0").mkdir()
    (tmp_path / "run_7").mkdir()
    assert new_run_dir(tmp_path) == tmp_path / "run_8"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x").write_text("")
    with pytest.raises(ValueError, match="run .*mine' exists already; pick another `--run_name`"):
        new_run_dir(tmp_path, "mine")


def test_auto_backend_still_warns_where_a_gpu_could_have_run(monkeypatch):
    from sparsetrain import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backends._WARNED.clear()
    with pytest.warns(UserWarning, match="using the dense backend because"):
        backends.select_backend("auto", torch.zeros(64, 64))
    backends._WARNED.clear()


def test_config_mismatch_rules():
    from sparsetrain.cli import _data_mismatch
    from sparsetrain.runs import config_mismatch

    ckpt = {"hyper_parameters": {"n_layer": 4, "n_embd": 128, "lr": 1e-3, "vocab_size": 4096},
            "sparsity_config": {"method": "s-ste", "n": 2, "m": 4, "targets": "mlp", "mvue": None,
                                "backend": "auto", "seed": 1}}
    same = {"n_layer": 4, "n_embd": 128}
    assert config_mismatch(ckpt, {**same, "lr": 5e-4, "vocab_size": 257}, {**ckpt["sparsity_config"],
                                                                           "backend": "dense", "seed": 2}) is None
    assert config_mismatch(ckpt, {**same, "n_layer": 2}, ckpt["sparsity_config"]) == ("model.n_layer", 4, 2)
    assert config_mismatch(ckpt, same, {**ckpt["sparsity_config"], "m": 8}) == ("sparsity.m", 4, 8)
    dense = {"hyper_parameters": {}, "sparsity_config": {"method": "dense", "n": 2}}
    assert config_mismatch(dense, {}, {"method": "dense", "n": 1}) is None  # n acts on nothing when dense
    assert config_mismatch(dense, {}, {"method": "ste", "n": 2}) == ("sparsity.method", "dense", "ste")
    data = {"datamodule_hyper_parameters": {"tokenizer": "bpe", "bpe_vocab_size": 4096}}
    assert _data_mismatch(data, {"tokenizer": "byte", "bpe_vocab_size": 4096}) == ("data.tokenizer", "bpe", "byte")
    assert _data_mismatch(data, {"tokenizer": "bpe", "bpe_vocab_size": 512}) == ("data.bpe_vocab_size", 4096, 512)
    assert _data_mismatch({"datamodule_hyper_parameters": {"tokenizer": "byte", "bpe_vocab_size": 4096}},
                          {"tokenizer": "byte", "bpe_vocab_size": 512}) is None


def test_checkpoint_problem_reads_only_the_zip_directory(tmp_path):
    from sparsetrain.runs import checkpoint_problem

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, good)
    assert checkpoint_problem(good) is None
    data = good.read_bytes()
    for keep in (0.1, 0.5, 0.99):
        cut = tmp_path / f"cut{keep}.ckpt"
        cut.write_bytes(data[: int(len(data) * keep)])
        assert checkpoint_problem(cut).startswith("is truncated"), keep
    assert checkpoint_problem(tmp_path) == "is a directory"
