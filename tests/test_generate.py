import pytest
import torch

from hived.config import ModelConfig
from hived.generate import SamplingParams, _filter, generate, stream
from hived.model import GPT
from hived.serving import chat_reply
from hived.tokenizer import BPETokenizer, CharTokenizer

TEXT = "abcdefghij klmnop\n"


@pytest.fixture
def model_and_tok():
    torch.manual_seed(0)
    tok = CharTokenizer.train([TEXT])
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    return model, tok


def test_seed_makes_samples_reproducible_and_samples_differ(model_and_tok):
    model, tok = model_and_tok
    p = SamplingParams(max_tokens=30, temperature=1.0, seed=7)
    a = generate(model, tok, "abc", p, num_samples=2)
    assert a == generate(model, tok, "abc", p, num_samples=2)
    assert a[0] != a[1]
    assert all(len(s) == 30 for s in a)  # runs past the 8-token context via the sliding cache


def test_greedy_equals_top_k_one(model_and_tok):
    model, tok = model_and_tok
    greedy = generate(model, tok, "ab", SamplingParams(max_tokens=20, temperature=0))
    topk1 = generate(model, tok, "ab", SamplingParams(max_tokens=20, temperature=1.0, top_k=1, seed=1))
    assert greedy == topk1


def test_filters_do_what_they_say():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, -1.0]])
    none = torch.zeros_like(logits, dtype=torch.bool)
    top2 = _filter(logits, SamplingParams(temperature=1.0, top_k=2), none)
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    probs = logits.softmax(-1)[0]  # 0.64, 0.23, ...: top_p 0.8 keeps the first two
    nucleus = _filter(logits, SamplingParams(temperature=1.0, top_p=0.8), none)
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all(), probs
    seen = torch.tensor([[True, False, False, False, True]])
    pen = _filter(logits, SamplingParams(temperature=1.0, repetition_penalty=2.0), seen)
    assert pen[0, 0] == 2.0 and pen[0, 4] == -2.0 and pen[0, 1] == 3.0


def test_stream_matches_generate_and_honours_stop(model_and_tok):
    model, tok = model_and_tok
    p = SamplingParams(max_tokens=40, temperature=1.0, seed=3)
    whole = generate(model, tok, "a", p)[0]
    assert "".join(stream(model, tok, "a", p)) == whole
    stop = whole[10:12]
    p_stop = SamplingParams(max_tokens=40, temperature=1.0, seed=3, stop=[stop])
    streamed = "".join(stream(model, tok, "a", p_stop))
    assert streamed == whole[: whole.find(stop)]
    assert generate(model, tok, "a", p_stop)[0] == streamed


def test_stream_never_splits_a_character():
    torch.manual_seed(0)
    tok = BPETokenizer.train(["日本語のテキスト ✓ 🙂\n" * 30], vocab_size=270)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    for seed in range(5):
        p = SamplingParams(max_tokens=40, temperature=1.0, seed=seed)
        pieces = list(stream(model, tok, "日本", p))
        # A piece sent early with half a character would show as U+FFFD and differ from the end result.
        assert "".join(pieces) == generate(model, tok, "日本", p)[0]
        assert len(pieces) > 1


def test_bad_parameters_are_refused():
    for bad in (dict(top_p=0.0), dict(top_k=0), dict(temperature=-1), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_a_chat_reply_leaves_out_the_templates_space_however_the_pieces_fall():
    assert list(chat_reply([" ", "", " Hi", " there", " "])) == ["Hi", " there", " "]
    assert list(chat_reply([" ", " "])) == []
    assert list(chat_reply(["No space", " kept"])) == ["No space", " kept"]
