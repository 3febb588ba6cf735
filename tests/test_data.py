import re

import numpy as np
import pytest

from hived.config import TrainConfig
from hived.data import DataError, TokenData, builtin_text, discover, encode_to_cache, prepare, texts
from hived.tokenizer import BPETokenizer, CharTokenizer


def test_discover_finds_text_files_recursively_in_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("two\n")
    (tmp_path / "one.txt").write_text("one\n")
    (tmp_path / "skip.py").write_text("print()\n")
    docs = discover([str(tmp_path)])
    assert [d.path.name for d in docs] == ["two.md", "one.txt"]
    assert "".join(texts(docs)) == "two\none\n"


def test_builtin_corpus_needs_no_files():
    docs = discover([])
    assert docs[0].path is None
    text = "".join(texts(docs))
    assert len(text) > 100_000 and text == builtin_text()


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"  \n\n ", "is empty"),
    (b"text\x00\x01\x02binary", "looks binary"),
    ("caf\u00e9 latin-1".encode("latin-1"), "is not UTF-8 text"),
])
def test_bad_files_get_an_error_naming_the_file(tmp_path, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        list(texts(discover([str(bad)])))
    assert str(bad) in str(err.value)


def test_missing_paths_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        discover([str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match="no .txt or .md"):
        discover([str(tmp_path)])


def test_chunks_encode_as_the_whole_and_survive_split_characters(tmp_path):
    path = tmp_path / "long.txt"
    # Indented lines and blank lines: whitespace runs that a cut at a newline would tokenize apart.
    text = "".join(f"line {i} ünïcödé ✓ \n\n    indented {i}\n" for i in range(3000))
    path.write_text(text, encoding="utf-8")
    from hived.data import read_chunks
    chunks = list(read_chunks(path, chunk_bytes=1000))  # forces splits inside multi-byte characters
    assert "".join(chunks) == text
    assert len(chunks) > 10
    bpe = BPETokenizer.train([text], vocab_size=400)
    apart = np.concatenate([bpe.encode(c) for c in chunks])
    assert apart.tolist() == bpe.tok.encode(text, add_special_tokens=False).ids


def test_cache_is_reused_and_memory_mapped(tmp_path, corpus):
    docs = discover([str(corpus)])
    tok = CharTokenizer.train(texts(docs))
    first = encode_to_cache(docs, tok, tmp_path / "cache")
    mtime = first.stat().st_mtime_ns
    again = encode_to_cache(docs, tok, tmp_path / "cache")
    assert again == first and again.stat().st_mtime_ns == mtime
    assert first.name.endswith(".uint16.bin")
    tokens = np.fromfile(first, dtype=np.uint16)
    assert tok.decode(tokens.tolist()) == corpus.read_text()
    corpus.write_text(corpus.read_text() + "more text\n")  # a changed corpus gets a new cache entry
    assert encode_to_cache(docs, tok, tmp_path / "cache") != first


def test_windows_are_deterministic_and_their_targets_the_next_tokens():
    tokens = np.arange(10_000, dtype=np.uint16)
    data = TokenData(tokens, block_size=16, val_fraction=0.1, seed=3)
    x, y = data.batch(100, 8)
    x2, _ = data.batch(100, 8)
    assert x.equal(x2)  # the same window indices give the same windows: resume is exact
    assert (y[:, :-1] == x[:, 1:]).all()  # targets are the next tokens
    fresh = TokenData(tokens, block_size=16, val_fraction=0.1, seed=3)
    assert np.array_equal(fresh.offsets(700, 300), data.offsets(0, 1000)[700:])  # stateless
    other = TokenData(tokens, 16, 0.1, seed=4).offsets(0, 100)
    assert not np.array_equal(other, data.offsets(0, 100))


def positions(data: TokenData, start: int, count: int) -> np.ndarray:
    """Every train token position that windows ``start .. start+count-1`` read."""
    return (data.offsets(start, count)[:, None] + np.arange(data.block_size + 1)).ravel()


def test_peers_windows_share_no_token_and_an_epoch_covers_the_split_once():
    """Two peers of a round get consecutive ranges of window indices (as the coordinator hands
    them out): they read disjoint text. An epoch reads the training split once (all of it but a
    tail shorter than a window), and the next epoch reads it again in another order."""
    tokens = np.arange(30_000, dtype=np.uint32)
    data = TokenData(tokens, block_size=16, val_fraction=0.1, seed=5)
    first, second = positions(data, 40, 32), positions(data, 72, 32)
    assert len(np.unique(first)) == len(first) and not np.intersect1d(first, second).size
    n = data.windows
    assert n == len(data.train) // 17
    epoch = positions(data, 0, n)
    assert np.array_equal(np.sort(epoch), np.arange(n * 17))  # each position once
    assert len(data.train) - n * 17 < 17
    assert np.array_equal(np.sort(positions(data, n, n)), np.arange(n * 17))
    assert not np.array_equal(data.offsets(0, n), data.offsets(n, n))
    across = data.offsets(n - 3, 6)  # a range across two epochs
    assert np.array_equal(across, np.concatenate([data.offsets(0, n)[-3:], data.offsets(n, 3)]))


def test_validation_covers_the_whole_split_once():
    tokens = np.arange(2_000, dtype=np.uint16)
    data = TokenData(tokens, block_size=10, val_fraction=0.25, seed=0)
    rows = [x for x, _ in data.val_batches(batch_size=7, max_tokens=10**9)]
    seen = np.concatenate([r.numpy().ravel() for r in rows])
    assert seen.min() == 1500 and len(seen) == len(np.unique(seen)) == (len(data.val) - 1) // 10 * 10


def test_too_small_a_corpus_says_what_to_do(tmp_path):
    (tmp_path / "tiny.txt").write_text("just a few words\n")
    cfg = TrainConfig(data=[str(tmp_path / "tiny.txt")], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="too few for a context of 64") as err:
        prepare(cfg, block_size=64)
    fits = int(re.search(r"`block_size = (\d+)`", str(err.value)).group(1))
    assert prepare(cfg, block_size=fits)[1].block_size == fits  # the advice works
    with pytest.raises(DataError):
        prepare(cfg, block_size=fits + 1)  # and is the longest that does


def test_a_validation_file_replaces_the_held_out_fraction(tmp_path, corpus):
    """With --val-data every token of --data trains and validation reads the other file, whose
    characters the char tokenizer knows; too small a validation file says so by name."""
    val = tmp_path / "val.txt"
    val.write_text("Zebras quietly judge vexing quiz boxes.\n" * 20, encoding="utf-8")
    cfg = TrainConfig(data=[str(corpus)], val_data=[str(val)], cache_dir=str(tmp_path / "c"))
    tok, data, key = prepare(cfg, block_size=32)
    assert len(data.train) == len(tok.encode(corpus.read_text(encoding="utf-8")))
    assert np.array_equal(data.val, tok.encode(val.read_text(encoding="utf-8")))
    assert not tok.unknown(val.read_text(encoding="utf-8"))  # "Z", "j", "x", "y", "z" are not in the corpus
    assert key != prepare(TrainConfig(data=[str(corpus)], cache_dir=str(tmp_path / "c")), 32)[2]
    (tmp_path / "short.txt").write_text("too short\n")
    with pytest.raises(DataError, match=r"short\.txt has only 10 tokens"):
        prepare(TrainConfig(data=[str(corpus)], val_data=[str(tmp_path / "short.txt")],
                            cache_dir=str(tmp_path / "c")), 32)
