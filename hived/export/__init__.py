"""`hived export`: a trained model in the formats other tools load, Hugging Face (``hf``) and
llama.cpp's GGUF (``gguf``), and an exported folder read back."""

from __future__ import annotations

import os
from pathlib import Path

from .. import checkpoint
from ..config import ModelConfig, build
from ..tokenizer import from_json

FORMATS = ("hf", "gguf")
QUANTS = ("f16", "q8_0")  # GGUF weight types


def export(path: str | Path, fmt: str, out: str | Path, quant: str = "f16") -> str:
    """Export checkpoint ``path`` to ``out``; says what was written."""
    state = checkpoint.load(path)
    cfg = build(ModelConfig, state["model_config"], str(path))
    tok = from_json(state["tokenizer"])
    if fmt == "hf":
        from . import hf

        name = hf.write(Path(out), cfg, checkpoint.served_weights(state), tok, state.get("step"))
        return f"{out}: {name}, loads with transformers' AutoModelForCausalLM and AutoTokenizer"
    from . import gguf

    name = gguf.write(Path(out), cfg, checkpoint.served_weights(state), tok, quant)
    return f"{out}: GGUF ({name}, {quant}), loads with llama.cpp"


def readable(path: Path) -> None:
    """Give a written file or folder the mode the umask allows, as a plain write would: the
    temporary ones it was written as are private, and llama.cpp or Ollama may run as another user."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
