"""Data: tokenizers, packing, the document split, the corpus cache, resumable order, offline failure."""

import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain.data import (
    EOT_TEXT,
    BlockDataset,
    ByteTokenizer,
    ShuffledBlockStream,
    TextDataModule,
    split_of,
    stdlib_files,
    train_bpe,
)
from sparsetrain.data import corpus as corpus_mod

SAMPLES = ["", "hello world", "héllo — ünïcödé ✓ 🚀", "tabs\tand\nnewlines\r\n", "日本語のテキスト", "a" * 1000]


def _write_docs(folder: Path, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
    return str(folder / "*.txt")


# ----------------------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("text", SAMPLES)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    (arr,) = tok.encode_batch([text])
    assert arr.tolist() == ids


def test_byte_tokenizer_end_of_text_and_bad_ids():
    tok = ByteTokenizer()
    assert tok.decode([104, 105, 256, 106]) == "hi" + EOT_TEXT + "j"
    with pytest.raises(ValueError, match="`ids`"):
        tok.decode([300])


def test_bpe_round_trip_and_cache(tmp_path):
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(max_files=15)]
    tok = train_bpe(texts, vocab_size=400, path=tmp_path / "bpe.json")
    assert tok.vocab_size <= 400
    for text in SAMPLES[1:] + [texts[3][:2000]]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # Common code fragments merge: fewer tokens than bytes.
    assert len(tok.encode(texts[3][:2000])) < len(texts[3][:2000].encode()) * 0.8
    assert tok.decode([tok.eot_id]) == EOT_TEXT


# ----------------------------------------------------------------------------- packing

def test_packing_hand_computed(tmp_path):
    # Three documents, nothing held out: the stream is each document's bytes followed by EOT (256).
    docs = ["ab", "cde", "f"]
    out = tmp_path / "c"
    meta = corpus_mod.build_corpus(iter(docs), ByteTokenizer(), out, {"t": 1}, 0.0, 0.0, split_seed=0)
    _, streams = corpus_mod.open_corpus(out)
    expected = [97, 98, 256, 99, 100, 101, 256, 102, 256]
    assert streams["train"].tolist() == expected
    assert meta["tokens"] == {"train": 9, "val": 0, "test": 0}
    blocks = BlockDataset(streams["train"], block_size=3)
    assert len(blocks) == 2  # (9 - 1) // 3
    x0, y0 = blocks[0]
    x1, y1 = blocks[1]
    assert x0.tolist() == [97, 98, 256] and y0.tolist() == [98, 256, 99]
    assert x1.tolist() == [99, 100, 101] and y1.tolist() == [100, 101, 256]
    assert x0.dtype == torch.int64
    with pytest.raises(IndexError):
        blocks[2]


def test_split_is_by_document_deterministic_and_complete(tmp_path):
    texts = [f"document number {i}\n" * (i % 5 + 1) for i in range(60)]
    pattern = _write_docs(tmp_path / "docs", texts)
    kw = dict(files=pattern, block_size=8, batch_size=2, val_fraction=0.2, test_fraction=0.1)
    a = TextDataModule(cache_dir=str(tmp_path / "c1"), **kw)
    b = TextDataModule(cache_dir=str(tmp_path / "c2"), **kw)
    a.setup()
    b.setup()
    tok = ByteTokenizer()
    for split in ("train", "val", "test"):
        assert np.array_equal(a.split_tokens(split), b.split_tokens(split))  # same split, rebuilt from scratch
    # Reassemble each split's documents from its stream: every document lands in exactly one split, whole.
    found = {}
    for split in ("train", "val", "test"):
        text = tok.decode(a.split_tokens(split).tolist())
        pieces = text.split(EOT_TEXT)
        assert pieces[-1] == ""
        found[split] = pieces[:-1]
    assert sorted(sum(found.values(), [])) == sorted(texts)
    assert all(len(found[s]) > 0 for s in found)
    # Files are read in sorted order, and the split keeps that order within each split.
    assert found["train"] == [t for t in texts if t in set(found["train"])]
    # Another split seed gives another split.
    c = TextDataModule(cache_dir=str(tmp_path / "c1"), split_seed=7, **kw)
    c.setup()
    assert not np.array_equal(c.split_tokens("val"), a.split_tokens("val"))


