"""Loading a training checkpoint back into a model: shared by `sparsetrain export` (via `hub`),
`sparsetrain prune` (which reads training checkpoints too) and any script.

It lives apart from the CLI so that `hub` and `pruning.cli` need not import the command line.
"""

from __future__ import annotations


def _clean_hparams(hparams: dict) -> dict:
    # LightningCLI stores how it built the module ("_class_path", "_instantiator"); not constructor args.
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


def load_module_from_checkpoint(ckpt_path: str, what: str = "ckpt"):
    """A `CausalLMModule` (with its sparse layers, if it was trained sparse) from a checkpoint.

    Args:
        ckpt_path: a ``.ckpt`` file or a run directory (its newest readable checkpoint).
        what: the argument's name in error messages.

    Returns:
        ``(module, checkpoint dict)``; the dict's ``"_path"`` is the file that was read.

    Raises:
        ValueError: (a `runs.CheckpointError`) the path is missing, empty, truncated, not a
            sparsetrain checkpoint, or its weights do not fit the model its hyper-parameters describe.
    """
    from . import runs
    from .config import SparsityConfig
    from .models import CausalLMModule
    from .nn import sparsify

    path = runs.resolve_checkpoint(ckpt_path, what=what)
    ckpt = runs.load_checkpoint(path, what=what)
    if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise runs.CheckpointError(f"`{what}`={ckpt_path!r} is not a sparsetrain (Lightning) checkpoint of a "
                                   "CausalLMModule")
    module = CausalLMModule(**_clean_hparams(ckpt["hyper_parameters"]))
    cfg = ckpt.get("sparsity_config")
    if cfg is not None:
        cfg = SparsityConfig(**cfg)
        sparsify(module, cfg)
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise runs.CheckpointError(f"`{what}`={str(path)!r}: the weights do not fit the model its config describes "
                                   f"({detail})") from e
    module.eval()
    ckpt["_path"] = str(path)
    return module, ckpt
