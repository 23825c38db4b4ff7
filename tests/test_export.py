"""`sparsetrain export`: the directory loads with plain `transformers`, tokenizer and sparsity metadata included."""

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from sparsetrain import SparseTraining, SparsityConfig
from sparsetrain.cli import main
from sparsetrain.data import ByteTokenizer, TextDataModule, load_hf_tokenizer, stdlib_files, train_bpe
from sparsetrain.hub import save_tokenizer
from sparsetrain.models import CausalLMModule

SAMPLES = ["hello world", "héllo — ünïcödé ✓ 🚀", "tabs\tand\nnewlines\r\n", "日本語", "  two  spaces ", ""]


def _sample_texts():
    # Real corpus text too: stdlib source with its indentation, quotes and docstrings.
    return SAMPLES + [p.read_text(encoding="utf-8", errors="replace")[:3000] for p in stdlib_files(max_files=40)[30:33]]


def _train_checkpoint(tmp_path: Path, method: str = "s-ste", **data_kw) -> tuple[Path, TextDataModule]:
    """A few steps of a 1-block GPT-2 through Lightning; returns the checkpoint and the data module."""
    dm = TextDataModule(block_size=64, batch_size=4, max_files=30, max_bytes=300_000, val_fraction=0.1,
                        max_val_blocks=2, cache_dir=str(tmp_path / "cache"), **data_kw)
    dm.setup("fit")
    model = CausalLMModule(vocab_size=dm.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32,
                           warmup_steps=1, lr=1e-2)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[SparseTraining(SparsityConfig(method=method, n=2, m=4, targets="mlp"))])
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, dm


def _assert_same_tokenizer(hf_tok, data_tok):
    for text in _sample_texts():
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == data_tok.encode(text), text[:40]
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == data_tok.eot_id


def test_export_byte_level_loads_tokenizes_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, dm = _train_checkpoint(tmp_path)
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 257
    _assert_same_tokenizer(tok, ByteTokenizer())
    for text in SAMPLES:  # independent reference: the UTF-8 bytes themselves
        assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode("utf-8"))
    # The end-of-text text inside a document is 13 bytes, as the data module packs it; id 256 decodes to it.
    assert tok("a<|endoftext|>b", add_special_tokens=False)["input_ids"] == list(b"a<|endoftext|>b")
    assert tok.decode([104, 105, 256]) == "hi<|endoftext|>"

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.vocab_size == 320  # 257 padded to a multiple of 64
    prompt = tok("def main(", return_tensors="pt")
    torch.manual_seed(0)
    # 8 samples of 50 tokens (the context is 64).
    gen = model.generate(**prompt, max_new_tokens=50, min_new_tokens=50, do_sample=True, top_k=0,
                         num_return_sequences=8)
    assert gen.shape == (8, prompt["input_ids"].shape[1] + 50)
    new = gen[:, prompt["input_ids"].shape[1]:].reshape(-1)
    # Rows 257..319 of the padded embedding are suppressed: every sampled id is a byte or end-of-text
    # (unsuppressed, a barely trained model samples one of those 63 of 320 rows about every few tokens).
    assert int(new.max()) < 257
    assert isinstance(tok.decode(new), str)
    # The same text through the model's tokenizer and the data module's: same ids.
    text = tok.decode(new[new < 256])
    assert tok(text, add_special_tokens=False)["input_ids"] == ByteTokenizer().encode(text)


def test_export_writes_sparsity_metadata_measured_on_the_weights(tmp_path):
    from transformers import AutoConfig

    ckpt, _ = _train_checkpoint(tmp_path)
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())["sparsetrain"]
    assert AutoConfig.from_pretrained(out).sparsetrain == meta  # survives a transformers round trip
    assert (meta["method"], meta["n"], meta["m"], meta["targets"]) == ("s-ste", 2, 4, "mlp")
    assert meta["layers"] == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert meta["nm_verified"] is True and meta["global_step"] == 3 and meta["tokenizer"] == "byte"
    # Recount the zeros from the saved tensors themselves.
    tensors = load_file(out / "model.safetensors")
    zeros = total = 0
    for name in meta["layers"]:
        w = tensors[name + ".weight"]
        frac = float((w == 0).sum()) / w.numel()
        assert meta["layer_zero_fraction"][name] == pytest.approx(frac, abs=0)
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
        # S-STE 2:4 keeps exactly 2 of every 4 along the input dim (float weights: no ties at zero).
        groups = (w.t() != 0).reshape(w.shape[1], -1, 4)  # Conv1D stores (in, out): (out, in/4, 4)
        assert bool((groups.sum(-1) == 2).all())
    assert meta["zero_fraction"] == zeros / total == 0.5
    # Attention stays dense.
    assert float((tensors["transformer.h.0.attn.c_attn.weight"] == 0).float().mean()) < 0.01
    # `sparsetrain prune --model <checkpoint>` reads the same weights (through `hub`, not the CLI).
    from sparsetrain.pruning.cli import load_model

    model, model_dir = load_model(str(ckpt), tmp_path / "for_prune")
    assert model_dir == tmp_path / "for_prune"
    for name in meta["layers"]:
        assert torch.equal(model.get_submodule(name).weight, tensors[name + ".weight"])


def test_export_trained_bpe_comes_from_the_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, dm = _train_checkpoint(tmp_path, tokenizer="bpe", bpe_vocab_size=300)
    data_tok = dm.tokenizer
    # Without the tokenizer cache (another machine), the export still writes the tokenizer trained with.
    shutil.rmtree(tmp_path / "cache")
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == data_tok.vocab_size <= 300
    _assert_same_tokenizer(tok, data_tok)
    assert len(tok("def __init__(self):\n    return None")["input_ids"]) < 30  # merges survived, not bytes
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    gen = model.generate(**tok("import os", return_tensors="pt"), max_new_tokens=20, min_new_tokens=20,
                         do_sample=True, top_k=0)
    assert int(gen.max()) < len(tok)
    assert isinstance(tok.decode(gen[0]), str)


def test_saved_transformers_tokenizer_directory_round_trips(tmp_path):
    # A data module may also use a `transformers` tokenizer by name or path; export saves it as it is.
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(max_files=10)]
    bpe = train_bpe(texts, vocab_size=320, path=tmp_path / "bpe.json")
    bpe.to_transformers().save_pretrained(tmp_path / "hf_tok")
    data_tok = load_hf_tokenizer(str(tmp_path / "hf_tok"))
    save_tokenizer(data_tok, tmp_path / "out", model_vocab_size=384)
    from transformers import AutoTokenizer

    _assert_same_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "out"), data_tok)
    with pytest.raises(ValueError, match="does not fit the model's vocabulary of 100"):
        save_tokenizer(data_tok, tmp_path / "small", model_vocab_size=100)


def test_dense_export_metadata(tmp_path):
    ckpt, _ = _train_checkpoint(tmp_path, method="dense")
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())["sparsetrain"]
    assert meta["method"] == "dense" and meta["layers"] == [] and meta["zero_fraction"] == 0.0
    assert meta["nm_verified"] is False
