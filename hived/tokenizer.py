"""Tokenizers: character-level, and byte-level BPE trained with the ``tokenizers`` library.

A tokenizer serialises to one JSON string, stored in every checkpoint and written as
``tokenizer.json`` beside it, so a model is never separated from the vocabulary it was trained on.
BPE tokenizers use the Hugging Face format unchanged, so other tools can load them too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import numpy as np
import tiktoken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

UNK = "\ufffd"  # what an unknown character decodes to: visibly not a real character
EOT = "<|endoftext|>"
# The split the ``tokenizers`` ByteLevel pre-tokenizer makes (GPT-2's), for tiktoken to make the same.
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PIECE = 1 << 16  # characters per piece of a long text, for training and encoding in parallel
# Where a text may be cut without changing how the pre-tokenizer splits it: at a single space
# between two characters that are not whitespace by any definition. The space then begins the next
# word's token, cut or not. A newline is no such place: ``\s+(?!\S)`` joins it to the spaces after
# it (or before it) in a whole text, but not across a cut.
_CUT = re.compile(r"(?<=[\w!-~]) (?=[\w!-~])")


class TokenizerError(ValueError):
    pass


class CharTokenizer:
    """One token per character of the training corpus, plus an explicit unknown token (id 0).

    A character that was not in the corpus is never mapped to some other character: it becomes
    the unknown token, ``unknown(text)`` lists such characters, and callers decide whether to warn
    or refuse.
    """

    kind = "char"

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars) - {UNK}))
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._index = {c: i + 1 for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    @property
    def eot_id(self) -> int | None:
        return None

    def encode(self, text: str) -> np.ndarray:
        # Vectorised: code points → position in the sorted alphabet, misses → 0 (unknown).
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if len(self._codes) == 0:
            return np.zeros(len(codes), dtype=np.int64)
        pos = np.searchsorted(self._codes, codes).clip(0, len(self._codes) - 1)
        return np.where(self._codes[pos] == codes, pos + 1, 0).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[i - 1] if 0 < i <= len(chars) else UNK for i in ids)

    def unknown(self, text: str) -> set[str]:
        return {c for c in set(text) if c not in self._index}

    def start_ids(self) -> list[int]:
        """What to condition on when the prompt is empty."""
        return [self._index.get("\n", 0)]

    def to_json(self) -> str:
        return json.dumps({"hived_tokenizer": "char", "version": 1, "chars": self.chars})


class BPETokenizer:
    """Byte-level BPE: every byte sequence is representable, so nothing is ever unknown."""

    kind = "bpe"

    def __init__(self, tok: HFTokenizer):
        self.tok = tok

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 1:
            raise TokenizerError(f"--vocab-size must be at least {len(alphabet) + 1} for byte-level BPE")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency,
            special_tokens=[EOT], initial_alphabet=alphabet, show_progress=False,
        )
        # Fed in pieces of 64 KB: the library holds each text it is given with per-byte alignment
        # data, so 4 MB texts cost it 840 MB for a 20 MB corpus, where pieces cost 95 MB (and it
        # trains twice as fast). Pieces are cut where the pre-tokenizer splits anyway (``_CUT``).
        tok.train_from_iterator((piece for text in texts for piece in split_text(text, PIECE)), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def eot_id(self) -> int | None:
        return self.tok.token_to_id(EOT)

    @cached_property
    def _fast(self) -> tiktoken.Encoding | None:
        return _tiktoken_encoding(self.tok)

    def encode(self, text: str) -> np.ndarray:
        # Pieces are cut where the pre-tokenizer splits anyway (``_CUT``), so encoding them apart
        # gives the ids of the whole text; they are encoded on every core, and their ids gathered
        # in C rather than one Python int at a time.
        pieces = split_text(text, PIECE)
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        fast = self._fast
        if fast is None:
            encoded = self.tok.encode_batch_fast(pieces, add_special_tokens=False)
            return np.concatenate([np.array(e.ids, dtype=np.int64) for e in encoded])
        specials = fast.special_tokens_set

        def one(piece: str) -> np.ndarray:
            return fast.encode_to_numpy(piece, allowed_special=specials)

        if len(pieces) == 1:
            return one(pieces[0]).astype(np.int64)
        with ThreadPoolExecutor(min(len(pieces), os.cpu_count() or 1)) as pool:
            return np.concatenate(list(pool.map(one, pieces))).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def unknown(self, text: str) -> set[str]:
        return set()

    def start_ids(self) -> list[int]:
        return [self.eot_id] if self.eot_id is not None else self.encode("\n").tolist()

    def to_json(self) -> str:
        return self.tok.to_str()


Tokenizer = CharTokenizer | BPETokenizer


def split_text(text: str, size: int) -> list[str]:
    """``text`` in pieces of about ``size`` characters, cut only where ``_CUT`` allows, so that
    encoding the pieces apart gives the ids of the whole (a text with no such place stays whole)."""
    pieces, start = [], 0
    while start < len(text):
        cut = _CUT.search(text, start + size)
        end = cut.start() if cut else len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def last_cut(text: str) -> int:
    """The last place ``text`` may be cut as ``split_text`` cuts it, or 0 if there is none."""
    end = len(text)
    while end > 0:
        start = max(0, end - PIECE)
        found = None
        for found in _CUT.finditer(text, start, end):
            pass
        if found:
            return found.start()
        end = start
    return 0


def _tiktoken_encoding(tok: HFTokenizer) -> tiktoken.Encoding | None:
    """tiktoken's encoder for a byte-level BPE like the ones ``BPETokenizer.train`` makes.

    tiktoken encodes three to four times as fast as ``tokenizers`` (its regex and merge loop are
    leaner, and it releases the GIL, so pieces encode on every core). It gives the same ids when the
    pre-tokenizer splits alike and a token's id is also its merge rank, which is how the library's
    trainer numbers merges. A tokenizer built any other way (a normaliser, dropout, merges out of
    id order, added tokens that strip spaces) keeps the library's own encoder: None.
    """
    spec = json.loads(tok.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if (spec.get("normalizer") or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True)
            or pre.get("add_prefix_space") or model.get("type") != "BPE" or model.get("dropout")
            or model.get("byte_fallback") or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")):
        return None
    added = spec.get("added_tokens") or []
    if any(a.get("lstrip") or a.get("rstrip") or a.get("single_word") for a in added):
        return None
    byte_of = {char: i for i, char in enumerate(byte_level_chars())}
    vocab: dict[str, int] = model["vocab"]
    specials = {a["content"]: a["id"] for a in added}
    try:
        ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items() if token not in specials}
    except KeyError:  # a token that is not made of byte-level characters
        return None
    merged = [vocab.get("".join(m) if isinstance(m, list) else m.replace(" ", "", 1)) for m in model.get("merges", [])]
    if len(ranks) != len(vocab) - len(specials.keys() & vocab.keys()) or len(ranks) < 256 or any(
            a is None or b is None or a >= b for a, b in zip(merged, merged[1:])):
        return None
    return tiktoken.Encoding("hived", pat_str=BYTE_LEVEL_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def byte_level_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255: the alphabet of byte-level BPE vocabularies,
    what the ByteLevel pre-tokenizer writes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def from_json(text: str) -> Tokenizer:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"tokenizer is not valid JSON: {exc}") from None
    if isinstance(data, dict) and data.get("hived_tokenizer") == "char":
        return CharTokenizer(data["chars"])
    try:
        return BPETokenizer(HFTokenizer.from_str(text))
    except Exception as exc:  # the library raises a bare Exception on bad input
        raise TokenizerError(f"not a tokenizer file hived can read: {exc}") from None


def load(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist; make one with `hived tokenize`")
    return from_json(path.read_text(encoding="utf-8"))


def save(tok: Tokenizer, path: str | Path) -> None:
    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), tok.to_json().encode("utf-8"))
