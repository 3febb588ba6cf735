"""Training text: finding and checking it, encoding it once, and cutting it into windows.

Tokens are encoded once into a memory-mapped ``.bin`` file in a cache keyed by the corpus files
and the tokenizer, so a corpus larger than RAM streams from disk and a second run starts at once.

The training split is cut into non-overlapping windows of ``block_size + 1`` tokens, and each
epoch visits every window once, in a seeded permutation of its own. Window index i is window
``perm[epoch][i % n]`` with ``epoch = i // n``: a stateless mapping, so the whole data position
of a run is one integer, a resumed run continues with exactly the windows it would have seen,
and a coordinator that hands peers disjoint ranges of window indices hands them disjoint text.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .progress import ByteMeter
from .tokenizer import BPETokenizer, CharTokenizer, Tokenizer, last_cut
from .tokenizer import load as load_tokenizer

TEXT_SUFFIXES = (".txt", ".md")
CHUNK_BYTES = 1 << 22
CACHE_FORMAT = 2  # 2: chunks cut at spaces, not newlines, which could change ids next to blank lines
BUILTIN_NAME = "<built-in corpus: Python documentation topics>"


class DataError(ValueError):
    """Input data the user must fix; the message names the file."""


@dataclass(frozen=True)
class Document:
    """A named source of text, readable as chunks cut where tokenizing them apart changes nothing."""

    name: str
    path: Path | None = None  # None: the built-in corpus

    def chunks(self) -> Iterator[str]:
        if self.path is None:
            yield builtin_text()
        else:
            yield from read_chunks(self.path)

    def size(self) -> int:
        """Bytes of text, for progress."""
        return len(builtin_text().encode()) if self.path is None else self.path.stat().st_size

    def fingerprint(self) -> str:
        if self.path is None:
            return hashlib.sha256(builtin_text().encode()).hexdigest()
        st = self.path.stat()
        return f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def builtin_text() -> str:
    """Text that ships with every Python install, so `hived train` needs no download."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        raise DataError(
            "the built-in corpus needs the standard library's pydoc_data, which this Python lacks; "
            "pass --data with a text file or folder"
        ) from None
    return "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"


def discover(paths: Iterable[str]) -> list[Document]:
    """Files as given, and the .txt/.md files under each folder (recursively, in sorted order)."""
    paths = list(paths)
    if not paths:
        return [Document(BUILTIN_NAME)]
    docs: list[Document] = []
    for p in map(Path, paths):
        if p.is_file():
            docs.append(Document(str(p), p))
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"folder {p} has no .txt or .md files; point --data at text files")
            docs.extend(Document(str(f), f) for f in found)
        else:
            raise DataError(f"--data {p}: no such file or folder")
    return docs


def read_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Decode a file as strict UTF-8 in chunks cut where a tokenizer may cut it (``last_cut``);
    refuse binary and empty files."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    carry, offset, any_text = "", 0, False
    with path.open("rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            nul = raw.find(b"\x00")
            if nul >= 0:
                raise DataError(f"{path} looks binary (NUL byte at offset {offset + nul}); pass text files only")
            try:
                text = carry + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path} is not UTF-8 text (bad byte at offset {offset + exc.start}); "
                    f"convert it, e.g. `iconv -f latin1 -t utf-8 {path}`, or leave it out"
                ) from None
            offset += len(raw)
            if not raw:
                if text:
                    any_text = any_text or bool(text.strip())
                    yield text
                break
            cut = last_cut(text)
            if cut:
                any_text = any_text or bool(text[:cut].strip())
                yield text[:cut]
            carry = text[cut:]
    if not any_text:
        raise DataError(f"{path} is empty (no text in it); add text or leave it out of --data")


def texts(docs: list[Document], progress: Callable[[int], None] | None = None) -> Iterator[str]:
    """The documents' text in chunks; ``progress`` hears each chunk's size in bytes."""
    for doc in docs:
        for chunk in doc.chunks():
            if progress:
                progress(len(chunk.encode("utf-8")))
            yield chunk


