"""`transformers.Trainer` checkpoints (issue 20 item 13): a resume reads the sparsity state of the
checkpoint it resumes, whichever `output_dir` the resumed run writes to."""

import json
import warnings

import pytest
import torch

from test_loops import CONFIGS, STEPS, _check_same, hf_loop


def test_resume_from_another_output_dir_reads_that_checkpoints_state(tmp_path):
    cfg = CONFIGS["t-sr-ste+df"]
    full, _, _ = hf_loop(cfg, tmp_path / "full")
    hf_loop(cfg, tmp_path / "part", max_steps=3)
    ckpt = tmp_path / "part" / "checkpoint-3"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["sparsetrain"]
    assert saved["step"] == 3 and saved["config"]["mask_update_interval"] == cfg.mask_update_interval
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without the sparsity state.*")
        resumed, _, sparsity = hf_loop(cfg, tmp_path / "elsewhere", resume=str(ckpt))
    assert sparsity.step == STEPS
    _check_same(full, resumed, 0.0)
    # The engine checked the checkpoint's config: another math field is refused, naming it.
    with pytest.raises(ValueError, match=r"Cannot resume: the checkpoint was trained with sparsity.mask_update_interval="):
        hf_loop(cfg.replace(mask_update_interval=cfg.mask_update_interval + 1), tmp_path / "other", resume=str(ckpt))


def test_checkpoint_folders_load_with_from_pretrained(tmp_path):
    """Item 14: a `checkpoint-N` folder is a model: Conv1D weights in their own layout, no extra keys."""
    import torch
    from transformers import AutoModelForCausalLM

    model, _, sparsity = hf_loop(CONFIGS["s-ste+mvue"], tmp_path / "run", max_steps=3)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-3", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    swapped = dict(sparsity.layers)
    assert len(swapped) == 4
    for name, layer in swapped.items():
        conv = loaded.get_submodule(name)
        assert type(conv).__name__ == "Conv1D"
        assert torch.equal(conv.weight, layer.weight.detach().t())  # the dense W of step 3, [in, out]
        assert torch.equal(conv.bias, layer.bias.detach())
    dense = {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in swapped}
    for name, p in loaded.named_parameters():
        if name in dense:
            assert torch.equal(p, dense[name].detach()), name


def test_a_second_callback_does_not_transpose_twice():
    import sparsetrain as st
    from test_loops import gpt2

    model = gpt2()
    sparsity = st.Sparsifier(model, CONFIGS["sr-ste"])
    st.SparseTrainerCallback(sparsity)
    st.SparseTrainerCallback(sparsity)
    sd = model.state_dict()
    for name, layer in sparsity.layers:
        assert sd[f"{name}.weight"].shape == (layer.in_features, layer.out_features)  # Conv1D's [in, out]
        assert f"{name}.beta" not in sd
    model.load_state_dict(sd, strict=False)  # read back in the same layout
    for name, layer in sparsity.layers:
        assert torch.equal(layer.weight.detach().t(), sd[f"{name}.weight"])
