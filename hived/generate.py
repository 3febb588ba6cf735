"""Sampling text from a trained GPT, with a KV cache.

Used by the CLI, by the trainer's periodic samples and (later) by the chat endpoint, so the
sampling rules live here once: temperature, top-k, top-p, repetition penalty, seed, stop strings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .model import GPT, KVCache
from .tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_tokens: int = 200
    temperature: float = 0.8  # 0 means greedy
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be at least 0")
        if self.temperature < 0:
            raise ValueError("temperature must be at least 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be at least 1")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be positive")


def _filter(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor) -> torch.Tensor:
    if p.repetition_penalty != 1.0:
        # CTRL-style: make every token already in the text less likely, whatever its sign.
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if p.temperature == 0:
        return logits
    logits = logits / p.temperature
    if p.top_k is not None and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= p.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate_ids(model: GPT, prompt_ids: list[int], params: SamplingParams,
                 num_samples: int = 1) -> Iterator[torch.Tensor]:
    """Yield the next token of each sample, one step at a time, until ``max_tokens``.

    When the context window is full, the last three quarters of it are re-read into a fresh
    cache: positions never exceed what the model was trained on, and the cost is amortised.
    """
    cfg = model.cfg
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    seq = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)
    seen = torch.zeros(num_samples, cfg.vocab_size, dtype=torch.bool, device=device)
    seen[:, seq[0]] = True
    keep = max(1, cfg.block_size * 3 // 4)
    cache: KVCache | None = None
    for _ in range(params.max_tokens):
        if cache is None or cache.pos >= cfg.block_size:
            context = seq[:, -(keep if cache is not None else cfg.block_size):]
            cache = KVCache(cfg, num_samples, device, dtype)
            logits, _ = model(context, cache=cache)
        else:
            logits, _ = model(seq[:, -1:], cache=cache)
        logits = _filter(logits[:, -1, :].float(), params, seen)
        if params.temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        seen[torch.arange(num_samples, device=device), nxt] = True
        yield nxt


@dataclass
class Usage:
    """What one generation consumed and why it ended (for the chat API's ``usage``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"  # length | stop


def _prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt).tolist() if prompt else []
    return ids or tokenizer.start_ids()


def stream(model: GPT, tokenizer: Tokenizer, prompt: str, params: SamplingParams,
           usage: Usage | None = None) -> Iterator[str]:
    """Yield one sample's text as it grows, stopping at (and leaving out) any stop string.

    Text is re-decoded from all new tokens, and held back while it ends in an incomplete UTF-8
    sequence (byte-level BPE can split a character across tokens) or in a possible stop prefix.
    """
    usage = usage or Usage()
    prompt_ids = _prompt_ids(tokenizer, prompt)
    usage.prompt_tokens = len(prompt_ids)
    ids: list[int] = []
    sent = 0
    for nxt in generate_ids(model, prompt_ids, params):
        ids.append(int(nxt[0]))
        usage.completion_tokens = len(ids)
        text = tokenizer.decode(ids)
        cut = min((i for i in (text.find(s, sent) for s in params.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            usage.finish_reason = "stop"
            if cut > sent:
                yield text[sent:cut]
            return
        safe = len(text) - _held_back(text, params.stop)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    text = tokenizer.decode(ids)
    if len(text) > sent:
        yield text[sent:]


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still turn into a stop string or a whole character."""
    if text.endswith("\ufffd"):
        return 1
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def generate(model: GPT, tokenizer: Tokenizer, prompt: str, params: SamplingParams,
             num_samples: int = 1) -> list[str]:
    """Whole samples (prompt excluded), generated as one batch."""
    steps = list(generate_ids(model, _prompt_ids(tokenizer, prompt), params, num_samples))
    if not steps:
        return [""] * num_samples
    out = torch.stack(steps, dim=1).tolist()
    texts = [tokenizer.decode(ids) for ids in out]
    for stop in params.stop:
        texts = [t.split(stop, 1)[0] if stop else t for t in texts]
    return texts