def test_split_of_fractions_match_expectation():
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(20000):
        counts[split_of(i, 3, 0.1, 0.05)] += 1
    assert abs(counts["val"] / 20000 - 0.1) < 0.01
    assert abs(counts["test"] / 20000 - 0.05) < 0.01


def test_single_document_holds_out_the_tail(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(1000))
    pattern = _write_docs(tmp_path / "one", [text])
    dm = TextDataModule(files=pattern, block_size=16, batch_size=2, val_fraction=0.1, cache_dir=str(tmp_path / "c"))
    dm.setup()
    stream = list(text.encode()) + [256]  # 1001 tokens
    # Validation takes the last 10% of the stream (100 tokens), test the 5% (50 tokens) before it.
    assert dm.split_tokens("val").tolist() == stream[901:]
    assert dm.split_tokens("test").tolist() == stream[851:901]
    assert dm.split_tokens("train").tolist() == stream[:851]


# ----------------------------------------------------------------------------- cache

def test_cache_reuse_and_key(tmp_path, monkeypatch):
    pattern = _write_docs(tmp_path / "docs", [f"text {i} " * 50 for i in range(30)])
    kw = dict(files=pattern, batch_size=2, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    first = TextDataModule(block_size=16, **kw)
    first.setup()
    key = first.corpus_dir()
    train = np.array(first.split_tokens("train"))

    def fail(*a, **k):
        raise AssertionError("the corpus was tokenised again instead of read from the cache")

    monkeypatch.setattr(corpus_mod, "build_corpus", fail)
    # A different block size reads the same cache: blocks are views of the stream.
    again = TextDataModule(block_size=32, **kw)
    t0 = time.perf_counter()
    again.setup()
    assert time.perf_counter() - t0 < 2.0
    assert again.corpus_dir() == key
    assert isinstance(again.split_tokens("train"), np.memmap)
    assert np.array_equal(again.split_tokens("train"), train)
    # Anything that changes the tokens changes the key.
    assert TextDataModule(block_size=16, split_seed=1, **kw).corpus_dir() != key
    assert TextDataModule(block_size=16, tokenizer="bpe", **kw).corpus_dir() != key
    (tmp_path / "docs" / "doc000.txt").write_text("edited")
    assert TextDataModule(block_size=16, **kw).corpus_dir() != key


def test_default_corpus_is_the_sorted_stdlib(tmp_path):
    files = stdlib_files()
    assert len(files) > 100
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert "os.py" in rel and "json/__init__.py" in rel
    assert not any("site-packages" in f.parts for f in files)
    dm = TextDataModule(max_files=20, block_size=32, batch_size=4, cache_dir=str(tmp_path))
    dm.setup()
    tok = ByteTokenizer()
    texts = [f.read_bytes().decode("utf-8", errors="replace") for f in files[:20]]
    # Train then test: with no document hashed to test, the test split is the training stream's tail.
    train_test = np.concatenate([dm.split_tokens("train"), dm.split_tokens("test")]).tolist()
    docs = tok.decode(train_test).split(EOT_TEXT)[:-1]
    docs += tok.decode(dm.split_tokens("val").tolist()).split(EOT_TEXT)[:-1]
    assert sorted(docs) == sorted(texts)
    capped = TextDataModule(max_files=20, max_bytes=5000, block_size=32, batch_size=4, cache_dir=str(tmp_path))
    capped.setup()
    total = sum(len(capped.split_tokens(s)) for s in ("train", "val", "test"))
    n_docs = sum(capped.meta["documents"].values())
    assert total == 5000 + n_docs  # the bytes, plus one EOT per document read


# ----------------------------------------------------------------------------- training order

def _stream_batches(stream, k):
    it = iter(torch.utils.data.DataLoader(stream, batch_size=stream.batch_size, num_workers=0))
    return [next(it)[0] for _ in range(k)]


def test_training_order_is_a_function_of_the_position():
    tokens = np.arange(1 + 10 * 4, dtype=np.uint16)  # 10 blocks of 4
    blocks = BlockDataset(tokens, 4)
    full = _stream_batches(ShuffledBlockStream(blocks, batch_size=3, seed=5), 8)
    # Each pass over the data is a permutation of the blocks (first 10 samples: all blocks once).
    first_pass = torch.cat(full)[:10, 0].tolist()
    assert sorted(first_pass) == [4 * i for i in range(10)]
    # Starting at batch 5 continues exactly where an uninterrupted run would be.
    resumed = _stream_batches(ShuffledBlockStream(blocks, batch_size=3, seed=5, start_batch=5), 3)
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a, b)
    # Two ranks see disjoint global batches that interleave into the single-rank order.
    r0 = _stream_batches(ShuffledBlockStream(blocks, batch_size=3, seed=5, rank=0, world_size=2), 4)
    r1 = _stream_batches(ShuffledBlockStream(blocks, batch_size=3, seed=5, rank=1, world_size=2), 4)
    for j in range(4):
        assert torch.equal(r0[j], full[2 * j]) and torch.equal(r1[j], full[2 * j + 1])


