"""`sparsetrain export`: a training checkpoint to a `transformers` directory anyone can load.

The directory holds what ``from_pretrained`` needs and nothing sparsetrain-specific to read it:

- ``config.json`` and ``model.safetensors``: the effective weights (W~, exactly N:M in every target
  layer, stored dense with their zeros), from ``sparsetrain.nn.export``. ``config.json`` carries a
  ``"sparsetrain"`` entry with the sparsity metadata (see `sparsity_metadata`).
- ``tokenizer.json`` and ``tokenizer_config.json``: the tokenizer the model was trained with, as a
  `transformers` fast tokenizer that produces the same ids as the data module's (the byte-level one
  and a locally trained BPE included).
- ``generation_config.json``: end-of-text as end of sequence and padding; the embedding rows added
  by ``pad_vocab_to`` are suppressed, so ``generate`` never emits an id the tokenizer cannot decode.
- ``sparsetrain.json``: where it came from (checkpoint, step, full sparsity config, data settings).

Example:
    >>> export_checkpoint("runs/tiny-s-ste/checkpoints/last.ckpt", "exported/tiny-s-ste")
    >>> tok = AutoTokenizer.from_pretrained("exported/tiny-s-ste")
    >>> model = AutoModelForCausalLM.from_pretrained("exported/tiny-s-ste")
    >>> model.config.sparsetrain["zero_fraction"]
    0.5
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

METADATA_KEY = "sparsetrain"  # the config.json entry holding the sparsity metadata
# Where Lightning stores `TextDataModule.state_dict()` in a checkpoint (the class's qualified name).
_DATAMODULE_STATE_KEY = "TextDataModule"


def nm_violations(weight, n: int, m: int) -> int:
    """Groups of ``m`` consecutive weights along the input dim with more than ``n`` non-zeros.

    ``weight`` is ``(out, in)`` (an `nn.Linear` layout).
    """
    out_f, in_f = weight.shape
    groups = (weight != 0).reshape(out_f, in_f // m, m)  # (out, in/m, m)
    return int((groups.sum(-1) > n).sum())


def activation_metadata(activation_sparsity: Optional[str], layers: list[str], dense_finetune_from) -> dict:
    """The sparse-activation keys of the export metadata.

    ``activation_sparsity`` (``"2:4"`` or None) and ``activation_layers`` say how the model was
    trained; ``activation_sparsity_at_inference`` says whether inference should apply the same input
    mask to those layers: yes when training ended with it on, no after a dense final phase
    (``dense_finetune_from``), whose last steps trained the model without it. Plain `transformers`
    never applies it (the exported weights load and run as a dense model), so with ``True`` its
    outputs differ from the trained function by the activations the mask would drop.
    """
    if activation_sparsity is None:
        return {"activation_sparsity": None, "activation_layers": [], "activation_sparsity_at_inference": False}
    return {
        "activation_sparsity": activation_sparsity,
        "activation_layers": list(layers),
        "activation_sparsity_at_inference": dense_finetune_from is None,
    }


def sparsity_metadata(hf_model, layer_names: list[str], cfg: Optional[dict], global_step,
                      act_layers: Optional[list[str]] = None) -> dict:
    """The ``"sparsetrain"`` entry of the exported ``config.json``, measured on the exported weights.

    Keys: ``method``, ``n``, ``m``, ``targets`` (the rule the layers were chosen by), ``layers`` (the
    sparse layers' names in the exported model), ``zero_fraction`` (zeros over all weights of those
    layers), ``layer_zero_fraction`` (per layer), ``nm_verified`` (every group of ``m`` along the input
    dim holds at most ``n`` non-zeros; export refuses to write otherwise; False when there is no sparse
    layer), ``global_step`` and the sparse-activation keys of `activation_metadata`.
    A dense run has ``method`` ``"dense"`` and no layers. ``training`` holds every config field a
    resume must keep (the declared math and schedule fields, `sparsetrain.config.resume_fields`).
    """
    from .config import resume_fields
    from .targets import layer_weight

    cfg = cfg or {"method": "dense", "n": None, "m": None, "targets": None}
    sparse = _is_sparse_method(cfg["method"])
    per_layer, zeros, total = {}, 0, 0
    for name in layer_names if sparse else []:
        w = layer_weight(hf_model.get_submodule(name))
        z = int((w == 0).sum())
        per_layer[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    targets = cfg.get("targets")
    return {
        "method": cfg["method"],
        "n": cfg.get("n") if sparse else None,
        "m": cfg.get("m") if sparse else None,
        "targets": targets if isinstance(targets, str) or targets is None else repr(targets),
        "layers": list(per_layer),
        "zero_fraction": zeros / total if total else 0.0,
        "layer_zero_fraction": per_layer,
        "nm_verified": bool(per_layer),
        "global_step": global_step,
        **activation_metadata(cfg.get("activation_sparsity"), act_layers or [], cfg.get("dense_finetune_from")),
        "training": {f: (v if v is None or isinstance(v, (str, int, float, bool, dict)) else repr(v))
                     for f, v in ((f, cfg[f]) for f in resume_fields() if f in cfg)},
    }


def _is_sparse_method(name: str) -> bool:
    """Whether a checkpoint's method makes weights sparse (the registry says; an unknown name is
    taken as sparse, so the N:M check still runs on its layers)."""
    from . import methods

    return name not in methods.names() or methods.get(name).sparse


def data_tokenizer_of_checkpoint(ckpt: dict):
    """The data module's tokenizer a checkpoint was trained with, or None if it does not say.

    A locally trained BPE comes from the copy the data module stored in the checkpoint; any other
    tokenizer is rebuilt from the data settings (``byte``, or a `transformers` name or path).
    """
    from .data import TextDataModule
    from .data.tokenizer import bpe_from_json

    state = ckpt.get(_DATAMODULE_STATE_KEY) or {}
    if state.get("tokenizer_json"):
        return bpe_from_json(state["tokenizer_json"])
    data = ckpt.get("datamodule_hyper_parameters")
    if not data:
        return None
    data = {k: v for k, v in dict(data).items() if not k.startswith("_")}
    if data.get("tokenizer") == "bpe":
        log.warning("The checkpoint holds no copy of its BPE tokenizer (written before sparsetrain stored it); "
                    "loading it from the tokenizer cache, or training it again from the same data")
    return TextDataModule(**data).tokenizer


def save_tokenizer(tokenizer, out_dir: Path, model_vocab_size: int):
    """Save ``tokenizer`` (a data-module tokenizer) as a `transformers` tokenizer in ``out_dir``.

    Raises:
        ValueError: the tokenizer has more ids than the model's embedding has rows.
    """
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"The tokenizer ({tokenizer.name}, {tokenizer.vocab_size} ids) does not fit the model's "
            f"vocabulary of {model_vocab_size}; the checkpoint's data settings do not match its model"
        )
    hf_tok = tokenizer.to_transformers()
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def _set_generation_defaults(hf_model, eot_id: int, tokenizer_vocab: int) -> None:
    # The embedding is padded (pad_vocab_to); ids past the tokenizer's are never targets, but sampling
    # could still pick one. Suppressing them keeps generated ids decodable.
    padded = hf_model.config.vocab_size
    hf_model.config.eos_token_id = eot_id
    gen = hf_model.generation_config
    gen.eos_token_id = eot_id
    gen.pad_token_id = eot_id
    gen.suppress_tokens = list(range(tokenizer_vocab, padded)) or None


def export_checkpoint(ckpt_path: str, out_dir: str) -> dict:
    """Write a `transformers` ``save_pretrained`` directory with the effective (N:M) weights and tokenizer.

    Every swapped layer is checked to be exactly N:M before anything is written.

    Returns:
        The content of ``sparsetrain.json`` (its ``"metadata"`` is also ``config.json``'s ``"sparsetrain"``).
    """
    from .checkpoints import load_module_from_checkpoint
    from .nn import export, sparse_layers
    from .targets import layer_weight

    module, ckpt = load_module_from_checkpoint(ckpt_path)
    names = [name.removeprefix("model.") for name, _ in sparse_layers(module)]
    act_names = [name.removeprefix("model.") for name, layer in sparse_layers(module) if layer.input_nm is not None]
    cfg = ckpt.get("sparsity_config")
    hf_model = export(module.model)
    if cfg is not None and _is_sparse_method(cfg["method"]):
        n, m = cfg["n"], cfg["m"]
        for name in names:
            bad = nm_violations(layer_weight(hf_model.get_submodule(name)), n, m)
            if bad:
                raise RuntimeError(f"Exported layer {name} breaks {n}:{m} sparsity in {bad} group(s)")
    tokenizer = data_tokenizer_of_checkpoint(ckpt)
    meta = sparsity_metadata(hf_model, names, cfg, ckpt.get("global_step"), act_names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out, hf_model.config.vocab_size)
        _set_generation_defaults(hf_model, tokenizer.eot_id, tokenizer.vocab_size)
        meta["tokenizer"] = tokenizer.name
    else:
        log.warning("The checkpoint records no data settings, so no tokenizer was saved with the model")
        meta["tokenizer"] = None
    setattr(hf_model.config, METADATA_KEY, meta)
    hf_model.save_pretrained(out)
    info = {
        "checkpoint": str(Path(ckpt.get("_path", ckpt_path)).resolve()),  # a run directory resolves to its file
        "global_step": ckpt.get("global_step"),
        "sparsity_config": cfg,
        "nm_checked_layers": meta["layers"],
        "metadata": meta,
        "data": {k: v for k, v in dict(ckpt.get("datamodule_hyper_parameters", {})).items() if not k.startswith("_")},
    }
    (out / "sparsetrain.json").write_text(json.dumps(info, indent=1, default=str))
    return info


def export_summary(info: dict, out_dir) -> str:
    """What `sparsetrain export` prints: what was written and how to load it."""
    meta = info["metadata"]
    if meta["layers"]:
        what = (f"{len(meta['layers'])} {meta['method']} layer(s) checked {meta['n']}:{meta['m']}, "
                f"zero fraction {meta['zero_fraction']:.4f}")
    else:
        what = "dense model"
    tok = f"tokenizer {meta['tokenizer']}" if meta["tokenizer"] else "no tokenizer"
    where = repr(str(out_dir))
    load = f"AutoModelForCausalLM.from_pretrained({where})"
    if meta["tokenizer"]:
        load += f", AutoTokenizer.from_pretrained({where})"
    return (f"Exported step {info['global_step']} to {out_dir} ({what}; {tok}).\n"
            f"Load it with transformers: {load}")
