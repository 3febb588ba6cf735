import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hived import tokenizer as tk
from hived.tokenizer import BPETokenizer, CharTokenizer, TokenizerError


def test_char_roundtrip_and_unknown_characters_stay_visible():
    tok = CharTokenizer.train(["hello world\n", "abc"])
    assert tok.decode(tok.encode("hello abc\n")) == "hello abc\n"
    ids = tok.encode("hé!")
    assert ids[1] == 0 and ids[2] == 0  # unseen characters become the unknown token...
    assert tok.decode(ids) == "h\ufffd\ufffd"  # ...which never decodes as some other character
    assert tok.unknown("hé!") == {"é", "!"}
    assert tok.vocab_size == len(set("hello world\nabc")) + 1


def test_bpe_is_lossless_on_any_text():
    text = "The night was dark. Ünïcödé ✓ 日本語 and emoji 🙂\n" * 50
    tok = BPETokenizer.train([text], vocab_size=300, min_frequency=2)
    assert tok.vocab_size == 300
    sample = "Never seen: Ωmega ★ 🙂 tabs\tand\nnewlines"
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.unknown(sample) == set()
    assert len(tok.encode(text)) < len(text.encode()) // 2  # merges actually compress
    with pytest.raises(TokenizerError, match="at least 257"):
        BPETokenizer.train([text], vocab_size=100)


@pytest.mark.parametrize("make", [
    lambda: CharTokenizer.train(["some text\n"]),
    lambda: BPETokenizer.train(["some text here and there\n" * 20], vocab_size=280),
])
def test_json_roundtrip(make, tmp_path):
    tok = make()
    tk.save(tok, tmp_path / "tokenizer.json")
    again = tk.load(tmp_path / "tokenizer.json")
    assert type(again) is type(tok)
    assert again.vocab_size == tok.vocab_size
    assert again.encode("some text").tolist() == tok.encode("some text").tolist()


def test_bad_tokenizer_files_get_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        tk.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        tk.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(TokenizerError, match="not a tokenizer file"):
        tk.load(tmp_path / "other.json")


_CORPUS = ("Whose words these are I think I know; 'tis the 3rd time we've met. " * 30
           + "  indented\n\n\ttabbed   spaces  end \n" * 20 + "Ünïcödé ✓ 日本語 🙂 42,000.5!\n" * 20)
_FRAGMENTS = ["the", " the", "'s", "'ll", "  ", "\n", "\n\n", "\t", " 3rd", "42", "✓", "🙂", "日本", tk.EOT, "Ü",
              "?!"]


@pytest.fixture(scope="module")
def bpe():
    tok = BPETokenizer.train([_CORPUS], vocab_size=600)
    assert tok._fast is not None  # the fast encoder is the one under test
    return tok


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=12)), max_size=40).map("".join))
def test_fast_bpe_encoder_gives_the_library_ids(bpe, text):
    assert bpe.encode(text).tolist() == bpe.tok.encode(text, add_special_tokens=False).ids


def test_fast_bpe_encoder_over_many_pieces(bpe):
    text = (_CORPUS + tk.EOT) * (3 * tk.PIECE // len(_CORPUS))
    ids = bpe.encode(text)
    assert len(tk.split_text(text, tk.PIECE)) > 2  # encoded in parallel pieces
    assert ids.dtype == np.int64
    assert ids.tolist() == bpe.tok.encode(text, add_special_tokens=False).ids


def test_a_tokenizer_built_elsewhere_keeps_the_library_encoder(bpe):
    from tokenizers import normalizers

    other = tk.from_json(bpe.to_json())
    other.tok.normalizer = normalizers.Lowercase()  # tiktoken cannot reproduce a normaliser
    other = tk.from_json(other.to_json())
    assert other._fast is None
    assert other.encode("The THE").tolist() == bpe.encode("the the").tolist()