def test_training_order_same_with_workers():
    tokens = np.arange(1 + 12 * 4, dtype=np.uint16)
    stream = ShuffledBlockStream(BlockDataset(tokens, 4), batch_size=2, seed=1, start_batch=3)
    plain = _stream_batches(stream, 6)
    it = iter(torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2))
    with_workers = [next(it)[0] for _ in range(6)]
    for a, b in zip(plain, with_workers):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- errors

def test_unreachable_hf_dataset_fails_fast_with_instructions(tmp_path, monkeypatch):
    # Port 9 on localhost refuses at once: the same path as a machine without network.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    dm = TextDataModule(hf_dataset="some-org/some-corpus", hf_timeout=2.0, cache_dir=str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"'some-org/some-corpus'.*local text files"):
        dm.setup()
    assert time.perf_counter() - t0 < 10


def test_offline_env_hf_dataset_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dm = TextDataModule(hf_dataset="openwebtext", hf_timeout=2.0, cache_dir=str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"'openwebtext'.*--data.files"):
        dm.setup()
    assert time.perf_counter() - t0 < 15


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=0), "`block_size`"),
        (dict(val_fraction=0.0), "`val_fraction`"),
        (dict(val_fraction=0.6, test_fraction=0.5), "`val_fraction` and `test_fraction`"),
        (dict(files="x.txt", hf_dataset="y"), "`files` or `hf_dataset`"),
        (dict(max_files=0), "`max_files`"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataModule(**kwargs)


def test_missing_files_name_the_pattern(tmp_path):
    dm = TextDataModule(files=str(tmp_path / "nothing*.txt"), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="`files` pattern"):
        dm.setup()


# ----------------------------------------------------------------------------- tokenizers as transformers

def test_byte_tokenizer_as_transformers_covers_every_byte():
    hf = ByteTokenizer().to_transformers()
    # Code points up to U+07FF plus 3- and 4-byte characters: every byte value a UTF-8 text can hold.
    text = "".join(chr(i) for i in range(0x800)) + "€ ✓ 日本 🚀 \U0010FFFF"
    expected = list(text.encode("utf-8"))
    assert set(range(0x80)) | set(range(0x80, 0xC0)) | set(range(0xC2, 0xE0)) <= set(expected)
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert ids == expected
    assert hf.decode(ids) == text
    assert len(hf) == 257 and hf.eos_token_id == 256 and hf.pad_token_id == 256


def test_trained_bpe_as_transformers_matches(tmp_path):
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(max_files=12)]
    tok = train_bpe(texts, vocab_size=350, path=tmp_path / "bpe.json")
    hf = tok.to_transformers()
    for text in SAMPLES + [texts[5][:3000], "x" + EOT_TEXT + "y"]:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text)
        assert hf.decode(ids) == tok.decode(ids)
    assert hf.eos_token_id == tok.eot_id


# ----------------------------------------------------------------------------- the test split