def validate(docs: list[Document]) -> None:
    """Read every document once so bad files fail before anything is trained or cached."""
    for _ in texts(docs):
        pass


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode_to_cache(docs: list[Document], tok: Tokenizer, cache_dir: Path) -> Path:
    """Encode the corpus once into ``cache_dir``; a later call with the same inputs reuses it.
    Memory stays that of one chunk whatever the corpus's size: tokens go to disk as they come."""
    key = hashlib.sha256(f"{CACHE_FORMAT}:{tok.to_json()}".encode())
    for doc in docs:
        key.update(doc.fingerprint().encode())
    dtype = _dtype(tok.vocab_size)
    path = cache_dir / f"{key.hexdigest()[:20]}.{dtype.name}.bin"
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f, ByteMeter("encoding the corpus", sum(d.size() for d in docs)) as meter:
            for i, doc in enumerate(docs):
                if i and tok.eot_id is not None:
                    np.array([tok.eot_id], dtype=dtype).tofile(f)
                for chunk in texts([doc], meter):
                    tok.encode(chunk).astype(dtype).tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class TokenData:
    """A tokenized corpus split into train (first part) and validation (last part)."""

    def __init__(self, tokens: np.ndarray, block_size: int, val_fraction: float, seed: int,
                 name: str = "corpus", val: np.ndarray | None = None, val_name: str = "--val-data"):
        """``val``: a validation split of its own (``--val-data``), so all of ``tokens`` trains."""
        n = len(tokens)
        if val is not None:
            if len(val) < block_size + 1:
                raise DataError(f"{val_name} has only {len(val)} tokens, too few for a context of {block_size} "
                                "plus one; add text to it, or train with a shorter context")
            if n < block_size + 1:
                raise DataError(f"{name} has only {n} tokens, too few for a context of {block_size} plus one; "
                                "add more text")
        else:
            n_val = max(block_size + 1, int(n * val_fraction))
            if n - n_val < block_size + 1:
                # the longest context that leaves both splits a window
                fits = min(n // 2, n - int(n * val_fraction)) - 1
                shorter = (f", or train with a shorter context: `block_size = {fits}` (the longest that fits) under "
                           "`[model]` in a --config file" if fits >= 2 else "")
                raise DataError(f"{name} has only {n} tokens, too few for a context of {block_size} plus a "
                                f"validation split; add more text{shorter}")
            tokens, val = tokens[: n - n_val], tokens[n - n_val:]
        self.block_size = block_size
        self.train = tokens
        self.val = val
        self.seed = seed
        self.windows = len(self.train) // (block_size + 1)  # per epoch
        self._orders: dict[int, np.ndarray] = {}  # epoch → its permutation (the last two used)
        self._arange = np.arange(block_size + 1)

    @classmethod
    def from_file(cls, path: Path, vocab_size: int, block_size: int, val_fraction: float,
                  seed: int, name: str, val_path: Path | None = None, val_name: str = "--val-data") -> TokenData:
        def tokens(path: Path, name: str, option: str) -> np.ndarray:
            if path.stat().st_size == 0:
                raise DataError(f"{name} encoded to no tokens; add text to {option}")
            return np.memmap(path, dtype=_dtype(vocab_size), mode="r")

        val = tokens(val_path, val_name, "--val-data") if val_path else None
        return cls(tokens(path, name, "--data"), block_size, val_fraction, seed, name=name, val=val, val_name=val_name)

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # a range may span two
            self._orders[epoch] = order
        return order

    def offsets(self, start: int, count: int) -> np.ndarray:
        """Start offsets of train windows ``start .. start+count-1`` (window index → offset)."""
        epochs, positions = np.divmod(np.arange(start, start + count, dtype=np.int64), self.windows)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            out[here] = self._order(int(epoch))[positions[here]]
        return out * (self.block_size + 1)

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets for train windows ``start .. start+count-1``."""
        rows = torch.from_numpy(self.train[self.offsets(start, count)[:, None] + self._arange].astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def val_batches(self, batch_size: int, max_tokens: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive, non-overlapping validation windows covering the split (up to max_tokens)."""
        T = self.block_size
        n_windows = min((len(self.val) - 1) // T, max(1, max_tokens // T))
        for first in range(0, n_windows, batch_size):
            starts = np.arange(first, min(first + batch_size, n_windows)) * T
            rows = torch.from_numpy(self.val[starts[:, None] + self._arange].astype(np.int64))
            yield rows[:, :-1], rows[:, 1:]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hived" / "tokens"


def build_tokenizer(kind: str, docs: list[Document], vocab_size: int, min_frequency: int) -> Tokenizer:
    """``kind`` is char, bpe, or the path of a tokenizer.json (made by `hived tokenize`)."""
    if kind == "char":
        return CharTokenizer.train(texts(docs))
    if kind == "bpe":
        validate(docs)  # errors from inside the BPE trainer's iterator would lose the file name
        with ByteMeter("training the BPE tokenizer", sum(d.size() for d in docs)) as meter:
            return BPETokenizer.train(texts(docs, meter), vocab_size, min_frequency)
    return load_tokenizer(kind)


def prepare(cfg: TrainConfig, block_size: int, tok: Tokenizer | None = None) -> tuple[Tokenizer, TokenData, str]:
    """Corpus → tokenizer (unless given) → cached tokens → splits; also returns the cache key.
    A character tokenizer also learns ``--val-data``'s characters, so none of them is unknown;
    BPE learns from the training text alone (it can spell anything)."""
    docs = discover(cfg.data)
    val_docs = discover(cfg.val_data) if cfg.val_data else []
    if tok is None:
        tok = build_tokenizer(cfg.tokenizer, docs + val_docs if cfg.tokenizer == "char" else docs,
                              cfg.vocab_size, cfg.min_frequency)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    path = encode_to_cache(docs, tok, cache)
    val_path = encode_to_cache(val_docs, tok, cache) if val_docs else None
    data = TokenData.from_file(path, tok.vocab_size, block_size, cfg.val_fraction, cfg.seed, _names(docs),
                               val_path, _names(val_docs))
    key = path.name.split(".")[0] + (f"+{val_path.name.split('.')[0]}" if val_path else "")
    return tok, data, key


def _names(docs: list[Document]) -> str:
    return docs[0].name if len(docs) == 1 else f"{len(docs)} files"


class Windows:
    """Token windows sent by a hive coordinator, served through TokenData's ``batch`` interface
    so the same Trainer runs on them: a peer needs no corpus of its own."""

    def __init__(self, rows: np.ndarray, start: int):
        self.rows = rows
        self.start = start

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = (start - self.start + np.arange(count)) % len(self.rows)
        rows = torch.from_numpy(self.rows[idx].astype(np.int64))
        return rows[:, :-1], rows[:, 1:]
