"""The README's Python snippets run as written (issue 20, item 15).

Each snippet is taken from README.md and executed unchanged; the harness only supplies what the
README says is the user's (`model`, `loader`, `ds`, `lit_module`), as small as possible: a 2-layer,
32-wide GPT-2 and three batches.
"""

import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB, T, B, BATCHES = 64, 16, 2, 3


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def snippet(marker: str) -> str:
    """The one README snippet containing ``marker``."""
    found = [b for b in python_blocks() if marker in b]
    assert len(found) == 1, f"{len(found)} README snippets contain {marker!r}"
    return found[0]


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=T,
                                      bos_token_id=None, eos_token_id=None))


def examples() -> list[dict]:
    ids = torch.randint(0, VOCAB, (B * BATCHES, T), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


def loader():
    return torch.utils.data.DataLoader(examples(), batch_size=B)


def assert_2_of_4(weight: torch.Tensor) -> None:
    # Brute force over groups: each group of 4 consecutive inputs holds at most 2 non-zeros.
    groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    assert int(groups.max()) <= 2


def test_plain_loop_snippet_trains_saves_exports_and_resumes(tmp_path, monkeypatch):
    from transformers.pytorch_utils import Conv1D

    monkeypatch.chdir(tmp_path)  # the snippet saves sparse-run.pt in the working directory
    ns = {"model": tiny_gpt2(), "loader": loader()}
    exec(snippet("for batch in loader:\n    model(**batch).loss.backward()"), ns)  # noqa: S102
    assert ns["sparsity"].step == BATCHES
    assert set(ns["sparsity"].metrics) >= {"sparsity/flip_rate", "sparsity/zero_fraction"}
    for block in ns["sparse_model"].transformer.h:
        for layer in (block.mlp.c_fc, block.mlp.c_proj):
            assert type(layer) is Conv1D
            assert_2_of_4(layer.weight.detach().t())  # Conv1D stores (in, out)
    trained = {k: v.clone() for k, v in ns["model"].state_dict().items()}
    assert (tmp_path / "sparse-run.pt").is_file()

    # The resume snippet, into a new model of the same architecture (other initial weights).
    resumed = {"model": tiny_gpt2(seed=5), "loader": loader(), "cfg": ns["cfg"], "torch": torch, "st": ns["st"]}
    exec(snippet('state = torch.load("sparse-run.pt")'), resumed)  # noqa: S102
    assert resumed["sparsity"].step == BATCHES
    state = resumed["model"].state_dict()
    assert state.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(state[key], value), key


def test_lightning_snippet(tmp_path, monkeypatch):
    import lightning as L

    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ and checkpoints here

    class LitGPT2(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_gpt2()

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    ns = {"lit_module": LitGPT2(), "loader": loader()}
    exec(snippet("import lightning as L"), ns)  # noqa: S102
    assert ns["trainer"].global_step == BATCHES
    layers = [layer for _, layer in __import__("sparsetrain").sparse_layers(ns["lit_module"])]
    assert len(layers) == 4
    for layer in layers:
        assert_2_of_4(layer.effective_weight())


def test_transformers_trainer_snippet(tmp_path, monkeypatch):
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate: the [hf] extra")
    monkeypatch.chdir(tmp_path)  # output_dir="sparse-run"
    ns = {"model": tiny_gpt2(), "ds": examples()}
    exec(snippet("import transformers"), ns)  # noqa: S102
    assert ns["sparsity"].step == ns["trainer"].state.global_step >= 1
    for _, layer in ns["sparsity"].layers:
        assert_2_of_4(layer.effective_weight())


def test_loading_snippet_matches_the_printed_export_command(tmp_path, monkeypatch, capsys):
    """`fit` prints `--out exported/<recipe>-run_N`; the README loads that very directory."""
    from sparsetrain.cli import main

    code = snippet("AutoModelForCausalLM.from_pretrained(")
    (where,) = set(re.findall(r'from_pretrained\("([^"]+)"\)', code))
    recipe = REPO / "recipes" / "tiny-s-ste.yaml"
    root = tmp_path / "runs" / "tiny-s-ste"
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(recipe), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                 "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
                 "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32",
                 "--data.block_size", "64", "--data.batch_size", "2", "--data.max_files", "20",  # generate: 9 + 40 tokens
                 "--data.val_fraction", "0.1", "--data.max_val_blocks", "2",
                 "--data.cache_dir", str(tmp_path / "cache"), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    command = next(l for l in printed.splitlines() if "export: sparsetrain export" in l)
    assert command.endswith(f"--out {where}")
    assert main(["export", "--ckpt", str(root / "run_0"), "--out", where]) == 0
    capsys.readouterr()
    exec(code, {})  # noqa: S102
    out = capsys.readouterr().out
    assert "'method': 's-ste'" in out and "'n': 2" in out
