"""A Hugging Face model folder: ``config.json``, ``model.safetensors``, the tokenizer files and
``generation_config.json``, which `AutoModelForCausalLM` and `AutoTokenizer` load as they are;
and the same folder read back into what a hived checkpoint holds (`hived serve`, `hived chat`).

``config.json`` also keeps hived's own model config (``hived_model_config``, which
`transformers` ignores), so a folder comes back as exactly the model that went out.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError
from ..config import ModelConfig, build
from ..generate import SamplingParams
from ..tokenizer import Tokenizer
from . import readable
from . import tokenizer as tokenizers
from .architectures import family, from_family, to_family

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json")


def write(out: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], tok: Tokenizer, step: int | None = None) -> str:
    """Write the folder ``out`` (replaced whole, never left half-written); the family's name."""
    fam = family(cfg)
    eos = tok.eot_id
    config = {"architectures": [fam.name], "model_type": fam.model_type, **fam.config, "torch_dtype": "float32",
              "bos_token_id": eos, "eos_token_id": eos, "hived_model_config": dataclasses.asdict(cfg),
              "hived_step": step}
    defaults = SamplingParams()
    generation = {"bos_token_id": eos, "eos_token_id": eos, "do_sample": defaults.temperature > 0,
                  "temperature": defaults.temperature, "top_p": defaults.top_p,
                  "max_new_tokens": defaults.max_tokens}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
                        "clean_up_tokenization_spaces": False, **tokenizers.special_tokens(tok)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(dict(to_family(fam, {k: v.detach().float().cpu() for k, v in state.items()})),
                  tmp / "model.safetensors", metadata={"format": "pt"})
        for name, data in (("config.json", config), ("generation_config.json", generation),
                           ("tokenizer_config.json", tokenizer_config)):
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        (tmp / "tokenizer.json").write_text(tokenizers.to_hf(tok), encoding="utf-8")
        readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return fam.name


def is_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_state(folder: str | Path) -> dict[str, Any]:
    """An exported folder as a checkpoint's contents (model, model_config, tokenizer)."""
    folder = Path(folder)
    missing = [name for name in FILES[:3] if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not an exported model: it has no {', '.join(missing)}")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tok = tokenizers.from_hf((folder / "tokenizer.json").read_text(encoding="utf-8"))
        tensors = load_file(folder / "model.safetensors")
    except Exception as exc:  # json, safetensors and tokenizers each raise their own
        raise CheckpointError(f"{folder}: cannot read the export ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(config.get("hived_model_config"), dict):
        raise CheckpointError(f"{folder} was not exported by hived (its config.json has no hived_model_config); "
                              "hived loads the models it exported")
    cfg = build(ModelConfig, config["hived_model_config"], f"{folder}/config.json")
    try:
        state = from_family(family(cfg), tensors)
    except KeyError as exc:
        raise CheckpointError(f"{folder}/model.safetensors has no tensor {exc}; export the model again") from None
    return {"model": state, "model_config": dataclasses.asdict(cfg), "tokenizer": tok.to_json(),
            "step": config.get("hived_step")}
