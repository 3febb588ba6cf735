"""Which published architecture a hived model is, and where each of its tensors goes there.

A hived model is one of three families that `transformers` (and llama.cpp) already implement:
RoPE ("rotate half"), RMSNorm and SwiGLU are Llama, the same with per-head q/k norms is Qwen3,
and learned positions, LayerNorm and GELU are GPT-2. One list of ``Slot`` s per family says where
every tensor goes, and serves both directions: export reads hived's tensors into the family's
names, and loading an export back reads them out again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError, ModelConfig
from ..model import swiglu_hidden

RMS_EPS, LAYERNORM_EPS = 1e-6, 1e-5  # hived's RMSNorm and torch's LayerNorm


@dataclass(frozen=True)
class Slot:
    """One tensor of the family: ``part`` i of n of hived's ``source`` along its first dimension,
    transposed where the family stores it so (GPT-2's Conv1D); with ``source`` None, zeros of
    ``zeros`` (a family that always has a bias, for a model trained without)."""

    name: str
    source: str | None
    part: tuple[int, int] = (0, 1)
    transpose: bool = False
    zeros: tuple[int, ...] = ()


@dataclass(frozen=True)
class Family:
    name: str  # the transformers class
    model_type: str
    config: dict[str, Any]
    slots: list[Slot]


def family(cfg: ModelConfig) -> Family:
    """The family ``cfg`` belongs to, or a ConfigError that says which option to change."""
    if cfg.window or cfg.parallel:
        raise ConfigError("this model maps to no Hugging Face architecture: export needs window = 0 and "
                          "parallel = false (under [model]); a model trained with them is served by hived itself")
    if cfg.pos == "rope":
        wrong = [(k, v) for k, v in (("norm", "rmsnorm"), ("mlp", "swiglu")) if getattr(cfg, k) != v]
        if wrong:
            raise ConfigError(_refusal(wrong, 'Llama (pos = "rope")') + ', or train with pos = "learned", '
                              'norm = "layernorm" and mlp = "gelu" for GPT-2')
        if cfg.qk_norm and cfg.bias:
            raise ConfigError("qk_norm with bias = true maps to no Hugging Face architecture (Qwen3 has no MLP "
                              "bias): train with bias = false")
        return _qwen3(cfg) if cfg.qk_norm else _llama(cfg)
    wrong = [(k, v) for k, v in (("norm", "layernorm"), ("mlp", "gelu"), ("qk_norm", False))
             if getattr(cfg, k) != v]
    if wrong:
        raise ConfigError(_refusal(wrong, 'GPT-2 (pos = "learned")') + ', or train with pos = "rope", '
                          'norm = "rmsnorm" and mlp = "swiglu" for Llama')
    return _gpt2(cfg)


def _refusal(wrong: list[tuple[str, Any]], target: str) -> str:
    return ("this model maps to no Hugging Face architecture: " + target + " needs "
            + " and ".join(f"{k} = {json.dumps(v)}" for k, v in wrong) + " (under [model])")


def _llama_like(cfg: ModelConfig, qk_norms: bool) -> tuple[dict[str, Any], list[Slot]]:
    head = cfg.n_embd // cfg.n_head
    config = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": swiglu_hidden(cfg.n_embd),
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head,
        "head_dim": head, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": RMS_EPS, "rope_theta": cfg.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attention_bias": cfg.bias, "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
    }
    slots = [Slot("model.embed_tokens.weight", "wte.weight"), Slot("model.norm.weight", "norm.weight")]
    for i in range(cfg.n_layer):
        at, hf = f"blocks.{i}.", f"model.layers.{i}."
        slots += [Slot(hf + "input_layernorm.weight", at + "norm1.weight"),
                  Slot(hf + "post_attention_layernorm.weight", at + "norm2.weight")]
        kinds = ("weight", "bias") if cfg.bias else ("weight",)
        for kind in kinds:
            slots += [Slot(f"{hf}self_attn.{p}_proj.{kind}", f"{at}attn.qkv.{kind}", (j, 3))
                      for j, p in enumerate("qkv")]
            slots += [Slot(f"{hf}self_attn.o_proj.{kind}", f"{at}attn.proj.{kind}"),
                      Slot(f"{hf}mlp.gate_proj.{kind}", f"{at}mlp.up.{kind}", (0, 2)),
                      Slot(f"{hf}mlp.up_proj.{kind}", f"{at}mlp.up.{kind}", (1, 2)),
                      Slot(f"{hf}mlp.down_proj.{kind}", f"{at}mlp.down.{kind}")]
        if qk_norms:
            slots += [Slot(hf + "self_attn.q_norm.weight", at + "attn.q_norm.weight"),
                      Slot(hf + "self_attn.k_norm.weight", at + "attn.k_norm.weight")]
    if not cfg.tie_embeddings:
        slots.append(Slot("lm_head.weight", "lm_head.weight"))
    return config, slots


def _llama(cfg: ModelConfig) -> Family:
    config, slots = _llama_like(cfg, qk_norms=False)
    return Family("LlamaForCausalLM", "llama", {**config, "mlp_bias": cfg.bias}, slots)


def _qwen3(cfg: ModelConfig) -> Family:
    config, slots = _llama_like(cfg, qk_norms=True)
    return Family("Qwen3ForCausalLM", "qwen3", {**config, "use_sliding_window": False, "sliding_window": None,
                                                "max_window_layers": cfg.n_layer}, slots)


def _gpt2(cfg: ModelConfig) -> Family:
    c = cfg.n_embd
    config = {"vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": c, "n_layer": cfg.n_layer,
              "n_head": cfg.n_head, "n_inner": 4 * c, "activation_function": "gelu",
              "layer_norm_epsilon": LAYERNORM_EPS, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
              "scale_attn_weights": True, "tie_word_embeddings": cfg.tie_embeddings}

    def bias(name: str, source: str, size: int) -> Slot:
        return Slot(name, source) if cfg.bias else Slot(name, None, zeros=(size,))

    slots = [Slot("transformer.wte.weight", "wte.weight"), Slot("transformer.wpe.weight", "wpe.weight"),
             Slot("transformer.ln_f.weight", "norm.weight"), bias("transformer.ln_f.bias", "norm.bias", c)]
    for i in range(cfg.n_layer):
        at, hf = f"blocks.{i}.", f"transformer.h.{i}."
        for mine, theirs, width in (("norm1", "ln_1", c), ("norm2", "ln_2", c)):
            slots += [Slot(f"{hf}{theirs}.weight", f"{at}{mine}.weight"),
                      bias(f"{hf}{theirs}.bias", f"{at}{mine}.bias", width)]
        for mine, theirs, width in (("attn.qkv", "attn.c_attn", 3 * c), ("attn.proj", "attn.c_proj", c),
                                    ("mlp.up", "mlp.c_fc", 4 * c), ("mlp.down", "mlp.c_proj", c)):
            slots += [Slot(f"{hf}{theirs}.weight", f"{at}{mine}.weight", transpose=True),
                      bias(f"{hf}{theirs}.bias", f"{at}{mine}.bias", width)]
    if not cfg.tie_embeddings:
        slots.append(Slot("lm_head.weight", "lm_head.weight"))
    return Family("GPT2LMHeadModel", "gpt2", config, slots)


def to_family(fam: Family, state: dict[str, torch.Tensor], transpose: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """hived's tensors under the family's names (each a new contiguous tensor); ``transpose``
    False keeps every matrix as torch lays it out (llama.cpp's GPT-2 wants them so)."""
    for slot in fam.slots:
        if slot.source is None:
            yield slot.name, torch.zeros(slot.zeros, dtype=state["wte.weight"].dtype)
            continue
        t = state[slot.source]
        i, n = slot.part
        t = t.chunk(n, dim=0)[i] if n > 1 else t
        yield slot.name, (t.T if slot.transpose and transpose else t).contiguous().clone()


def from_family(fam: Family, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``to_family``: hived's state dict (lm_head tied or not, as the config says)."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for slot in fam.slots:
        if slot.source is None:
            continue
        if slot.name not in tensors:
            raise KeyError(slot.name)
        t = tensors[slot.name]
        parts.setdefault(slot.source, []).append((slot.part[0], t.T if slot.transpose else t))
    state = {name: torch.cat([t for _, t in sorted(ts, key=lambda p: p[0])]).contiguous() if len(ts) > 1
             else ts[0][1].contiguous() for name, ts in parts.items()}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["wte.weight"]
    return state

