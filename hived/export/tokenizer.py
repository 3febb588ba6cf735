"""hived's tokenizers as `tokenizers` JSON that `AutoTokenizer` loads, and back.

A BPE tokenizer already is one. The char tokenizer becomes a word-level model over single
characters (a pre-tokenizer splits the text into characters, a decoder joins them with nothing
between), with hived's unknown token at id 0, so it encodes and decodes exactly as hived does.
"""

from __future__ import annotations

import json

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..tokenizer import EOT, UNK, CharTokenizer, Tokenizer, from_json


def to_hf(tok: Tokenizer) -> str:
    if not isinstance(tok, CharTokenizer):
        return tok.to_json()
    vocab = {UNK: 0, **{c: i + 1 for i, c in enumerate(tok.chars)}}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    return hf.to_str()


def special_tokens(tok: Tokenizer) -> dict[str, str]:
    """The special tokens `transformers` should know of."""
    return {"unk_token": UNK} if isinstance(tok, CharTokenizer) else {"eos_token": EOT, "bos_token": EOT}


def from_hf(text: str) -> Tokenizer:
    """The tokenizer an export's ``tokenizer.json`` holds, as hived's own."""
    data = json.loads(text)
    model = data.get("model") or {}
    if model.get("type") == "WordLevel" and model.get("unk_token") == UNK:
        vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
        if [i for _, i in vocab] != list(range(len(vocab))) or vocab[0][0] != UNK:
            raise ValueError("a word-level tokenizer.json that hived did not write")
        return CharTokenizer("".join(c for c, _ in vocab[1:]))
    return from_json(text)
