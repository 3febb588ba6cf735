"""Loading a trained model for generation, chat and serving: a checkpoint, or an exported folder."""

from __future__ import annotations

from pathlib import Path

from . import checkpoint
from .config import ModelConfig, build
from .device import pick_device
from .model import GPT
from .tokenizer import Tokenizer, from_json


def load_state(path: str | Path) -> dict:
    """A checkpoint file, or a folder `hived export --format hf` wrote, as a checkpoint's contents."""
    from .export import hf

    return hf.read_state(path) if hf.is_folder(path) else checkpoint.load(path)


def load_model(path: str | Path, device: str = "auto") -> tuple[GPT, Tokenizer]:
    return model_from_state(load_state(path), path, device)


def model_from_state(state: dict, path: str | Path, device: str = "auto") -> tuple[GPT, Tokenizer]:
    """The model and tokenizer of an already loaded checkpoint (``path`` names it in errors)."""
    cfg = build(ModelConfig, state["model_config"], f"{path}")
    tok = from_json(state["tokenizer"])
    if tok.vocab_size != cfg.vocab_size:
        raise checkpoint.CheckpointError(
            f"{path}: its tokenizer has {tok.vocab_size} tokens but its model {cfg.vocab_size}; "
            "the file was not written by hived or was altered"
        )
    model = GPT(cfg)
    try:
        model.load_state_dict(checkpoint.served_weights(state))
    except RuntimeError as exc:
        raise checkpoint.CheckpointError(f"{path}: weights do not match its model config ({exc})"[:500]) from None
    return model.to(pick_device(device)).eval(), tok
