"""Tokenizers for pre-training: byte-level (no download), a Hugging Face tokenizer, or a local BPE.

All three share one small interface (`encode_batch`, `decode`, `vocab_size`, `eot_id`,
`fingerprint`, `to_transformers`) so the data module does not care which one it holds. The fingerprint names the
tokenizer in the corpus-cache key: two tokenizers with the same fingerprint must produce the same ids.

Example:
    >>> tok = ByteTokenizer()
    >>> tok.decode(tok.encode("héllo"))
    'héllo'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

EOT_TEXT = "<|endoftext|>"


def _byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte value (the ``ByteLevel`` alphabet).

    Bytes that are visible, non-space Latin-1 characters stand for themselves; the other 68 are
    given the code points 256, 257, ... in byte order. This is the mapping `tokenizers`' ``ByteLevel``
    pre-tokenizer and decoder apply, so a vocabulary written with it is read back byte for byte.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus one end-of-text token 256.

    Needs nothing downloaded and round-trips any string exactly (``decode(encode(s)) == s``).
    """

    vocab_size = 257  # 256 byte values + end-of-text
    eot_id = 256
    fingerprint = "byte-utf8-v1"
    name = "byte"

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as a list of ints."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # frombuffer avoids a Python-level loop over every byte of the corpus.
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; the end-of-text token becomes `EOT_TEXT`, broken UTF-8 becomes U+FFFD."""
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                out.append(buf.decode("utf-8", errors="replace"))
                out.append(EOT_TEXT)
                buf = bytearray()
            elif 0 <= i < 256:
                buf.append(i)
            else:
                raise ValueError(f"`ids` holds {i}, outside the byte vocabulary [0, {self.vocab_size})")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def to_transformers(self):
        """The same tokenizer as a `transformers` fast tokenizer, for ``save_pretrained``.

        A BPE with the 256 byte symbols as its vocabulary (id = byte value) and no merges, behind
        `tokenizers`' ``ByteLevel`` pre-tokenizer and decoder, plus `EOT_TEXT` as id 256. It encodes
        every string to its UTF-8 bytes, as `encode` does: ``split_special_tokens`` makes a literal
        ``"<|endoftext|>"`` in the text come out as its 13 bytes, not as the end-of-text id.
        """
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        table = _byte_to_char()
        if set(table.values()) != set(pre_tokenizers.ByteLevel.alphabet()):
            raise RuntimeError("tokenizers' ByteLevel alphabet is not GPT-2's byte map; cannot save a byte tokenizer")
        tok = Tokenizer(models.BPE(vocab={c: b for b, c in table.items()}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(EOT_TEXT, special=True)])
        if tok.token_to_id(EOT_TEXT) != self.eot_id:
            raise RuntimeError(f"end-of-text got id {tok.token_to_id(EOT_TEXT)}, expected {self.eot_id}")
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token=EOT_TEXT, pad_token=EOT_TEXT, split_special_tokens=True,
            model_max_length=10**9,  # not a limit of the tokenizer; the model's context is in config.json
        )


class HFTokenizer:
    """A `transformers` tokenizer (by hub name or local path) or a `tokenizers.Tokenizer` object.

    Args:
        tokenizer: the loaded tokenizer (a ``PreTrainedTokenizerBase`` or ``tokenizers.Tokenizer``).
        fingerprint: a string naming it uniquely in cache keys.
        name: how it is shown in logs.
    """

    def __init__(self, tokenizer, fingerprint: str, name: str) -> None:
        self._tok = tokenizer
        self.fingerprint = fingerprint
        self.name = name
        if hasattr(tokenizer, "backend_tokenizer") or hasattr(tokenizer, "convert_tokens_to_ids"):
            self._is_hf = True
            eot = tokenizer.eos_token_id
            if eot is None:
                eot = tokenizer.convert_tokens_to_ids(EOT_TEXT)
                if eot == tokenizer.unk_token_id:
                    eot = None
            self.vocab_size = len(tokenizer)
        else:
            self._is_hf = False
            eot = tokenizer.token_to_id(EOT_TEXT)
            self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if eot is None:
            raise ValueError(
                f"`tokenizer`={name!r} has no end-of-text token (no eos_token and no {EOT_TEXT!r}); "
                "documents cannot be packed without one. Use 'byte', 'bpe' or a tokenizer with an eos token."
            )
        self.eot_id = int(eot)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.encode_batch([text])[0]]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if self._is_hf:
            # No special tokens: packing adds exactly one end-of-text per document itself.
            ids = self._tok(list(texts), add_special_tokens=False)["input_ids"]
        else:
            ids = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        return [np.asarray(x, dtype=np.int64) for x in ids]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self._is_hf:
            return self._tok.decode(ids)
        return self._tok.decode(ids, skip_special_tokens=False)

    def to_json(self) -> Optional[str]:
        """The serialised `tokenizers.Tokenizer` (a locally trained BPE), or None for a `transformers` one.

        A trained BPE exists only in this machine's cache; the data module stores this string in its
        checkpoints so that an export elsewhere writes exactly the tokenizer the model was trained with.
        """
        return None if self._is_hf else self._tok.to_str()

    def to_transformers(self):
        """A `transformers` tokenizer that encodes as this one does, for ``save_pretrained``."""
        if self._is_hf:
            return self._tok
        from transformers import PreTrainedTokenizerFast

        # No pad token in a BPE trained here; end-of-text is the natural one for generation.
        return PreTrainedTokenizerFast(
            tokenizer_object=self._tok, eos_token=EOT_TEXT, pad_token=EOT_TEXT, model_max_length=10**9,
        )


def train_bpe(texts: Iterable[str], vocab_size: int, path: Path) -> HFTokenizer:
    """Train a byte-level BPE with `tokenizers` on ``texts`` and save it as ``path`` (tokenizer.json).

    Byte-level pre-tokenisation means every string is encodable (no unknown token), as in GPT-2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return _load_bpe(path)


