"""One GGUF file for llama.cpp (and so Ollama and LM Studio), written with the llama.cpp project's
own `gguf` package: its names for every tensor (``get_tensor_name_map``), its quantisation, and
the tokenizer metadata its loader reads.

Both of hived's tokenizers go in as llama.cpp's byte-level BPE (``gpt2``) type. A BPE tokenizer
is one already; the char tokenizer's tokens are its characters' bytes in the same byte-to-text
alphabet, with merges that put the bytes of each multi-byte character back together.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from ..config import ModelConfig
from ..model import swiglu_hidden
from ..tokenizer import CharTokenizer, Tokenizer, byte_level_chars
from . import readable
from .architectures import LAYERNORM_EPS, RMS_EPS, family, to_family

FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}  # for QUANTS
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3, "gpt2": gguf.MODEL_ARCH.GPT2}


def write(out: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], tok: Tokenizer, quant: str = "f16") -> str:
    """Write ``out`` (through a temporary file, so never half-written); the architecture's name."""
    fam = family(cfg)
    arch = ARCHS[fam.model_type]
    names = gguf.get_tensor_name_map(arch, cfg.n_layer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        _metadata(writer, cfg, fam.model_type, quant)
        _tokenizer(writer, tok)
        state = {k: v.detach().float().cpu() for k, v in state.items()}
        # llama.cpp keeps GPT-2's matrices as torch does, not transposed as transformers' Conv1D
        for name, tensor in to_family(fam, state, transpose=False):
            if fam.model_type == "llama" and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
                tensor = _interleave(tensor, cfg.n_head)
            _add(writer, names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.numpy(), quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        readable(Path(tmp))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return gguf.MODEL_ARCH_NAMES[arch]


def _metadata(writer: gguf.GGUFWriter, cfg: ModelConfig, kind: str, quant: str) -> None:
    head = cfg.n_embd // cfg.n_head
    writer.add_name("hived")
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_file_type(FILE_TYPES[quant])
    if kind == "gpt2":
        writer.add_feed_forward_length(4 * cfg.n_embd)
        writer.add_layer_norm_eps(LAYERNORM_EPS)
        return
    writer.add_feed_forward_length(swiglu_hidden(cfg.n_embd))
    writer.add_head_count_kv(cfg.n_head)
    writer.add_key_length(head)
    writer.add_value_length(head)
    writer.add_rope_dimension_count(head)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(RMS_EPS)


def _interleave(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Llama rotates adjacent pairs, transformers' (and hived's) the two halves of
    each head: the rows of q and k are reordered to match (as llama.cpp's converter does)."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _add(writer: gguf.GGUFWriter, name: str, data: np.ndarray, quant: str) -> None:
    if data.ndim == 1:  # norms and biases stay float32, as llama.cpp's converter keeps them
        writer.add_tensor(name, data.astype(np.float32))
    elif quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def _tokenizer(writer: gguf.GGUFWriter, tok: Tokenizer) -> None:
    if isinstance(tok, CharTokenizer):
        alphabet = byte_level_chars()
        chars = ["\ufffd", *tok.chars]  # id 0 is the unknown token
        tokens = ["".join(alphabet[b] for b in c.encode("utf-8")) for c in chars]
        merges = list(dict.fromkeys(f"{token[:i]} {token[i]}" for token in tokens for i in range(1, len(token))))
        types = [gguf.TokenType.UNKNOWN, *[gguf.TokenType.NORMAL] * len(tok.chars)]
        end = 0
        writer.add_unk_token_id(0)
    else:
        data = json.loads(tok.to_json())
        vocab = data["model"]["vocab"]
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
        types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
        end = tok.eot_id if tok.eot_id is not None else 0
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(end)
    writer.add_eos_token_id(end)
    writer.add_add_bos_token(False)
