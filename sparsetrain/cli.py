"""The ``sparsetrain`` command.

::

    sparsetrain fit      --config recipes/tiny-s-ste.yaml [--trainer.max_steps 50 ...] [--run_name NAME]
    sparsetrain fit      --config recipes/tiny-s-ste.yaml --ckpt_path last      (resume the newest run)
    sparsetrain validate --config recipes/tiny-s-ste.yaml --ckpt_path runs/tiny-s-ste/run_0
    sparsetrain test     --config recipes/tiny-s-ste.yaml   (no --ckpt_path: the newest run's checkpoint)
    sparsetrain export   --ckpt runs/tiny-s-ste/run_0 --out exported/tiny-s-ste
    sparsetrain prune    ...                     (one-shot pruning; see `sparsetrain prune --help`)

``fit``, ``validate`` and ``test`` are `LightningCLI` subcommands with four config sections:
``trainer`` (every `lightning.Trainer` argument), ``model`` (`CausalLMModule`), ``data``
(`TextDataModule`) and ``sparsity`` (every `SparsityConfig` field; the CLI adds the `SparseTraining`
callback built from it, so recipes do not list it under ``trainer.callbacks``). Any field can be
overridden on the command line (``--sparsity.method ste``). ``model.vocab_size`` and
``model.block_size`` follow the data module's and need not be set. Without ``--config`` the default
recipe ``recipes/tiny-s-ste.yaml`` is used.

Runs (see `sparsetrain.runs`): every ``fit`` writes into its own directory
``{trainer.default_root_dir}/{run_name}`` (``run_N`` by default): checkpoints, CSV logs and the
config. ``--ckpt_path`` takes a ``.ckpt``, a run directory (its newest readable checkpoint) or
``last`` (the newest checkpoint of ``--run_name``, else of the run that wrote one last) and resumes
into that run's directory. ``validate``/``test`` append their result to the run's
``evaluations.jsonl`` (`record_evaluation`). A user error is one or two lines on stderr (exit code 2); ``--debug`` or
``SPARSETRAIN_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

# The export lives in `hub` (light to import); re-exported for `from sparsetrain.cli import export_checkpoint`.
from .hub import export_checkpoint, nm_violations  # noqa: F401
from . import _extras

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO_ROOT / "recipes" / "tiny-s-ste.yaml"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")
SECTIONS = ("trainer", "model", "data", "sparsity")
# Top-level keys of a `fit`/`validate`/`test` config besides the sections.
TOP_LEVEL = ("seed_everything", "ckpt_path", "run_name", "threads", "optimizer", "lr_scheduler", "verbose",
             "config", "print_config")
DEBUG_ENV = "SPARSETRAIN_DEBUG"
RUN_DIR_ENV = "SPARSETRAIN_RUN_DIR"  # rank 0's run directory, for the other ranks of a DDP run

# What each subcommand imports on its way (the app extra brings all of it); `find_spec` checks
# them without importing.
_COMMAND_NEEDS = {
    **{c: ("lightning", "jsonargparse", "transformers", "torchmetrics", "yaml") for c in LIGHTNING_SUBCOMMANDS},
    "export": ("lightning", "transformers"),
    "prune": ("lightning", "transformers"),
    "report": ("matplotlib",),
}

log = logging.getLogger(__name__)


class UsageError(ValueError):
    """A mistake in what the user asked for; shown as one or two lines, without a traceback."""


# ---------------------------------------------------------------------------------------- quiet output

def _quiet_third_party() -> None:
    """Drop known noise from Lightning's output, narrowly, by message (and module for warnings)."""
    # Lightning 2.6 on torch 2.13: its own pytree helper uses a torch API torch deprecated.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")
    # We pass `args` ourselves (with the default recipe filled in); the warning about `args` next to
    # `sys.argv` does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter", module=r"lightning\.pytorch\.cli")
    # A resumed run writes into its own checkpoint folder again; that is the point, not a hazard.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty",
                            module=r"lightning\.pytorch\.callbacks\.model_checkpoint")
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropTips())


