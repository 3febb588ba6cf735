import pytest
import torch

from hived.config import ConfigError, ModelConfig
from hived.model import GPT, KVCache

VARIANTS = [
    {},
    dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False),
    dict(qk_norm=True),
    dict(window=5),
    dict(parallel=True),
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


def test_sliding_window_attention_never_looks_past_its_window():
    """One layer, window 4: position i sees i-3 .. i. A token 4 back changes nothing there, one
    3 back does; with two layers the reach is two windows (i-6), never more."""
    torch.manual_seed(0)
    for layers, reach in ((1, 3), (2, 6)):
        model = GPT(small(n_layer=layers, window=4)).eval()
        x = torch.randint(0, 50, (1, 16))
        base, _ = model(x, x)
        for back in (reach, reach + 1):
            y = x.clone()
            y[0, 15 - back] = (y[0, 15 - back] + 1) % 50
            logits, _ = model(y, y)
            assert torch.allclose(base[0, 15], logits[0, 15], atol=1e-6) == (back > reach), (layers, back)


def test_the_parallel_block_adds_attention_and_mlp_of_one_norm():
    torch.manual_seed(0)
    model = GPT(small(parallel=True)).eval()
    block = model.blocks[0]
    assert block.norm2 is None and not any(".norm2." in k for k in model.state_dict())
    x = torch.randn(2, 8, 32)
    rope = (model.rope_cos[:8], model.rope_sin[:8])
    h = block.norm1(x)
    assert torch.allclose(block(x, rope), x + block.attn(h, rope, None, 0) + block.mlp(h), atol=1e-6)


def test_z_loss_and_label_smoothing_are_the_losses_they_name():
    torch.manual_seed(0)
    model = GPT(small()).eval()
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    logits, plain = model(x, y)
    flat = logits.view(-1, 50)
    _, z = model(x, y, z_loss=1e-2)
    assert torch.allclose(z, plain + 1e-2 * torch.logsumexp(flat, -1).pow(2).mean())
    _, smooth = model(x, y, label_smoothing=0.1)
    assert torch.allclose(smooth, torch.nn.functional.cross_entropy(flat, y.view(-1), label_smoothing=0.1))
    assert smooth.item() != plain.item()


def test_layer_drop_skips_whole_blocks_in_training_only():
    torch.manual_seed(0)
    model = GPT(small(n_layer=4))
    model.layer_drop = 0.5
    runs = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: runs.append(1))
    x = torch.randint(0, 50, (2, 16))
    for _ in range(50):
        model(x, x)
    assert 60 < len(runs) < 140  # half of 200 block runs, give or take
    runs.clear()
    model.eval()
    model(x, x)
    assert len(runs) == 4
