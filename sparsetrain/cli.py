"""The ``sparsetrain`` command.

::

    sparsetrain fit      --config recipes/tiny-s-ste.yaml [--trainer.max_steps 50 ...]
    sparsetrain validate --config recipes/tiny-s-ste.yaml --ckpt_path runs/tiny-s-ste/checkpoints/last.ckpt
    sparsetrain test     --config recipes/tiny-s-ste.yaml --ckpt_path ...
    sparsetrain export   --ckpt runs/tiny-s-ste/checkpoints/last.ckpt --out exported/tiny-s-ste
    sparsetrain prune    ...                     (one-shot pruning; see `sparsetrain prune --help`)

``fit``, ``validate`` and ``test`` are `LightningCLI` subcommands with four config sections:
``trainer`` (every `lightning.Trainer` argument), ``model`` (`CausalLMModule`), ``data``
(`TextDataModule`) and ``sparsity`` (every `SparsityConfig` field; the CLI adds the `SparseTraining`
callback built from it, so recipes do not list it under ``trainer.callbacks``). Any field can be
overridden on the command line (``--sparsity.method ste``). ``model.vocab_size`` and
``model.block_size`` follow the data module's and need not be set. Without ``--config`` the default
recipe ``recipes/tiny-s-ste.yaml`` is used. ``--ckpt_path last`` resumes from the newest ``last.ckpt``
of the recipe's `ModelCheckpoint`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

# The export lives in `hub` (light to import); re-exported for `from sparsetrain.cli import export_checkpoint`.
from .hub import export_checkpoint, nm_violations  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO_ROOT / "recipes" / "tiny-s-ste.yaml"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")

log = logging.getLogger(__name__)


def _make_cli_class():
    # Imported here so that `sparsetrain export --help` and `prune` do not pay for building the parser.
    from lightning.pytorch.cli import LightningCLI

    from .callbacks import SparseTraining
    from .config import SparsityConfig

    class SparseTrainCLI(LightningCLI):
        """`LightningCLI` with a ``sparsity`` section that becomes a `SparseTraining` callback."""

        @staticmethod
        def subcommands() -> dict:
            full = LightningCLI.subcommands()
            return {k: full[k] for k in LIGHTNING_SUBCOMMANDS}

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_class_arguments(SparsityConfig, "sparsity")
            # The model's vocabulary and context follow the data, so a recipe states them once.
            parser.link_arguments("data.block_size", "model.block_size")
            parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

        def before_instantiate_classes(self) -> None:
            # Check the sparsity section first, so a bad value is a one-line error, not a traceback.
            section = self._get(self.config, "sparsity")
            try:
                SparsityConfig(**dict(section))
            except (TypeError, ValueError) as e:
                self.parser.error(f"invalid `sparsity` section: {e}")

        def instantiate_trainer(self, **kwargs):
            cfg = self._get(self.config_init, "sparsity")
            if not isinstance(cfg, SparsityConfig):
                cfg = SparsityConfig(**dict(cfg))
            extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
            extra.append(SparseTraining(config=cfg))
            trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
            bar = _default_progress_bar(trainer_config, extra)
            if bar is not None:
                extra.append(bar)
            return self._instantiate_trainer(trainer_config, extra)

    return SparseTrainCLI


def _default_progress_bar(trainer_config: dict, extra: list):
    """The progress bar Lightning would add, told that a run bounded by ``max_steps`` has no last epoch.

    Lightning's rich bar labels training ``Epoch {e}/{max_epochs - 1}``, which reads "Epoch 0/-2"
    for the recipes' endless text stream (``max_epochs=-1``). Returns None where Lightning's own
    choice is fine: the bar disabled, one given by the user, or no `rich` (the tqdm bar).
    """
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    given = list(extra) + list(trainer_config.get("callbacks") or [])
    if not trainer_config.get("enable_progress_bar", True) or not _RICH_AVAILABLE:
        return None
    if any(isinstance(c, ProgressBar) for c in given):
        return None

    class StepsRichProgressBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            max_epochs = self.trainer.max_epochs
            if max_epochs is not None and max_epochs >= 0:
                return super()._get_train_description(current_epoch)
            steps = self.trainer.max_steps
            desc = f"Epoch {current_epoch}" + (f" (max {steps} steps)" if steps and steps > 0 else "")
            return f"{desc:{len(self.validation_description)}}"

    return StepsRichProgressBar()


def run_lightning(argv: Sequence[str]):
    """Run ``fit``/``validate``/``test`` with ``argv`` (the subcommand first); returns the CLI object."""
    from .data import TextDataModule
    from .models import CausalLMModule

    argv = list(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv) and not {"-h", "--help"} & set(argv):
        if DEFAULT_RECIPE.exists():
            argv[1:1] = ["--config", str(DEFAULT_RECIPE)]
    cli_cls = _make_cli_class()
    # We pass `args` ourselves (with the default recipe filled in); Lightning's warning about
    # `args` next to `sys.argv` does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return cli_cls(
        CausalLMModule,
        TextDataModule,
        args=argv,
        # A resumed run writes its config.yaml into the same directory as the run it continues.
        save_config_kwargs={"overwrite": True},
    )


# ---------------------------------------------------------------------------------------- export

def _clean_hparams(hparams: dict) -> dict:
    # LightningCLI stores how it built the module ("_class_path", "_instantiator"); not constructor args.
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


def load_module_from_checkpoint(ckpt_path: str):
    """A `CausalLMModule` (with its sparse layers, if it was trained sparse) from a checkpoint.

    Returns:
        ``(module, checkpoint dict)``.
    """
    import torch

    from .config import SparsityConfig
    from .models import CausalLMModule
    from .nn import sparsify

    path = Path(ckpt_path)
    if not path.is_file():
        raise ValueError(f"`ckpt`={ckpt_path!r} is not a file")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"`ckpt`={ckpt_path!r} is not a sparsetrain (Lightning) checkpoint of a CausalLMModule")
    module = CausalLMModule(**_clean_hparams(ckpt["hyper_parameters"]))
    cfg = ckpt.get("sparsity_config")
    if cfg is not None:
        cfg = SparsityConfig(**cfg)
        sparsify(module, cfg)
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    return module, ckpt


def _export_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sparsetrain export",
        description="Write a transformers save_pretrained directory with the trained N:M sparse weights.",
    )
    p.add_argument("--ckpt", required=True, help="a checkpoint written by `sparsetrain fit`")
    p.add_argument("--out", required=True, help="output directory (created)")
    args = p.parse_args(list(argv))
    try:
        info = export_checkpoint(args.ckpt, args.out)
    except ValueError as e:
        p.error(str(e))
    from .hub import export_summary

    print(export_summary(info, args.out))
    return 0


# ---------------------------------------------------------------------------------------- main

_USAGE = """usage: sparsetrain {fit,validate,test,export,prune,report} ...

  fit | validate | test   train or evaluate a recipe:  sparsetrain fit --config recipes/tiny-s-ste.yaml
  export                  sparsetrain export --ckpt CKPT --out DIR  (transformers save_pretrained, N:M weights)
  prune                   one-shot N:M pruning of a trained model (sparsetrain prune --help)
  report                  sparsetrain report RUN_DIR [RUN_DIR ...] [--dense RUN_DIR]  (curves PNG, final numbers)

Run `sparsetrain SUBCOMMAND --help` for the options of one subcommand."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sparsetrain`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    cmd = argv[0]
    if cmd == "export":
        return _export_main(argv[1:])
    if cmd == "report":
        from .report import main as report_main

        return report_main(argv[1:])
    if cmd == "prune":
        from .pruning.cli import main as prune_main  # another part of the package; loaded only when asked

        return prune_main(argv[1:]) or 0
    if cmd in LIGHTNING_SUBCOMMANDS:
        run_lightning(argv)
        return 0
    print(f"sparsetrain: unknown subcommand {cmd!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