class _DropTips(logging.Filter):
    """Lightning's advertisements ("💡 Tip: ... litlogger / litmodels") and its note on our summary."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("Trainer already configured with model summary callbacks"):
            return False  # we replaced Lightning's summary table on purpose (see OneLineModelSummary)
        if msg.startswith(("`Trainer.fit` stopped: `max_steps=", "`Trainer.fit` stopped: `max_epochs=")):
            # Logged while the rich bar is still live, it lands on the bar's line and makes the bar
            # print a second time below it; the run summary says how many steps ran.
            return False
        return not (msg.startswith("💡 Tip:") and ("litlogger" in msg or "litmodels" in msg))


# ---------------------------------------------------------------------------------------- threads

def auto_threads() -> tuple[int, str]:
    """Torch CPU threads for a run: the cores this process may use, less the ones other processes keep busy.

    torch takes every core by default; when other jobs run, its threads wait on each other at every
    matmul and a run can be several times slower than with one thread (100 steps of the default
    recipe: 33.5 s with torch's default, 21.4 s with one thread, on 2 shared cores).

    Returns:
        ``(threads, why)``.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    free = max(1, min(cores, int(cores - load + 0.5)))
    return free, f"{cores} core(s), load {load:.1f}"


def set_threads(threads: Optional[int]) -> str:
    """Set torch's CPU threads (``None``: `auto_threads`); returns a line saying what was chosen."""
    import torch

    if threads is None:
        n, why = auto_threads()
        torch.set_num_threads(n)
        return f"threads: {n} (auto: {why}; set with --threads N)"
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"`--threads` must be an int >= 1, got {threads!r}")
    torch.set_num_threads(threads)
    return f"threads: {threads}"


# ---------------------------------------------------------------------------------------- config checks

def _section_fields(section: str) -> List[str]:
    import dataclasses
    import inspect

    if section == "sparsity":
        from .config import SparsityConfig

        return [f.name for f in dataclasses.fields(SparsityConfig)]
    if section == "model":
        from .models import CausalLMModule as cls
    elif section == "data":
        from .data import TextDataModule as cls
    else:
        from lightning.pytorch import Trainer as cls
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def _unknown_field_message(where: str, section: Optional[str], key: str) -> str:
    if section is None:
        valid = list(SECTIONS) + [k for k in TOP_LEVEL if k not in ("config", "print_config")]
        full = key
    else:
        valid = _section_fields(section)
        full = f"{section}.{key}"
    from .runs import closest

    guess = closest(key, valid)
    hint = f"; did you mean `{section + '.' if section else ''}{guess}`?" if guess else ""
    listing = "" if guess else f" (valid: {', '.join(valid)})"
    return f"{where}unknown field `{full}`{hint}{listing}"


