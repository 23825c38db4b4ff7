"""Where documents come from: the offline default corpus, local text files, or Hugging Face datasets.

Each source is described by a small JSON-able ``spec`` (it goes into the corpus-cache key) and
yields documents as strings, always in the same order.
"""

from __future__ import annotations

import glob
import hashlib
import os
import socket
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence
from urllib.parse import urlparse

# Not part of the standard library proper (installed packages, tests, caches): leaving them out keeps
# the default corpus the same on every machine with the same Python version, and about 11 MB.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests"}

_TRUTHY = {"1", "true", "yes", "on"}


def stdlib_files(max_files: Optional[int] = None) -> list[Path]:
    """The Python standard library's ``.py`` files, sorted, found through `sysconfig`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP_DIRS)
        files.extend(Path(d) / n for n in names if n.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files[:max_files] if max_files is not None else files


def local_files(patterns: Sequence[str]) -> list[Path]:
    """Files matching ``patterns`` (paths or globs; ``**`` recurses), sorted and de-duplicated."""
    found = set()
    for pat in patterns:
        pat = os.path.expanduser(pat)
        matches = glob.glob(pat, recursive=True) if glob.has_magic(pat) else ([pat] if os.path.exists(pat) else [])
        if not matches:
            raise ValueError(f"`files` pattern {pat!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                raise ValueError(f"`files` entry {m!r} is a directory; use a glob such as '{m}/**/*.txt'")
            found.add(p.resolve())
    return sorted(found)


def files_spec(kind: str, files: list[Path]) -> dict:
    """A cache-key spec for a file list: names, sizes and modification times (an edit invalidates it)."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    spec = {"kind": kind, "n_files": len(files), "files_hash": h.hexdigest()}
    if kind == "stdlib":
        spec["python"] = sys.version.split()[0]
    return spec


def iter_file_documents(files: Sequence[Path], max_bytes: Optional[int] = None) -> Iterator[str]:
    """One document per file; stop once ``max_bytes`` bytes of text have been yielded."""
    total = 0
    for p in files:
        if max_bytes is not None and total >= max_bytes:
            return
        data = p.read_bytes()
        if max_bytes is not None:
            data = data[: max_bytes - total]
        total += len(data)
        # Undecodable bytes become U+FFFD rather than failing a whole run on one odd file.
        yield data.decode("utf-8", errors="replace")


def hub_unreachable_reason(timeout: float = 5.0) -> Optional[str]:
    """Why the Hugging Face hub cannot be reached right now, or None if a TCP connection succeeds.

    Runs the probe in a thread so that a DNS lookup with no timeout of its own cannot hang the caller.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return f"{var} is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    result: list = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host}:{port}: {e}")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        return f"{host}:{port}: no answer within {timeout:g} s"
    return result[0]


def hf_spec(name: str, config: Optional[str], split: str, text_column: str, max_docs: Optional[int]) -> dict:
    """Cache-key spec of a Hugging Face dataset (a local dataset directory is keyed by its path)."""
    p = Path(name).expanduser()
    ident = str(p.resolve()) if p.exists() else name
    return {"kind": "hf", "name": ident, "config": config, "split": split, "text_column": text_column,
            "max_docs": max_docs}


def iter_hf_documents(
    name: str,
    config: Optional[str],
    split: str,
    text_column: str,
    streaming: bool,
    max_docs: Optional[int],
    timeout: float,
) -> Iterator[str]:
    """Documents of a Hugging Face dataset; raises `ConnectionError` at once when it cannot be reached."""
    import datasets

    where = f"Hugging Face dataset {name!r} (config={config!r}, split={split!r})"
    how = (
        "To train offline, use local text files (`--data.files 'corpus/**/*.txt'`) or the offline default "
        "corpus (leave `data.hf_dataset` unset), or point `data.hf_dataset` at a local copy of the dataset "
        "(a directory). A corpus tokenised once is cached and needs no network afterwards."
    )
    local = Path(name).expanduser()
    if local.exists():
        if (local / "state.json").exists() or (local / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(local))  # written by `save_to_disk`
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"`hf_split`={split!r} is not a split of {where}; splits: {list(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(str(local), config, split=split, streaming=streaming)
    else:
        # Probe first: `datasets` reads the offline switches once at import and otherwise retries
        # an unreachable hub with back-off for minutes.
        reason = hub_unreachable_reason(timeout)
        if reason is not None:
            raise ConnectionError(f"{where} cannot be reached: {reason}. {how}")
        try:
            ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
        except Exception as e:  # noqa: BLE001 - re-raised with the dataset named and the way out
            raise ConnectionError(f"{where} could not be loaded ({type(e).__name__}: {e}). {how}") from e
    columns = ds.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(f"`text_column`={text_column!r} is not a column of {where}; columns: {columns}")
    for i, row in enumerate(ds):
        if max_docs is not None and i >= max_docs:
            return
        yield row[text_column]