def _load_bpe(path: Path) -> HFTokenizer:
    # Bytes, not read_text: newline translation would change the fingerprint of an existing cache.
    return bpe_from_json(path.read_bytes().decode("utf-8"), name=f"bpe:{path.name}")


def bpe_from_json(text: str, name: str = "bpe") -> HFTokenizer:
    """A locally trained BPE from its serialised form (a ``tokenizer.json`` file's content)."""
    from tokenizers import Tokenizer

    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return HFTokenizer(Tokenizer.from_str(text), fingerprint=f"bpe-{digest}", name=name)


def load_bpe_or_train(texts_fn, vocab_size: int, key: dict, cache_dir: Path) -> HFTokenizer:
    """Load the BPE cached under a hash of ``key``, or train it on ``texts_fn()`` and cache it."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / "tokenizers" / f"bpe-{vocab_size}-{digest}.json"
    if path.exists():
        log.info("Loading cached BPE tokenizer %s", path)
        return _load_bpe(path)
    log.info("Training a %d-token BPE tokenizer (cached as %s)", vocab_size, path)
    return train_bpe(texts_fn(), vocab_size, path)


def load_hf_tokenizer(name_or_path: str) -> HFTokenizer:
    """A `transformers` tokenizer from a local directory or the hub, failing fast when offline."""
    from transformers import AutoTokenizer

    local = Path(name_or_path).expanduser()
    if local.exists():
        tok = AutoTokenizer.from_pretrained(str(local))
        return HFTokenizer(tok, fingerprint=f"hf:{local.resolve()}:{len(tok)}", name=name_or_path)
    from .sources import hub_unreachable_reason

    try:
        # The local hub cache may hold it even without a network.
        tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not cached"; we then try the network
        reason = hub_unreachable_reason()
        if reason is not None:
            raise ConnectionError(
                f"Tokenizer `tokenizer`={name_or_path!r} is not cached locally and the Hugging Face hub "
                f"cannot be reached ({reason}). Use `tokenizer: byte`, `tokenizer: bpe` (trained locally), "
                "or a local tokenizer directory."
            ) from None
        tok = AutoTokenizer.from_pretrained(name_or_path)
    return HFTokenizer(tok, fingerprint=f"hf:{name_or_path}:{len(tok)}", name=name_or_path)


def iter_chunks(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    chunk = []
    for x in items:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