def check_config_file(path: str) -> None:
    """Fail with a one-line `UsageError` on a missing file, bad YAML or an unknown field (with file:line)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        from .runs import closest

        recipes = sorted(q.name for q in (REPO_ROOT / "recipes").glob("*.yaml"))
        guess = closest(p.name, recipes)
        hint = f"; did you mean recipes/{guess}?" if guess else f"; recipes: {', '.join(recipes)}"
        raise UsageError(f"`--config` file {path!r} does not exist{hint}")
    text = p.read_text()
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{path}{line}: invalid YAML: {problem}") from None
    if node is None:
        return
    if not isinstance(node, yaml.MappingNode):
        raise UsageError(f"{path}:1: a config must be a mapping of sections (trainer:, model:, data:, sparsity:)")
    for key_node, value_node in node.value:
        key = key_node.value
        where = f"{path}:{key_node.start_mark.line + 1}: "
        if key not in SECTIONS and key not in TOP_LEVEL:
            raise UsageError(_unknown_field_message(where, None, key))
        if key in SECTIONS and isinstance(value_node, yaml.MappingNode):
            fields = _section_fields(key)
            for sub_key, _ in value_node.value:
                if sub_key.value not in fields:
                    where = f"{path}:{sub_key.start_mark.line + 1}: "
                    raise UsageError(_unknown_field_message(where, key, sub_key.value))


def check_overrides(argv: Sequence[str]) -> None:
    """Fail with a one-line `UsageError` on ``--section.field`` overrides naming no field."""
    for arg in argv:
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            continue
        dotted = arg[2:].split("=", 1)[0].rstrip("+")
        section, key = dotted.split(".")[:2]
        if section in SECTIONS and key not in _section_fields(section):
            raise UsageError(_unknown_field_message("", section, key) + f" (in `{arg.split('=', 1)[0]}`)")


def _config_files(argv: Sequence[str]) -> List[str]:
    files = []
    for i, a in enumerate(argv):
        if a in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
    return files


# ---------------------------------------------------------------------------------------- help

_RST = [(re.compile(r":\w+:`~?([^`]+)`"), r"\1"), (re.compile(r"``([^`]+)``"), r"\1"), (re.compile(r"`([^`]+)`"), r"\1")]


def plain(text: str) -> str:
    """Docstring text without RST markup (``"dense"`` -> "dense", :class:`X` -> X)."""
    for pattern, repl in _RST:
        text = pattern.sub(repl, text)
    return text


def doc_args(obj) -> Dict[str, str]:
    """The ``Args:`` entries of a Google-style docstring, one paragraph per name (``n, m:`` gives both)."""
    import inspect

    doc = inspect.getdoc(obj) or ""
    out: Dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, l in enumerate(lines) if l.strip() == "Args:")
    except StopIteration:
        return out
    base = None
    names: List[str] = []
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if base is None:
            base = indent
        if indent < base:
            break
        m = re.match(r"\s*([\w, ]+):\s*(.*)", line) if indent == base else None
        if m:
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                out[n] = m.group(2).strip()
        else:
            for n in names:
                out[n] += " " + line.strip()
    return out


def _wrap(text: str, indent: int, width: int = 100) -> str:
    import textwrap

    return textwrap.fill(text, width=width, initial_indent=" " * indent, subsequent_indent=" " * indent)


def section_help(section: str) -> str:
    """Plain-text help for one config section: each field, its default and what it does."""
    import inspect

    if section == "sparsity":
        import dataclasses

        from .config import SparsityConfig, field_help

        docs = field_help()  # declared on each field (sparsetrain.config), so no field goes without
        params = [(f.name, f.default) for f in dataclasses.fields(SparsityConfig)]
        title = "sparsity (SparsityConfig: which layers become N:M sparse, and how)"
    else:
        if section == "model":
            from .models import CausalLMModule as cls

            title = "model (CausalLMModule: a causal LM built from a transformers config)"
            docs = doc_args(cls)
        elif section == "data":
            from .data import TextDataModule as cls

            title = "data (TextDataModule: text source, tokenizer, blocks)"
            docs = doc_args(cls)
        else:
            from lightning.pytorch import Trainer as cls

            title = "trainer (lightning.Trainer)"
            docs = doc_args(cls.__init__)
        params = [(n, p.default) for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"]
    lines = [f"{title}; set in a recipe's `{section}:` section or with --{section}.FIELD VALUE", ""]
    for name, default in params:
        shown = "required" if default is inspect.Parameter.empty else f"default {default!r}"
        lines.append(f"  --{section}.{name}  ({shown})")
        if name in docs:
            lines.append(_wrap(plain(docs[name]), 6))
    return "\n".join(lines)


def fit_help(cmd: str) -> str:
    """The short ``sparsetrain fit --help`` page: the run options and the sparsity section first."""
    return "\n".join([
        f"usage: sparsetrain {cmd} [--config RECIPE.yaml] [--SECTION.FIELD VALUE ...] [--run_name NAME]",
        f"       {' ' * len(cmd)}             [--ckpt_path last|RUN_DIR|FILE.ckpt] [--threads N] [--debug]",
        "",
        "Run options:",
        "  --config FILE       a recipe (default recipes/tiny-s-ste.yaml); repeat to layer several",
        ("  --run_name NAME     the run's directory under trainer.default_root_dir (default: the next run_N)"
         if cmd == "fit" else
         "  --run_name NAME     the run under trainer.default_root_dir to evaluate (default: the newest)"),
        "  --ckpt_path P       resume (fit) or evaluate: a .ckpt file, a run directory (its newest good",
        "                      checkpoint) or `last` (newest checkpoint of --run_name, else of the newest run)",
        *(["                      (default for validate/test: `last`; the result goes to the run's",
           "                      evaluations.jsonl, which `sparsetrain report` lists)"] if cmd != "fit" else []),
        "  --threads N         torch CPU threads (default: the cores not busy with other processes)",
        "  --debug             show full tracebacks (also SPARSETRAIN_DEBUG=1)",
        "  --print_config      print the resolved config and exit",
        "",
        section_help("sparsity"),
        "",
        f"More: sparsetrain {cmd} --help model | data | trainer  (one section each),",
        f"      sparsetrain {cmd} --help all  (Lightning's full list of options).",
    ])


# ---------------------------------------------------------------------------------------- fit / validate / test

def _make_cli_class(state: Dict[str, Any]):
    # Imported here so that `sparsetrain --help`, `export --help` and `prune` do not pay for Lightning.
    from lightning.pytorch.callbacks import Callback, ModelSummary
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import CSVLogger

    from .callbacks import SparseTraining
    from .config import TARGET_PRESETS, SparsityConfig
    from .progress import default_progress_bar
    from . import runs

    class RunSummary(Callback):
        """Times the fit and remembers which steps were checkpointed."""

        def __init__(self) -> None:
            self.started = self.ended = None

        def on_fit_start(self, trainer, pl_module) -> None:
            self.started = time.perf_counter()

        def on_fit_end(self, trainer, pl_module) -> None:
            self.ended = time.perf_counter()

        def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            # Runs before the callbacks load their states: point the checkpoint callbacks' saved
            # paths at this run's checkpoint folder as it is named now (see `_rebase_checkpoint_states`).
            if state.get("resumed_own_run"):
                _rebase_checkpoint_states(checkpoint, [cb for cb in trainer.checkpoint_callbacks
                                                       if id(cb) in state.get("own_ckpt_callbacks", ())])

    class FinalSparsity(Callback):
        """The target layers' zero fraction and last-step flip rate when training ends, for the summary.

        The engine computes its metrics every ``log_every_n_steps`` steps only, so a run shorter
        than that (or ending between two of them) would report none. These follow the engine's
        definitions: zeros of W~ over all target weights; mask entries the last optimizer step
        changed over all mask entries (0 in a dense phase). Costs one mask per layer, once.
        """

        def __init__(self) -> None:
            self.masks_before_last: Optional[Dict[str, Any]] = None
            self.numbers: Dict[str, float] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            from .nn import sparse_layers

            last = trainer.max_steps
            if self.masks_before_last is None and last is not None and last > 0 and trainer.global_step == last - 1:
                self.masks_before_last = {n: l.mask.clone() for n, l in sparse_layers(pl_module)}

        def on_train_end(self, trainer, pl_module) -> None:
            from .nn import sparse_layers

            layers = sparse_layers(pl_module)
            if not layers:
                return
            zeros = total = flips = entries = 0
            for name, layer in layers:
                w = layer.effective_weight()  # a collective under FSDP2: every rank runs this hook
                zeros += int((w == 0).sum())
                total += w.numel()
                if self.masks_before_last is not None and name in self.masks_before_last:
                    mask = layer.mask
                    if getattr(layer, "sparse_active", True):
                        flips += int((mask != self.masks_before_last[name]).sum())
                    entries += mask.numel()
            self.numbers["sparsity/zero_fraction"] = zeros / total
            if entries:
                self.numbers["sparsity/flip_rate"] = flips / entries
            self.masks_before_last = None

    class OneLineModelSummary(ModelSummary):
        """The parameter count in one line, instead of Lightning's table (and its "Total FLOPs: 0")."""

        @staticmethod
        def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                      total_flops=0, **kwargs) -> None:
            from lightning.pytorch.utilities.model_summary import get_human_readable_count

            print(f"model: {get_human_readable_count(total_parameters)} parameters "
                  f"({get_human_readable_count(trainable_parameters)} trainable, {model_size:.1f} MB)")

    class SparseTrainCLI(LightningCLI):
        """`LightningCLI` with a ``sparsity`` section that becomes a `SparseTraining` callback, and run directories."""

        @staticmethod
        def subcommands() -> dict:
            full = LightningCLI.subcommands()
            return {k: full[k] for k in LIGHTNING_SUBCOMMANDS}

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_class_arguments(SparsityConfig, "sparsity")
            parser.add_argument("--run_name", type=Optional[str], default=None,
                                help="the run's directory under trainer.default_root_dir (default: next run_N)")
            parser.add_argument("--threads", type=Optional[int], default=None,
                                help="torch CPU threads (default: the cores not busy with other processes)")
            # The model's vocabulary and context follow the data, so a recipe states them once.
            parser.link_arguments("data.block_size", "model.block_size")
            parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

        def _parse_ckpt_path(self) -> None:
            # Lightning would read the checkpoint here and silently replace the model section with
            # its hyper-parameters. `before_instantiate_classes` resolves the path instead (run
            # directories, `last`, unreadable files) and makes a differing field an error.
            return

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand]
            section = dict(cfg.sparsity)
            try:
                SparsityConfig(**section)
            except (TypeError, ValueError) as e:
                raise UsageError(f"invalid `sparsity` section: {e}") from None
            targets = section.get("targets")
            if isinstance(targets, str) and targets not in TARGET_PRESETS:
                try:
                    re.compile(targets)
                except re.error as e:
                    raise UsageError(f"`sparsity.targets`={targets!r} is neither {' nor '.join(map(repr, TARGET_PRESETS))} "
                                     f"nor a valid regular expression: {e}") from None
            state["threads_line"] = set_threads(cfg.get("threads"))

            root = Path(cfg.trainer.default_root_dir or "runs")
            run_name = cfg.get("run_name")
            ckpt_path = cfg.get("ckpt_path")
            run_dir = None
            evaluating = self.subcommand in ("validate", "test")
            chosen = evaluating and not ckpt_path
            if chosen:
                # Evaluating the untrained model a bare `validate` would build is never what was
                # meant: take the newest checkpoint, as `--ckpt_path last` would, and say so.
                if run_name is None and runs.latest_run(root) is None:
                    raise UsageError(
                        f"nothing to {self.subcommand}: no --ckpt_path given and no run with a checkpoint under "
                        f"{str(root)!r}; train one first (sparsetrain fit with the same --config), or pass "
                        "--ckpt_path RUN_DIR|FILE.ckpt")
                ckpt_path = "last"
            if ckpt_path:
                ckpt = runs.resolve_checkpoint(str(ckpt_path), root=root, run_name=run_name, what="--ckpt_path")
                loaded = runs.load_checkpoint(ckpt, what="--ckpt_path")
                bad = runs.config_mismatch(loaded, dict(cfg.model), section)
                if bad is None:
                    bad = _data_mismatch(loaded, dict(cfg.data))
                step = loaded.get("global_step")
                del loaded
                if bad is not None:
                    field, old, new = bad
                    raise UsageError(
                        f"{ckpt} was trained with {field}={old!r} but this run has {field}={new!r}; "
                        f"use the same {field} to resume it, or start a new run (without --ckpt_path)")
                max_steps = cfg.trainer.get("max_steps")
                if self.subcommand == "fit" and isinstance(step, int) and max_steps is not None \
                        and 0 <= max_steps <= step:
                    raise UsageError(
                        f"{ckpt} is at step {step} and --trainer.max_steps is {max_steps}: nothing left to train; "
                        f"raise --trainer.max_steps (e.g. --trainer.max_steps {max(2 * step, step + 1)}) to train on")
                cfg.ckpt_path = str(ckpt)
                run_dir = runs.run_dir_of(ckpt)
                state["resumed_own_run"] = run_dir is not None
                verb = "resuming" if self.subcommand == "fit" else "evaluating"
                why = "; the newest checkpoint: no --ckpt_path was given" if chosen else ""
                state["ckpt_line"] = f"{verb} {ckpt} (step {step}{why})"
                if evaluating:
                    state["evaluated"] = {"checkpoint": str(ckpt), "step": step}
                    if run_dir is None:
                        # A checkpoint outside a run directory: evaluated and printed, recorded nowhere
                        # (a new run directory holding only an evaluation would be a run without training).
                        run_dir = Path(ckpt).resolve().parent
                        state["no_record"] = True
            if run_dir is None and _rank() > 0 and os.environ.get(RUN_DIR_ENV):
                run_dir = Path(os.environ[RUN_DIR_ENV])  # the directory rank 0 chose, not the next free one
            if run_dir is None:
                try:
                    run_dir = runs.new_run_dir(root, run_name)
                except ValueError as e:
                    raise UsageError(str(e)) from None
            if _rank() == 0:
                os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the processes a DDP launcher starts
            state["root_existed"] = root.exists()
            state["root"] = root
            state["run_dir"] = run_dir
            state["new_run"] = not run_dir.exists()
            logs = run_dir / "logs"
            state["logs_before"] = set(logs.iterdir()) if logs.is_dir() else set()

        def instantiate_trainer(self, **kwargs):
            cfg = self._get(self.config_init, "sparsity")
            if not isinstance(cfg, SparsityConfig):
                cfg = SparsityConfig(**dict(cfg))
            extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
            extra.append(SparseTraining(config=cfg))
            trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
            run_dir: Path = state["run_dir"]
            # Lightning's own defaults (logs, profiler output) land in the run directory, not beside it.
            trainer_config["default_root_dir"] = str(run_dir)
            if trainer_config.get("logger") in (None, True):
                if self.subcommand == "fit":
                    trainer_config["logger"] = CSVLogger(save_dir=str(run_dir), name="logs")
                else:
                    # `validate`/`test` results go to the run's evaluations file (`record_evaluation`),
                    # not to a new logs/version_N: that would hold one step-0 point and hide the
                    # training curves from `report`.
                    trainer_config["logger"] = False
            bar = default_progress_bar(trainer_config, extra)
            if bar is not None:
                extra.append(bar)
            given = extra + list(trainer_config.get("callbacks") or [])
            if trainer_config.get("enable_model_summary", True) is not False and not any(
                    isinstance(c, ModelSummary) for c in given):
                extra.append(OneLineModelSummary())
            summary = RunSummary()
            extra.append(summary)
            state["summary"] = summary
            if self.subcommand == "fit":
                final = FinalSparsity()
                extra.append(final)
                state["final_sparsity"] = final
            trainer = self._instantiate_trainer(trainer_config, extra)
            state["own_ckpt_callbacks"] = set()
            for cb in trainer.checkpoint_callbacks:
                if getattr(cb, "dirpath", None) is None:  # a recipe names no folder: this run's own
                    cb.dirpath = str(run_dir / runs.CKPT_DIR)
                    state["own_ckpt_callbacks"].add(id(cb))
            if trainer.is_global_zero:
                head = [] if state.get("no_record") else [f"run: {run_dir}" + (" (new)" if state["new_run"] else "")]
                print("; ".join(head + ([state["ckpt_line"]] if "ckpt_line" in state else [])
                                + [state["threads_line"]]))
            return trainer

    return SparseTrainCLI


