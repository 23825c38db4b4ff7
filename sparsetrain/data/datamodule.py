"""`TextDataModule`: packed, cached, deterministically split text for causal-LM pre-training.

Example:
    >>> dm = TextDataModule(block_size=64, batch_size=8, max_files=20)  # offline default corpus
    >>> dm.setup("fit")
    >>> x, y = next(iter(dm.train_dataloader()))   # (8, 64) int64 each; y is x shifted by one
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator, Optional, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from . import corpus as _corpus
from . import sources as _sources
from .tokenizer import ByteTokenizer, load_bpe_or_train, load_hf_tokenizer

log = logging.getLogger(__name__)


class BlockDataset(Dataset):
    """Consecutive blocks of a token stream, in order: item i is ``(x, y)``, each ``(block_size,)`` int64."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return _corpus.num_blocks(len(self.tokens), self.block_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.block_size
        chunk = torch.from_numpy(np.asarray(self.tokens[start : start + self.block_size + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]


class ShuffledBlockStream(IterableDataset):
    """An endless stream of training blocks whose order is a pure function of the position.

    Global sample k is block ``perm_e[k mod n]`` of epoch ``e = k // n``, where ``perm_e`` is a
    permutation seeded by ``(seed, e)``. Rank r of w takes the global batches ``j*w + r``; a dataloader
    worker takes every ``num_workers``-th of the rank's batches, which `DataLoader` then interleaves
    back into order. Starting at ``start_batch`` therefore resumes exactly where a run stopped, with
    nothing to save but the step count.
    """

    def __init__(
        self,
        blocks: BlockDataset,
        batch_size: int,
        seed: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = len(self.blocks)
        cached_epoch, perm = -1, None
        local = self.start_batch + worker  # this rank's batch counter
        while True:
            global_batch = local * self.world_size + self.rank
            for k in range(global_batch * self.batch_size, (global_batch + 1) * self.batch_size):
                epoch, pos = divmod(k, n)
                if epoch != cached_epoch:
                    cached_epoch, perm = epoch, self._perm(epoch)
                yield self.blocks[int(perm[pos])]
            local += n_workers


class TextDataModule(L.LightningDataModule):
    """Text for causal-LM pre-training: one source, one tokenizer, packed into fixed-length blocks.

    The source is, in order of precedence: a Hugging Face dataset (``hf_dataset``), local text files
    (``files``), or the offline default corpus (the Python standard library's source, found through
    `sysconfig`; about 11 MB, the same on every machine with the same Python version).

    Documents are tokenised, each followed by the end-of-text token, concatenated and cut into
    blocks of ``block_size`` (inputs) plus one (the shifted target). Documents go to train, val or
    test by a seeded hash of their index. The token streams are cached as memory-mapped files under
    ``cache_dir`` keyed by a hash of (source, tokenizer, split settings), so a second run with the
    same data starts in seconds; ``block_size`` and ``batch_size`` are not part of the key.

    Args:
        files: local text files or globs (``"data/**/*.txt"``); one document per file.
        hf_dataset: a Hugging Face dataset name (``"openwebtext"``) or a local dataset directory.
        hf_config: the dataset configuration (``"en"`` for C4), if it has several.
        hf_split: which split of the Hugging Face dataset to read; it is then split into train/val/test here.
        text_column: the column holding the text.
        streaming: read the Hugging Face dataset as a stream instead of downloading it whole first.
        hf_timeout: seconds to wait for the hub before failing with a message on how to go offline.
        max_docs: read at most this many documents of a Hugging Face dataset.
        max_files: use only the first this many files (of the default corpus or of ``files``).
        max_bytes: stop reading files after this many bytes of text (keeps tests and smoke runs short).
        tokenizer: ``"byte"`` (UTF-8 bytes, 257 ids, no download), ``"bpe"`` (a byte-level BPE of
            ``bpe_vocab_size`` trained on the training documents and cached), or a Hugging Face
            tokenizer name or local directory (``"gpt2"``).
        bpe_vocab_size: vocabulary size of the locally trained BPE.
        block_size: tokens per training example (the model's context length).
        batch_size: examples per batch (per device).
        val_fraction: expected fraction of documents held out for validation.
        test_fraction: expected fraction of documents held out for testing (``sparsetrain test``),
            disjoint from the validation documents. 0 means no test split, and ``test`` then fails.
        split_seed: seeds the document split (change it to get another split of the same corpus).
        seed: seeds the order of training blocks.
        max_val_blocks: evaluate on at most this many validation blocks (evenly spaced, always the same ones).
        num_workers: dataloader worker processes.
        cache_dir: where tokenised corpora and BPE tokenizers are cached (default ``$SPARSETRAIN_CACHE``
            or ``~/.cache/sparsetrain``).
    """

    def __init__(
        self,
        files: Optional[Union[str, list[str]]] = None,
        hf_dataset: Optional[str] = None,
        hf_config: Optional[str] = None,
        hf_split: str = "train",
        text_column: str = "text",
        streaming: bool = False,
        hf_timeout: float = 5.0,
        max_docs: Optional[int] = None,
        max_files: Optional[int] = None,
        max_bytes: Optional[int] = None,
        tokenizer: str = "byte",
        bpe_vocab_size: int = 4096,
        block_size: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 1337,
        seed: int = 1337,
        max_val_blocks: Optional[int] = None,
        num_workers: int = 0,
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        if files is not None and hf_dataset is not None:
            raise ValueError("Give either `files` or `hf_dataset`, not both")
        for name, v in (("block_size", block_size), ("batch_size", batch_size), ("bpe_vocab_size", bpe_vocab_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {v!r}")
        for name, v in (("max_docs", max_docs), ("max_files", max_files), ("max_bytes", max_bytes),
                        ("max_val_blocks", max_val_blocks)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"`{name}` must be None or an int >= 1, got {v!r}")
        if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"`val_fraction` and `test_fraction` must be in [0, 1) with a sum below 1, "
                f"got {val_fraction!r} and {test_fraction!r}"
            )
        if val_fraction == 0.0:
            raise ValueError("`val_fraction` must be > 0: validation loss is how runs are compared")
        if isinstance(files, str):
            files = [files]
        self.files = files
        self.hf_dataset, self.hf_config, self.hf_split = hf_dataset, hf_config, hf_split
        self.text_column, self.streaming, self.hf_timeout = text_column, streaming, hf_timeout
        self.max_docs, self.max_files, self.max_bytes = max_docs, max_files, max_bytes
        self.tokenizer_name, self.bpe_vocab_size = tokenizer, bpe_vocab_size
        self.block_size, self.batch_size = block_size, batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed, self.seed = split_seed, seed
        self.max_val_blocks, self.num_workers = max_val_blocks, num_workers
        self.cache_dir = _corpus.default_cache_dir(cache_dir)
        self._tokenizer = None
        self.saved_tokenizer_json: Optional[str] = None
        self._streams: Optional[dict[str, np.ndarray]] = None
        self.meta: Optional[dict] = None
        self.save_hyperparameters()

    # ----------------------------------------------------------------------------- source & tokenizer

    def _file_list(self) -> list[Path]:
        if self.files is not None:
            files = _sources.local_files(self.files)
        else:
            files = _sources.stdlib_files()
        return files[: self.max_files] if self.max_files is not None else files

    def source_spec(self) -> dict:
        """What the documents are, as a JSON-able dict (part of the cache key)."""
        if self.hf_dataset is not None:
            return _sources.hf_spec(self.hf_dataset, self.hf_config, self.hf_split, self.text_column, self.max_docs)
        spec = _sources.files_spec("files" if self.files is not None else "stdlib", self._file_list())
        spec["max_bytes"] = self.max_bytes
        return spec

    def iter_documents(self) -> Iterator[str]:
        """The source's documents as strings, always in the same order."""
        if self.hf_dataset is not None:
            yield from _sources.iter_hf_documents(
                self.hf_dataset, self.hf_config, self.hf_split, self.text_column, self.streaming,
                self.max_docs, self.hf_timeout,
            )
        else:
            yield from _sources.iter_file_documents(self._file_list(), self.max_bytes)

    @property
    def tokenizer(self):
        """The tokenizer (loaded, or for ``"bpe"`` trained, on first use)."""
        if self._tokenizer is None:
            name = self.tokenizer_name
            if name == "byte":
                self._tokenizer = ByteTokenizer()
            elif name == "bpe":
                def train_docs():
                    # Train the BPE on training documents only, so validation text stays unseen.
                    for i, d in enumerate(self.iter_documents()):
                        if _corpus.split_of(i, self.split_seed, self.val_fraction, self.test_fraction) == "train":
                            yield d

                key = {"source": self.source_spec(), "split": self._split_settings()}
                self._tokenizer = load_bpe_or_train(train_docs, self.bpe_vocab_size, key, self.cache_dir)
            else:
                self._tokenizer = load_hf_tokenizer(name)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary the model needs (the BPE's target size before it is trained)."""
        if self.tokenizer_name == "bpe" and self._tokenizer is None:
            return self.bpe_vocab_size
        return self.tokenizer.vocab_size

    def _split_settings(self) -> dict:
        return {"val_fraction": self.val_fraction, "test_fraction": self.test_fraction, "split_seed": self.split_seed}

    # ----------------------------------------------------------------------------- cache

    def corpus_dir(self) -> Path:
        """The cache directory of this (source, tokenizer, split) combination."""
        spec = {"source": self.source_spec(), "tokenizer": self.tokenizer.fingerprint, "split": self._split_settings()}
        return self.cache_dir / "corpora" / _corpus.cache_key(spec)

    def prepare_data(self) -> None:
        """Tokenise the corpus into the cache unless it is there already (runs on one process per node)."""
        out = self.corpus_dir()
        if (out / "meta.json").exists():
            log.info("Using the cached corpus %s", out)
            return
        t0 = time.perf_counter()
        spec = {"source": self.source_spec(), "tokenizer": self.tokenizer.fingerprint, "split": self._split_settings()}
        log.info("Tokenising the corpus into %s", out)
        meta = _corpus.build_corpus(
            self.iter_documents(), self.tokenizer, out, spec, self.val_fraction, self.test_fraction, self.split_seed
        )
        log.info("Tokenised %s tokens in %.1f s", meta["tokens"], time.perf_counter() - t0)

    def setup(self, stage: Optional[str] = None) -> None:
        if self._streams is not None:
            return
        out = self.corpus_dir()
        if not (out / "meta.json").exists():
            self.prepare_data()  # used without a Trainer, or prepare_data skipped
        self.meta, self._streams = _corpus.open_corpus(out)
        need = self.block_size + 1
        if len(self._streams["train"]) < need * self.batch_size:
            raise ValueError(
                f"The training split has {len(self._streams['train'])} tokens, fewer than one batch of "
                f"`batch_size`={self.batch_size} x (`block_size`={self.block_size} + 1); use more data"
            )
        if len(self._streams["val"]) < need:
            raise ValueError(
                f"The validation split has {len(self._streams['val'])} tokens, fewer than one block of "
                f"`block_size`={self.block_size} + 1; raise `val_fraction` or use more data"
            )

    def split_tokens(self, split: str) -> np.ndarray:
        """The memory-mapped token stream of ``split`` ('train', 'val' or 'test')."""
        if self._streams is None:
            self.setup()
        if split not in self._streams:
            raise ValueError(f"Unknown `split`={split!r}; valid choices: 'train', 'val', 'test'")
        return self._streams[split]

    def blocks(self, split: str) -> BlockDataset:
        """All blocks of ``split`` in stream order."""
        return BlockDataset(self.split_tokens(split), self.block_size)

    # ----------------------------------------------------------------------------- dataloaders

    def train_dataloader(self) -> DataLoader:
        start, rank, world = 0, 0, 1
        trainer = self.trainer
        if trainer is not None:
            # Batches already consumed by a run being resumed; the schedule needs only the step.
            start = trainer.global_step * trainer.accumulate_grad_batches
            rank, world = trainer.global_rank, trainer.world_size
        stream = ShuffledBlockStream(self.blocks("train"), self.batch_size, self.seed, start, rank, world)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self.blocks(split)
        if self.max_val_blocks is not None and len(ds) > self.max_val_blocks:
            # Evenly spaced blocks cover the whole split, not just the documents that sort first.
            idx = np.linspace(0, len(ds) - 1, self.max_val_blocks).round().astype(int).tolist()
            ds = torch.utils.data.Subset(ds, idx)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        # Checked here rather than in `setup`: only `test` needs the split, and a tiny corpus may train without one.
        if self.test_fraction == 0.0:
            raise ValueError(
                "`test_fraction` is 0, so there is no test split to evaluate; set `--data.test_fraction 0.05` "
                "(the default), or use `validate` for the validation split"
            )
        n = len(self.split_tokens("test"))
        if n < self.block_size + 1:
            raise ValueError(
                f"The test split has {n} tokens, fewer than one block of `block_size`={self.block_size} + 1; "
                "raise `test_fraction` or use more data"
            )
        return self._eval_loader("test")

    # ----------------------------------------------------------------------------- checkpoint state

    def state_dict(self) -> dict:
        """What a checkpoint needs to rebuild the tokenizer elsewhere: a locally trained BPE, serialised.

        Other tokenizers are rebuilt from the hyper-parameters (``byte``) or their name or path.
        """
        tok = self._tokenizer
        text = tok.to_json() if tok is not None and hasattr(tok, "to_json") else None
        return {"tokenizer_json": text} if text is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep the checkpoint's tokenizer copy; refuse to resume with a different trained BPE.

        The tokenizer in use is rebuilt from the cache (or retrained) before a resume restores this
        state; one that differs from the checkpoint's would give the same text other ids.
        """
        saved = state_dict.get("tokenizer_json")
        self.saved_tokenizer_json = saved
        tok = self._tokenizer
        current = tok.to_json() if tok is not None and hasattr(tok, "to_json") else None
        if saved is not None and current is not None and saved != current:
            raise ValueError(
                f"The checkpoint was trained with another BPE tokenizer than the one now in use ({tok.name}); "
                "the tokenizer cache was rebuilt since. Resume with the same `cache_dir`, or start a new run"
            )
