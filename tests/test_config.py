"""SparsityConfig's declared fields (issue 19 item 2) and the help and messages derived from them (issue 20 item 11)."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from sparsetrain import methods
from sparsetrain.config import (
    FIELD_KINDS, MATH_FIELDS, SparsityConfig, engine_requirements, field_info, fields_of, resume_fields,
)

# One change per math and schedule field: (the config the checkpoint was trained with, the changed
# value). Each base makes the changed value valid on its own (threshold_ramp needs S-STE, ...).
CHANGES = {
    "method": ({}, "ste"),
    "n": ({"m": 8}, 4),
    "m": ({}, 8),
    "targets": ({}, "all"),
    "srste_decay": ({"method": "sr-ste"}, 1e-3),
    "masked_decay": ({}, 1e-4),
    "mvue": ({}, "exact"),
    "fp8": ({}, True),
    "dense_finetune_from": ({}, 50),
    "transposable": ({"method": "ste"}, True),
    "mask_update_interval": ({"method": "ste", "transposable": True}, 7),
    "transposable_method": ({"method": "ste", "transposable": True}, "greedy"),
    "dense_warmup": ({}, 5),
    "threshold_ramp": ({}, 5),
    "decay_ramp": ({"method": "sr-ste"}, 5),
    "lr_rewarm": ({"dense_warmup": 5}, 3),
    "flip_moments": ({}, "reset"),
    "prune_at": ({}, 5),
    "prune_method": ({"prune_at": 5}, "wanda"),
    "prune_calibration_steps": ({"prune_at": 5}, 2),
    "method_options": ({"method": "ste"}, {}),
    "activation_sparsity": ({}, "2:4"),
    "activation_targets": ({"activation_sparsity": "2:4"}, "mlp"),
}


def _pair(field):
    base, value = CHANGES[field]
    old = SparsityConfig(**base)
    new = old.replace(**{field: value})
    assert getattr(old, field) != getattr(new, field), field
    return old, new


def test_every_field_is_declared():
    for f in dataclasses.fields(SparsityConfig):
        info = field_info(f.name)
        assert info["kind"] in FIELD_KINDS, f.name
        assert len(info["help"]) > 20, f.name
    assert set(fields_of("runtime")) == {"backend", "seed", "on_nonfinite"}
    assert MATH_FIELDS == resume_fields() == fields_of("math", "schedule")
    assert set(resume_fields()) == set(CHANGES)  # a new math/schedule field needs its row here


def test_choices_are_enforced_from_the_declarations():
    for f in dataclasses.fields(SparsityConfig):
        choices = field_info(f.name)["choices"]
        if choices is None or f.name == "method":
            continue
        with pytest.raises(ValueError, match=rf"Unknown `{f.name}`='nope'; valid choices: "):
            SparsityConfig(**{f.name: "nope"})
    assert field_info("method")["choices"] == methods.names()


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_cli_early_check_refuses_a_changed_field(field):
    # `runs.config_mismatch` is what `sparsetrain fit --ckpt_path` runs before any model is built.
    from sparsetrain.runs import config_mismatch

    old, new = _pair(field)
    ckpt = {"hyper_parameters": {}, "sparsity_config": dataclasses.asdict(old)}
    assert config_mismatch(ckpt, {}, dataclasses.asdict(old)) is None
    got = config_mismatch(ckpt, {}, dataclasses.asdict(new))
    assert got is not None and got[0] == f"sparsity.{field}", got


def test_cli_early_check_ignores_runtime_fields():
    from sparsetrain.runs import config_mismatch

    old = SparsityConfig()
    ckpt = {"hyper_parameters": {}, "sparsity_config": dataclasses.asdict(old)}
    new = old.replace(backend="dense", seed=3, on_nonfinite="skip")
    assert config_mismatch(ckpt, {}, dataclasses.asdict(new)) is None


def test_fit_help_describes_every_sparsity_field():
    from sparsetrain.cli import section_help

    lines = section_help("sparsity").splitlines()
    for f in dataclasses.fields(SparsityConfig):
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"--sparsity.{f.name} "))
        assert lines[at + 1].startswith("      ") and len(lines[at + 1].strip()) > 10, f.name
    text = "\n".join(lines)
    for name in methods.names():
        assert f'"{name}"' in text  # the method choices come from the registry


def test_generated_docstring_lists_every_field():
    from sparsetrain.cli import doc_args

    docs = doc_args(SparsityConfig)  # what jsonargparse's full help reads
    assert set(docs) == {f.name for f in dataclasses.fields(SparsityConfig)}


def test_engine_requirements_come_from_the_declarations():
    assert engine_requirements(SparsityConfig(method="ste")) == []
    assert engine_requirements(SparsityConfig(method="sr-ste", srste_decay=0.0)) == []
    keys = [k for k, _ in engine_requirements(SparsityConfig(method="sr-ste", masked_decay=1e-4, dense_warmup=3))]
    assert keys == ["sr-ste", "masked_decay", "dense_warmup"]
    assert all(msg.startswith(("`", "SR-STE", "transposable")) for _, msg in
               engine_requirements(SparsityConfig(method="ste", transposable=True, flip_moments=None, prune_at=4)))


def test_method_options_are_checked_by_the_method():
    with pytest.raises(ValueError, match=r"Unknown `method_options` key 'decay' for method='ste'"):
        SparsityConfig(method="ste", method_options={"decay": 1.0})
    with pytest.raises(TypeError, match=r"`method_options` must be None or a dict"):
        SparsityConfig(method="ste", method_options=[1])


def test_dense_recipe_message_says_no_sparsity():
    pytest.importorskip("lightning")
    from sparsetrain.callbacks.sparse_training import _swap_line

    line = _swap_line(SparsityConfig(method="dense"), 8)
    assert "no sparsity" in line and "2:4" not in line and "stay dense" in line
    assert _swap_line(SparsityConfig(method="s-ste"), 8) == "SparseTraining: 8 layer(s) -> s-ste 2:4"
    # Sparse inputs are sparsity too: the line says so instead of "stay dense".
    assert (_swap_line(SparsityConfig(method="dense", activation_sparsity="2:4"), 2)
            == "SparseTraining: 2 layer(s) -> dense weights + 2:4 activations")
    assert (_swap_line(SparsityConfig(method="s-ste", activation_sparsity="2:4"), 4)
            == "SparseTraining: 4 layer(s) -> s-ste 2:4 + 2:4 activations")


def test_export_metadata_records_the_resume_fields():
    pytest.importorskip("transformers")
    from sparsetrain.hub import sparsity_metadata

    cfg = dataclasses.asdict(SparsityConfig(method="sr-ste", dense_warmup=5))
    meta = sparsity_metadata(None, [], cfg, 7)
    assert meta["training"] == {f: cfg[f] for f in resume_fields()}
    dense = sparsity_metadata(None, [], dataclasses.asdict(SparsityConfig(method="dense")), 7)
    assert dense["n"] is None and dense["layers"] == [] and dense["training"]["method"] == "dense"


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(16, 16), "fc2": nn.Linear(16, 16)})  # "mlp", "mlp_down": fc2
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.mlp["fc2"](torch.relu(self.mlp["fc1"](x))))


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_engine_refuses_to_resume_with_a_changed_field(field):
    from sparsetrain import Sparsifier

    old, new = _pair(field)
    torch.manual_seed(0)
    state = Sparsifier(_Tiny(), old).state_dict()
    Sparsifier(_Tiny(), old).load_state_dict(state)  # the same config resumes
    with pytest.raises(ValueError, match=rf"Cannot resume: the checkpoint was trained with sparsity\.{field}="):
        Sparsifier(_Tiny(), new).load_state_dict(state)