def _rank() -> int:
    """This process's rank under a launcher that sets ``RANK`` / ``LOCAL_RANK`` (0 otherwise)."""
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def _rebase_checkpoint_states(checkpoint: dict, callbacks: list) -> None:
    """Make a resumed run's `ModelCheckpoint` states name the run's checkpoint folder as it is named now.

    A run started with a relative ``default_root_dir`` saved ``dirpath='runs/x/run_0/checkpoints'``;
    its resume names the folder by its absolute path (the checkpoint's own directory), and a run
    directory may have been moved or copied. Lightning compares the two strings, and when they
    differ it forgets ``last_model_path`` and the top-k files: the resumed run then writes
    ``last-v1.ckpt`` beside a stale ``last.ckpt`` and warns "The dirpath has changed". The saved
    paths of files in the old folder are moved to the new name; the folder is the same run's
    (the caller checks that the checkpoint being resumed lies in it).
    """
    states = checkpoint.get("callbacks") or {}
    for cb in callbacks:
        saved = states.get(cb.state_key)
        if not isinstance(saved, dict) or not saved.get("dirpath") or saved["dirpath"] == cb.dirpath:
            continue
        old, new = Path(saved["dirpath"]), Path(cb.dirpath)

        def moved(path):
            return str(new / Path(path).name) if path and Path(path).parent == old else path

        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if key in saved:
                saved[key] = moved(saved[key])
        if isinstance(saved.get("best_k_models"), dict):
            saved["best_k_models"] = {moved(k): v for k, v in saved["best_k_models"].items()}
        saved["dirpath"] = cb.dirpath


