"""One GPT module: a decoder-only transformer with a KV cache for generation.

Each architectural choice is an option of ModelConfig so the defaults can be picked (and
re-checked) by measurement rather than folklore; bench/shakespeare.py compares them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-derived backward: on CPU, torch.nn.RMSNorm (autograd through its
    composite ops) took 1.6x as long (bench/norms.py); gradcheck in the tests checks the math."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xhat = x * r
        ctx.save_for_backward(xhat, r, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, grad):
        xhat, r, weight = ctx.saved_tensors
        gw = grad * weight
        dx = r * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        dw = (grad * xhat).reshape(-1, grad.size(-1)).sum(0)
        return dx, dw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if not torch.is_grad_enabled():  # generation: torch's fused kernel, without the autograd Function's cost
            return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)
        return _RMSNormFn.apply(x, self.weight.to(x.dtype), self.eps)


def _norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim)
    return nn.LayerNorm(dim, bias=cfg.bias)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, "rotate half" form (x: ..., T, D; cos: T, D, each angle's cosine
    twice; sin: T, D, its sine negated then plain). Three passes (a multiply, one swap of the
    halves, a fused multiply-add) where the textbook form takes seven."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin)


class KVCache:
    """Keys and values of past positions, so each new token costs one position, not the prefix."""

    def __init__(self, cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.n_layer, batch, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        head = cfg.n_embd // cfg.n_head
        self.q_norm = RMSNorm(head) if cfg.qk_norm else None
        self.k_norm = RMSNorm(head) if cfg.qk_norm else None

    def forward(self, x, rope, cache: KVCache | None, layer: int, mask: torch.Tensor | None = None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        qk, v = qkv[:2], qkv[2]  # queries and keys are normed and rotated together: half the ops
        if self.q_norm is not None:
            qk = torch.stack((self.q_norm(qk[0]), self.k_norm(qk[1])))
        if rope is not None:
            qk = _rotate(qk, *rope)
        q, k = qk[0], qk[1]
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # A query block that starts at position 0 is causal; a single new token sees the whole cache.
        # A sliding window needs its own mask (which costs the fused causal kernel).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def swiglu_hidden(n_embd: int) -> int:
    """8/3 d keeps the parameter count of a 4d GELU MLP; rounded up for friendlier matmuls."""
    return 32 * math.ceil(8 * n_embd / 3 / 32)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            hidden = swiglu_hidden(cfg.n_embd)
            self.up = nn.Linear(cfg.n_embd, 2 * hidden, bias=cfg.bias)
        else:
            hidden = 4 * cfg.n_embd
            self.up = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        h = self.up(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        return self.down(h)


class Block(nn.Module):
    """Pre-norm residual block; ``parallel`` (GPT-J, PaLM) feeds one norm's output to attention
    and MLP side by side, one residual add instead of two, one norm fewer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.parallel = cfg.parallel
        self.norm1 = _norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg)
        self.norm2 = None if cfg.parallel else _norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0, mask=None):
        h = self.norm1(x)
        if self.parallel:
            return x + self.drop(self.attn(h, rope, cache, layer, mask) + self.mlp(h))
        x = x + self.drop(self.attn(h, rope, cache, layer, mask))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = _norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.grad_checkpointing = False
        self.layer_drop = 0.0  # training only: the chance each block is skipped for a batch (LayerDrop)
        if cfg.pos == "rope":
            head = cfg.n_embd // cfg.n_head
            freqs = 1.0 / cfg.rope_base ** (torch.arange(0, head, 2).float() / head)
            angles = torch.outer(torch.arange(cfg.block_size).float(), freqs)
            self.register_buffer("rope_cos", torch.cat((angles.cos(), angles.cos()), -1), persistent=False)
            self.register_buffer("rope_sin", torch.cat((-angles.sin(), angles.sin()), -1), persistent=False)
        self.apply(self._init_weights)
        # Scale the residual projections so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def window_mask(self, start: int, T: int, device: torch.device) -> torch.Tensor | None:
        """Which keys each of queries ``start .. start+T-1`` may see: itself and the ``window - 1``
        before it (None without a window: plain causal attention)."""
        if not self.cfg.window:
            return None
        q = torch.arange(start, start + T, device=device)[:, None]
        k = torch.arange(start + T, device=device)[None, :]
        return (k <= q) & (q - k < self.cfg.window)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0):
        """Logits for every position when ``targets`` are given (with the loss), else the last one's.
        The loss is plain cross-entropy unless training asks for label smoothing or z-loss (a
        penalty on log Z, the log of the softmax's normaliser, that keeps logits from drifting)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.cfg.block_size}")
        if start > 0 and T > 1:
            raise ValueError("a filled KV cache is extended one token at a time")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T]) if self.wpe is None else None
        x = self.drop(x)
        mask = self.window_mask(start, T, idx.device)
        skip = (torch.rand(len(self.blocks)) < self.layer_drop).tolist() if self.training and self.layer_drop else None
        for i, block in enumerate(self.blocks):
            if skip and skip[i]:
                continue
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, rope, None, 0, mask, use_reentrant=False)
            else:
                x = block(x, rope, cache, i, mask)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None
        logits = self.lm_head(x)
        flat = logits.view(-1, logits.size(-1)).float()
        loss = F.cross_entropy(flat, targets.reshape(-1), label_smoothing=label_smoothing)
        if z_loss:
            loss = loss + z_loss * torch.logsumexp(flat, dim=-1).pow(2).mean()
        return logits, loss
