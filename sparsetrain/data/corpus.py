"""The tokenised corpus on disk: packing, the train/val/test split, and the memory-mapped cache.

Layout of one cached corpus (a directory named by the hash of what produced it)::

    meta.json      dtype, token counts, the spec that was hashed
    train.bin      all training documents, each followed by the end-of-text token, back to back
    val.bin        the same for validation documents
    test.bin       the same for test documents (may be empty)

A stream of L tokens gives ``(L - 1) // block_size`` blocks; block i is the input
``tokens[i*bs : i*bs + bs]`` and the target ``tokens[i*bs + 1 : i*bs + bs + 1]``, so every token but
the first is predicted exactly once. Changing ``block_size`` therefore reuses the same cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .tokenizer import iter_chunks

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: a corpus with no test document holds out the end of the stream for test
SPLITS = ("train", "val", "test")


def cache_key(spec: dict) -> str:
    """A short stable hash of a JSON-able spec."""
    blob = json.dumps({"version": CACHE_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def split_of(index: int, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Which split document ``index`` belongs to: a pure function of (seed, index).

    A hash rather than a shuffled index list, so a streamed dataset of unknown length is split the
    same way as a materialised one, and adding documents at the end leaves earlier ones in place.
    """
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0**64  # uniform in [0, 1)
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id (uint16 halves the cache for GPT-2's 50k)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def build_corpus(
    docs: Iterable[str],
    tokenizer,
    out_dir: Path,
    spec: dict,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    docs_per_batch: int = 512,
) -> dict:
    """Tokenise ``docs``, append end-of-text to each, and write the split streams into ``out_dir``.

    Written to a temporary directory first and renamed, so an interrupted build leaves no half cache.
    If hashing leaves the validation split empty (a corpus of one or two files), the last
    ``val_fraction`` of the training stream becomes the validation stream instead.

    Returns:
        The ``meta.json`` content.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = out_dir.parent / f"{out_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {s: 0 for s in SPLITS}
    n_docs = {s: 0 for s in SPLITS}
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    files = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}
    try:
        index = 0
        for chunk in iter_chunks(docs, docs_per_batch):
            for ids in tokenizer.encode_batch(chunk):
                split = split_of(index, split_seed, val_fraction, test_fraction)
                index += 1
                arr = np.concatenate([np.asarray(ids).astype(dtype, copy=False), eot])
                arr.tofile(files[split])
                counts[split] += arr.size
                n_docs[split] += 1
    finally:
        for f in files.values():
            f.close()
    if index == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError("The corpus has no documents; check `files`, `hf_dataset` or `max_files`/`max_bytes`")
    tail_split = []
    total = counts["train"]
    for split, fraction in (("val", val_fraction), ("test", test_fraction)):
        if counts[split] > 0 or fraction == 0:
            continue
        # Hashing documents cannot split a corpus of a few files; hold out the end of the training
        # stream instead (validation takes the very end, test the part before it), so the splits
        # still share no token position.
        n_take = max(1, int(round(total * fraction)))
        train = np.fromfile(tmp / "train.bin", dtype=dtype)
        if n_take >= len(train):
            break  # nothing left to train on; setup reports the empty split
        train[-n_take:].tofile(tmp / f"{split}.bin")
        train[:-n_take].tofile(tmp / "train.bin")
        counts["train"] -= n_take
        counts[split] = n_take
        tail_split.append(split)
        log.warning(
            "Only %d document(s) and none hashed to %s: the %s split is %.1f%% of the token stream cut from "
            "the end of the training split instead of whole documents.", index, split, split, 100 * fraction,
        )
    meta = {
        "dtype": dtype.name,
        "tokens": counts,
        "documents": n_docs,
        "tail_split": tail_split,
        "eot_id": int(tokenizer.eot_id),
        "vocab_size": int(tokenizer.vocab_size),
        "spec": spec,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    try:
        os.replace(tmp, out_dir)
    except OSError:
        # Another process finished the same cache first; theirs is identical, keep it.
        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads((out_dir / "meta.json").read_text())


def open_corpus(out_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, {split: read-only memory-mapped token stream})`` of a cached corpus."""
    meta = json.loads((out_dir / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    streams = {}
    for s in SPLITS:
        if meta["tokens"][s] == 0:
            streams[s] = np.zeros(0, dtype=dtype)
        else:
            streams[s] = np.memmap(out_dir / f"{s}.bin", dtype=dtype, mode="r")
    return meta, streams


def num_blocks(n_tokens: int, block_size: int) -> int:
    """How many (input, target) blocks of ``block_size`` a stream of ``n_tokens`` holds."""
    return max(0, (n_tokens - 1) // block_size)


def default_cache_dir(cache_dir: Optional[str]) -> Path:
    """``cache_dir`` if given, else ``$SPARSETRAIN_CACHE`` or ``~/.cache/sparsetrain``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("SPARSETRAIN_CACHE", "~/.cache/sparsetrain")).expanduser()