def _data_mismatch(ckpt: dict, data: dict):
    """A data field that changes the model's vocabulary (the tokenizer), as ``(field, old, new)``, or None."""
    old = ckpt.get("datamodule_hyper_parameters") or {}
    for field in ("tokenizer", "bpe_vocab_size"):
        if field in old and field in data and old[field] != data[field]:
            if field == "bpe_vocab_size" and old.get("tokenizer") != "bpe":
                continue
            return f"data.{field}", old[field], data[field]
    return None


def _clean_up_failed_run(state: Dict[str, Any]) -> None:
    """Remove what a failed command created and that holds nothing (no checkpoint, no metrics)."""
    run_dir: Optional[Path] = state.get("run_dir")
    if run_dir is None or not run_dir.exists():
        return
    from .runs import run_checkpoints

    logs = run_dir / "logs"
    if logs.is_dir():
        for version in set(logs.iterdir()) - state.get("logs_before", set()):
            if version.is_dir() and not (version / "metrics.csv").exists():
                shutil.rmtree(version, ignore_errors=True)
        if not any(logs.iterdir()):
            logs.rmdir()
    if state.get("new_run") and not run_checkpoints(run_dir) and not any(run_dir.rglob("metrics.csv")):
        shutil.rmtree(run_dir, ignore_errors=True)
        root = state.get("root")
        if root is not None and not state.get("root_existed") and root.is_dir() and not any(root.iterdir()):
            root.rmdir()