def test_default_settings_hold_out_a_test_split_disjoint_from_validation(tmp_path):
    # Every document is unique, so a document seen in two splits would show up as a shared string.
    texts = [f"doc {i}: " + "lorem ipsum " * (i % 7 + 1) + "\n" for i in range(300)]
    pattern = _write_docs(tmp_path / "docs", texts)
    dm = TextDataModule(files=pattern, block_size=16, batch_size=2, cache_dir=str(tmp_path / "c"))
    assert dm.test_fraction > 0  # the default
    dm.setup("test")
    tok = ByteTokenizer()
    found = {s: tok.decode(dm.split_tokens(s).tolist()).split(EOT_TEXT)[:-1] for s in ("train", "val", "test")}
    assert not dm.meta["tail_split"]  # 300 documents: every split is whole documents
    assert len(found["test"]) > 0 and len(found["val"]) > 0
    assert not set(found["test"]) & set(found["val"])
    assert not set(found["test"]) & set(found["train"])
    assert sorted(sum(found.values(), [])) == sorted(texts)
    # The test loader reads the test stream, not the validation one: every target block is a slice of it.
    test_stream = dm.split_tokens("test").tolist()
    n = 0
    for x, y in dm.test_dataloader():
        for xi, yi in zip(x.tolist(), y.tolist()):
            start = n * 16
            assert xi == test_stream[start:start + 16] and yi == test_stream[start + 1:start + 17]
            n += 1
    assert n == (len(test_stream) - 1) // 16


def test_test_subcommand_reports_the_test_split(tmp_path):
    """`trainer.test` logs `test/loss` over the test blocks: recomputed with a plain loop, not the val loss."""
    from sparsetrain.models import CausalLMModule

    from lightning_helpers import quiet_trainer

    dm = TextDataModule(max_files=60, max_bytes=400_000, block_size=32, batch_size=4, max_val_blocks=6,
                        cache_dir=str(tmp_path / "c"))
    dm.setup("test")
    torch.manual_seed(0)
    model = CausalLMModule(vocab_size=dm.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32).eval()

    def loss_over(split):
        blocks = dm.blocks(split)
        idx = np.linspace(0, len(blocks) - 1, 6).round().astype(int).tolist()  # max_val_blocks evenly spaced
        total, count = 0.0, 0
        with torch.no_grad():
            for i in idx:
                x, y = blocks[i]
                logits = model.model(input_ids=x[None]).logits[0]  # (T, padded vocab), as training sees it
                total += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
                count += y.numel()
        return total / count

    (result,) = quiet_trainer().test(model, datamodule=dm, verbose=False)
    assert result["test/loss"] == pytest.approx(loss_over("test"), rel=1e-5)
    assert result["test/loss"] != pytest.approx(loss_over("val"), rel=1e-3)


def test_no_test_split_is_an_error_for_test(tmp_path):
    pattern = _write_docs(tmp_path / "docs", [f"document {i}\n" * 20 for i in range(30)])
    dm = TextDataModule(files=pattern, block_size=8, batch_size=2, test_fraction=0.0, cache_dir=str(tmp_path / "c"))
    dm.setup("test")
    assert len(dm.split_tokens("test")) == 0
    with pytest.raises(ValueError, match=r"`test_fraction` is 0, so there is no test split.*--data.test_fraction"):
        dm.test_dataloader()


def test_checkpoint_state_carries_the_trained_bpe(tmp_path):
    texts = [f"def f{i}(x):\n    return x * {i}\n" * 5 for i in range(40)]
    pattern = _write_docs(tmp_path / "docs", texts)
    kw = dict(files=pattern, tokenizer="bpe", block_size=8, batch_size=2)
    a = TextDataModule(cache_dir=str(tmp_path / "c1"), bpe_vocab_size=300, **kw)
    a.setup()
    state = a.state_dict()
    from sparsetrain.data.tokenizer import bpe_from_json

    copy = bpe_from_json(state["tokenizer_json"])
    for text in texts[:5] + SAMPLES:
        assert copy.encode(text) == a.tokenizer.encode(text)
    # Byte-level: nothing to carry.
    assert TextDataModule(files=pattern, block_size=8, batch_size=2, cache_dir=str(tmp_path / "c1")).state_dict() == {}
    # Resuming with the same tokenizer is fine; with another one (a rebuilt cache) it is an error.
    same = TextDataModule(cache_dir=str(tmp_path / "c1"), bpe_vocab_size=300, **kw)
    same.setup()
    same.load_state_dict(state)
    other = TextDataModule(cache_dir=str(tmp_path / "c2"), bpe_vocab_size=280, **kw)
    other.setup()
    with pytest.raises(ValueError, match="another BPE tokenizer"):
        other.load_state_dict(state)
