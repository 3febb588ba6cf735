import pytest
import torch

from hived.config import ConfigError, ModelConfig
from hived.model import GPT, KVCache

VARIANTS = [
    {},
    dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False),
    dict(qk_norm=True),
]


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32), **kw})


@pytest.mark.parametrize("kw", VARIANTS)
def test_causal_and_loss(kw):
    torch.manual_seed(0)
    model = GPT(small(**kw)).eval()
    x = torch.randint(0, 50, (2, 16))
    targets = torch.randint(0, 50, (2, 16))
    logits, loss = model(x, targets)
    assert logits.shape == (2, 16, 50)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.2  # near-uniform at init
    # Changing a later token must not change earlier positions' outputs.
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 50
    logits2, _ = model(y, y)
    assert torch.allclose(logits[:, :10], logits2[:, :10], atol=1e-5)
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:], atol=1e-5)


@pytest.mark.parametrize("kw", VARIANTS)
def test_kv_cache_matches_full_forward(kw):
    torch.manual_seed(0)
    cfg = small(**kw)
    model = GPT(cfg).eval()
    x = torch.randint(0, 50, (3, 12))
    full, _ = model(x, x)
    cache = KVCache(cfg, 3, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        first, _ = model(x[:, :5], cache=cache)
        assert torch.allclose(first[:, -1], full[:, 4], atol=1e-5)
        for t in range(5, 12):
            step, _ = model(x[:, t:t + 1], cache=cache)
            assert torch.allclose(step[:, -1], full[:, t], atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_parameter_count_is_the_real_one():
    cfg = small(mlp="gelu", pos="learned")
    model = GPT(cfg)
    d, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size
    per_block = 4 * d * d + 8 * d * d + 2 * d  # attention, MLP, two RMSNorm gains
    assert model.num_params() == L * per_block + V * d + T * d + d  # tied head counted once
    untied = GPT(small(mlp="gelu", pos="learned", tie_embeddings=False))
    assert untied.num_params() == model.num_params() + V * d


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = GPT(small())
    b = GPT(small())
    b.load_state_dict(a.state_dict())
    b.grad_checkpointing = True
    x = torch.randint(0, 50, (2, 16))
    for m in (a, b):
        m(x, x)[1].backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_bad_shapes_are_refused_with_a_reason():
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(n_embd=100, n_head=3)
    with pytest.raises(ConfigError, match="not one of"):
        ModelConfig(norm="batchnorm")


def test_rmsnorm_matches_torch_and_its_gradient_is_right():
    from hived.model import RMSNorm

    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    ours = RMSNorm(16).double()
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16))
    ref = torch.nn.RMSNorm(16, eps=1e-6).double()
    ref.weight = ours.weight
    assert torch.allclose(ours(x), ref(x), atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, w: ours.__class__.forward(ours, a), (x, ours.weight))
    g = torch.randn_like(x)
    ours(x).backward(g)
    ours_grads = x.grad.clone(), ours.weight.grad.clone()
    x.grad = ours.weight.grad = None
    ref(x).backward(g)
    assert torch.allclose(ours_grads[0], x.grad) and torch.allclose(ours_grads[1], ours.weight.grad)