def fit_summary(cli, state: Dict[str, Any]) -> str:
    """The lines printed when ``fit`` ends: where the run is, what it reached, how to export it."""
    from .runs import checkpoint_problem, run_checkpoints

    trainer = cli.trainer
    run_dir: Path = state["run_dir"]
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}

    def fmt(key, spec=".4f"):
        return format(metrics[key], spec) if key in metrics else "n/a"

    # Computed when training ended, whatever the metrics interval (`FinalSparsity`).
    final = state.get("final_sparsity")
    if final is not None:
        metrics.update(final.numbers)
    ckpts = [c for c in run_checkpoints(run_dir) if checkpoint_problem(c) is None]
    export_from = run_dir
    if not ckpts:
        # A config that names its own checkpoint folder (`ModelCheckpoint(dirpath=...)`) saves
        # outside the run directory: name the file the callback wrote, and export that file.
        for cb in trainer.checkpoint_callbacks:
            written = [Path(p) for p in (cb.last_model_path, cb.best_model_path) if p]
            good = [p for p in written if checkpoint_problem(p) is None]
            if good:
                ckpts, export_from = good[:1], good[0]
                break
    summary = state.get("summary")
    wall = (summary.ended - summary.started) if summary is not None and summary.ended else None
    out = Path("exported") / f"{run_dir.parent.name}-{run_dir.name}"
    lines = [
        f"run {'interrupted' if getattr(trainer, 'interrupted', False) else 'finished'}: {run_dir}",
        f"  steps {trainer.global_step}" + (f", wall time {wall:.1f} s" if wall is not None else ""),
        f"  train/loss {fmt('train/loss')}, val/loss {fmt('val/loss')}",
        f"  target layers: zero fraction {fmt('sparsity/zero_fraction')}, flip rate {fmt('sparsity/flip_rate', '.2e')}",
        f"  checkpoint: {ckpts[0] if ckpts else 'none written'}",
    ]
    if ckpts:
        import shlex

        lines.append(f"  export: sparsetrain export --ckpt {shlex.quote(str(export_from))} --out {shlex.quote(str(out))}")
    return "\n".join(lines)


