"""Tokenizers: character-level, and byte-level BPE trained with the ``tokenizers`` library.

A tokenizer serialises to one JSON string, stored in every checkpoint and written as
``tokenizer.json`` beside it, so a model is never separated from the vocabulary it was trained on.
BPE tokenizers use the Hugging Face format unchanged, so other tools can load them too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

UNK = "\ufffd"  # what an unknown character decodes to: visibly not a real character
EOT = "<|endoftext|>"


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
        # trains twice as fast). Pieces end at newlines, which the pre-tokenizer splits at anyway.
        tok.train_from_iterator((piece for text in texts for piece in _split_lines(text, 1 << 16)), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def eot_id(self) -> int | None:
        return self.tok.token_to_id(EOT)

    def encode(self, text: str) -> np.ndarray:
        # Line groups encode in parallel on the library's Rust threads, without the offsets that
        # encode_batch would also compute; pieces end at newlines, so the result matches encoding
        # the whole text at once. Each piece's ids become an array in one C loop, not one by one.
        pieces = _split_lines(text, 1 << 16)
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        encoded = self.tok.encode_batch_fast(pieces, add_special_tokens=False)
        return np.concatenate([np.array(e.ids, dtype=np.int64) for e in encoded])

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def unknown(self, text: str) -> set[str]:
        return set()

    def start_ids(self) -> list[int]:
        return [self.eot_id] if self.eot_id is not None else self.encode("\n").tolist()

    def to_json(self) -> str:
        return self.tok.to_str()


Tokenizer = CharTokenizer | BPETokenizer


def _split_lines(text: str, size: int) -> list[str]:
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


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