def record_evaluation(cli, state: Dict[str, Any], command: str) -> str:
    """Append a ``validate``/``test`` result to its run's `runs.EVALUATIONS` file; returns the line to print.

    One JSON object per line: the command, the checkpoint and its step, the metrics, the time.
    `sparsetrain report` lists them apart from the training curves.
    """
    import datetime
    import json

    from . import runs

    evaluated = state["evaluated"]
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())) or "no metrics"
    if state.get("no_record"):
        return f"{command} of {evaluated['checkpoint']} (after {evaluated['step']} steps): {shown} (not recorded: the " \
               "checkpoint is not in a run directory)"
    record = {"command": command, "checkpoint": evaluated["checkpoint"], "step": evaluated["step"],
              "metrics": metrics, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = state["run_dir"] / runs.EVALUATIONS
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return f"{command} after {evaluated['step']} steps: {shown}; recorded in {path} (sparsetrain report lists it)"


def run_lightning(argv: Sequence[str]):
    """Run ``fit``/``validate``/``test`` with ``argv`` (the subcommand first); returns the CLI object."""
    argv = list(argv)
    cmd = argv[0]
    for f in _config_files(argv):
        check_config_file(f)
    if not _config_files(argv) and DEFAULT_RECIPE.exists():
        argv[1:1] = ["--config", str(DEFAULT_RECIPE)]
    check_overrides(argv[1:])

    from .data import TextDataModule
    from .models import CausalLMModule

    import torch

    _quiet_third_party()
    state: Dict[str, Any] = {}
    cli_cls = _make_cli_class(state)
    threads_before = torch.get_num_threads()  # `--threads` is for this command, not for its caller
    try:
        cli = cli_cls(
            CausalLMModule,
            TextDataModule,
            args=argv,
            # A resumed run writes its config.yaml into its own new logs/version_N.
            save_config_kwargs={"overwrite": True},
            # An evaluation has no log folder: its config would land in (and overwrite) the run's
            # directory; `record_evaluation` keeps what it evaluated instead.
            **({} if cmd == "fit" else {"save_config_callback": None}),
            parser_kwargs={"prog": "sparsetrain", "exit_on_error": False,
                           **{c: {"exit_on_error": False} for c in LIGHTNING_SUBCOMMANDS}},
        )
    except BaseException:
        _clean_up_failed_run(state)
        raise
    finally:
        torch.set_num_threads(threads_before)
    if cmd == "fit" and "run_dir" in state and cli.trainer.is_global_zero:
        print(fit_summary(cli, state))
    if cmd in ("validate", "test") and "evaluated" in state and cli.trainer.is_global_zero:
        print(record_evaluation(cli, state, cmd))
    return cli


# ---------------------------------------------------------------------------------------- export

def _check_export_dir(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that holds files, unless ``--overwrite`` and it is an earlier export.

    ``--overwrite`` removes the directory first, so it is only accepted for what `export` (or
    `save_pretrained`) wrote: a directory with ``config.json`` or ``sparsetrain.json``.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"`--out` {str(out)!r} is a file; give a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    looks_exported = (out / "sparsetrain.json").is_file() or (out / "config.json").is_file()
    if not overwrite:
        what = "an earlier export" if looks_exported else "files"
        raise UsageError(f"`--out` {str(out)!r} already holds {what}; pass --overwrite to replace it, "
                         "or choose another directory")
    if not looks_exported:
        raise UsageError(f"`--out` {str(out)!r} holds files but no earlier export (no config.json or "
                         "sparsetrain.json), so --overwrite will not delete it; choose another directory")


def _export_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sparsetrain export",
        description="Write a transformers save_pretrained directory with the trained N:M sparse weights.",
    )
    p.add_argument("--ckpt", required=True,
                   help="a run directory (its newest readable checkpoint is used) or a .ckpt written by `sparsetrain fit`")
    p.add_argument("--out", required=True, help="output directory (created; an existing one only with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out (a directory with config.json or sparsetrain.json)")
    args = p.parse_args(list(argv))
    _check_export_dir(Path(args.out), args.overwrite)
    from transformers.utils import logging as hf_logging

    from .hub import export_summary

    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar says nothing
    if args.overwrite and Path(args.out).is_dir():
        # Emptied, not written over: files of the earlier model (other shards, an index) would
        # otherwise stay beside the new ones and be loaded with them.
        shutil.rmtree(args.out)
    info = export_checkpoint(args.ckpt, args.out)  # errors: one line, from `main`
    print(export_summary(info, args.out))
    return 0


# ---------------------------------------------------------------------------------------- main

_USAGE = """usage: sparsetrain {fit,validate,test,export,prune,report} ... [--debug]

  fit | validate | test   train or evaluate a recipe:  sparsetrain fit --config recipes/tiny-s-ste.yaml
                          (each fit writes its own run directory, printed at start and end)
  export                  sparsetrain export --ckpt RUN_DIR|CKPT --out DIR  (transformers save_pretrained, N:M weights)
  prune                   one-shot N:M pruning of a trained model (sparsetrain prune --help)
  report                  sparsetrain report RUN_DIR [RUN_DIR ...] [--dense RUN_DIR]  (curves PNG, final numbers)

Run `sparsetrain SUBCOMMAND --help` for the options of one subcommand (`sparsetrain fit --help sparsity`
for the sparsity options alone). Errors are one line; --debug or SPARSETRAIN_DEBUG=1 shows the traceback."""


def _user_error(e: BaseException) -> Optional[str]:
    """The one-line message of an error caused by what the user asked for, or None for a bug."""
    try:
        from jsonargparse import ArgumentError as JsonArgumentError
    except ImportError:  # pragma: no cover
        JsonArgumentError = argparse.ArgumentError
    if isinstance(e, (JsonArgumentError, argparse.ArgumentError)):
        lines = [l.strip() for l in str(e).strip().splitlines() if l.strip() and not l.startswith("usage:")]
        return " ".join(lines[-3:]) if lines else type(e).__name__
    if isinstance(e, RuntimeError) and "state_dict" in str(e):  # size mismatch while loading weights
        lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
        return "the checkpoint does not fit this model: " + " ".join(lines[:2])
    # ConnectionError: a dataset or tokenizer that cannot be fetched; the message names it and the
    # offline alternatives (`data.sources`), a traceback adds nothing.
    if isinstance(e, (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError,
                      ConnectionError)):
        text = str(e).strip() or type(e).__name__
        return " ".join(l.strip() for l in text.splitlines()[:2])
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sparsetrain`` console script; returns the exit code.

    A user error (a bad path, field or value) prints one line, ``sparsetrain CMD: error: ...``, and
    returns 2; with ``--debug`` anywhere in ``argv`` or ``SPARSETRAIN_DEBUG=1`` it raises instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    cmd = argv[0]
    # A base install (torch only) has none of the application's packages: say which extra to install
    # before anything fails half way with a bare ModuleNotFoundError.
    absent = _extras.missing(_COMMAND_NEEDS.get(cmd, ()))
    if absent:
        text = _extras.message(f"`sparsetrain {cmd}`", "app", absent)
        if debug:
            raise _extras.MissingExtra(text, name=absent[0])
        print(f"sparsetrain {cmd}: error: {text}", file=sys.stderr)
        return 2
    if cmd in LIGHTNING_SUBCOMMANDS:
        help_at = next((i for i, a in enumerate(argv) if a in ("-h", "--help")), None)
        if help_at is not None:
            view = argv[help_at + 1] if help_at + 1 < len(argv) else None
            if view == "all":
                argv = argv[:help_at + 1]
            else:
                if view in SECTIONS:
                    print(section_help(view))
                elif view is None or view.startswith("-"):
                    print(fit_help(cmd))
                else:
                    print(f"sparsetrain {cmd}: error: no help view {view!r}; choose from "
                          f"{', '.join(SECTIONS)}, all", file=sys.stderr)
                    return 2
                return 0
    try:
        if cmd == "export":
            return _export_main(argv[1:])
        if cmd == "report":
            from .report import main as report_main

            return report_main(argv[1:])
        if cmd == "prune":
            from .pruning.cli import main as prune_main  # another part of the package; loaded only when asked

            try:
                return prune_main(argv[1:]) or 0
            except SystemExit as e:  # its argument errors (already printed)
                return e.code if isinstance(e.code, int) else 2
        if cmd in LIGHTNING_SUBCOMMANDS:
            run_lightning(argv)
            return 0
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        message = None if debug else _user_error(e)
        if message is None:
            raise
        print(f"sparsetrain {cmd}: error: {message}\n  (--debug shows the traceback)", file=sys.stderr)
        return 2
    print(f"sparsetrain: unknown subcommand {cmd!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
