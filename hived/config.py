"""Configuration: model shape, training options, presets and run.toml files.

Everything a run needs is a plain dataclass, so it can be saved inside a checkpoint as a dict,
sent to a peer, and rebuilt exactly. Precedence, lowest first: dataclass defaults, the preset's
file, the user's ``--config`` file, command-line flags.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration the user can fix: the message says how."""


@dataclass
class ModelConfig:
    """The shape of a GPT. Defaults were chosen by measurement: see docs/benchmarks.md."""

    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    pos: str = "rope"  # rope | learned
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    mlp: str = "swiglu"  # swiglu | gelu
    tie_embeddings: bool = True
    qk_norm: bool = False
    rope_base: float = 10000.0
    window: int = 0  # sliding-window attention: each position sees itself and window-1 before (0: all)
    parallel: bool = False  # attention and MLP side by side on one norm (GPT-J, PaLM)

    def __post_init__(self) -> None:
        _check_choice("pos", self.pos, ("rope", "learned"))
        _check_choice("norm", self.norm, ("rmsnorm", "layernorm"))
        _check_choice("mlp", self.mlp, ("swiglu", "gelu"))
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError("rope needs an even head size: change n_embd or n_head, or use pos = 'learned'")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.window < 0:
            raise ConfigError("window must be 0 (attention over the whole context) or a number of positions")


@dataclass
class TokenizerConfig:
    """Which tokenizer a run builds when it is not given a tokenizer file."""

    kind: str = "char"  # char | bpe | path to a tokenizer.json
    vocab_size: int = 4096  # BPE only: char-level vocabularies come from the corpus
    min_frequency: int = 2


@dataclass
class TrainConfig:
    """Every option of ``hived train``; the hive and cluster commands reuse these names."""

    preset: str = "1m"
    data: list[str] = field(default_factory=list)
    tokenizer: str = "char"
    vocab_size: int = 4096
    min_frequency: int = 2
    val_fraction: float = 0.1
    val_data: list[str] = field(default_factory=list)
    steps: int = 2000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.0
    lr_schedule: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 50
    decay_fraction: float = 0.3
    optimizer: str = "adamw"  # adamw | muon (hidden matrices; AdamW for the rest)
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    layer_drop: float = 0.0
    curriculum_fraction: float = 0.0
    eval_interval: int = 250
    eval_tokens: int = 1 << 20
    sample_interval: int = 500
    sample_tokens: int = 200
    checkpoint_interval: int = 500
    log_interval: int = 10
    out: str = "runs/default"
    resume: bool = False
    device: str = "auto"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    low_vram: bool = False
    compile: bool = False
    seed: int = 1337
    cache_dir: str = ""

    def __post_init__(self) -> None:
        _check_choice("lr_schedule", self.lr_schedule, ("wsd", "cosine", "constant"))
        _check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        for name in ("steps", "batch_size", "grad_accum", "eval_interval", "sample_interval",
                     "checkpoint_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("--val-fraction must be between 0 and 1")
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.val_data, str):
            self.val_data = [self.val_data]
        for name in ("ema_decay", "label_smoothing", "layer_drop", "curriculum_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 0 and below 1")
        if self.z_loss < 0:
            raise ConfigError("--z-loss must not be negative")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not one of {', '.join(choices)}")


def _normalise(table: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("-", "_"): v for k, v in table.items()}


def build(cls: type, values: dict[str, Any], source: str):
    """Make dataclass ``cls`` from ``values``, naming the source and the valid keys on a typo."""
    values = _normalise(values)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown option(s) {', '.join(unknown)}; valid ones are: {', '.join(sorted(names))}"
        )
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in values.items():
        _check_type(name, types[name], value, source)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list[str]": (list, str)}


def of_type(annotation: str, value: Any) -> bool:
    """Whether ``value`` is of the plain type ``annotation`` names (int, float, str, bool,
    list[str]; an int is a float, a bool is no number); True for any other annotation."""
    allowed = _TYPES.get(annotation)
    if allowed is None:
        return True
    if annotation == "list[str]" and isinstance(value, list):
        return all(isinstance(v, str) for v in value)
    return isinstance(value, allowed) and (annotation == "bool" or not isinstance(value, bool))


def _check_type(name: str, annotation: str, value: Any, source: str) -> None:
    """Dataclasses do not check their fields, and a value can come from a TOML file, a
    checkpoint or a coordinator's message: ``lr = "3e-3"`` must fail here, naming ``lr``."""
    if not of_type(annotation, value):
        raise ConfigError(f"{source}: {name} must be of type {annotation}, not {type(value).__name__} {value!r}")


def shipped(folder: str) -> Path:
    """A top-level folder shipped with hived (``configs``, ``web``): the checkout's when run from
    source, else the copy inside the wheel."""
    checkout = Path(__file__).resolve().parent.parent / folder
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("hived") / "_data" / folder))


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def preset_names() -> list[str]:
    names = [p.stem for p in (shipped("configs") / "models").glob("*.toml")]
    return sorted(names, key=_size_key)


def _size_key(name: str) -> tuple[float, str]:
    try:
        return (float(name.rstrip("m")), name)
    except ValueError:
        return (float("inf"), name)


def load_preset(name: str) -> dict[str, Any]:
    """A preset's tables: ``model`` (shape), and optionally ``tokenizer`` and ``train``."""
    path = shipped("configs") / "models" / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return read_toml(path)


@dataclass
class RunConfig:
    """The resolved configuration of one training run."""

    train: TrainConfig
    model: dict[str, Any]  # overrides for ModelConfig; vocab_size is filled in from the tokenizer


def resolve(flags: dict[str, Any], model_table: dict[str, Any] | None = None,
            resumed: dict[str, Any] | None = None) -> RunConfig:
    """Merge preset (or, on resume, the checkpoint's saved config), the options given and a
    ``[model]`` table (from a ``--config`` file: ``hived.settings`` has already merged its other
    keys into ``flags``).

    A flag whose value is ``None`` was not given. On resume the model's shape comes from the
    checkpoint and cannot be changed; training options (steps, lr, ...) can.
    """
    model_table = _normalise(model_table or {})
    given = {k: v for k, v in _normalise(flags).items() if v is not None}
    if resumed is not None:
        merged = dict(resumed["train_config"])
        if "curriculum_steps" in merged:  # saved before the curriculum became a share of the steps
            merged["curriculum_fraction"] = merged.pop("curriculum_steps") / merged.get("steps", TrainConfig.steps)
        preset_name = merged["preset"]
        if given.get("preset") not in (None, preset_name) or model_table:
            raise ConfigError(
                f"this run was trained with preset {preset_name}; a resumed run keeps its model, "
                "so drop --preset/[model], or start a new run in another --out"
            )
        model = dict(resumed["model_config"])
        saved_optimizer = merged.get("optimizer", "adamw")
        if given.get("optimizer") not in (None, saved_optimizer):
            raise ConfigError(f"this run was trained with --optimizer {saved_optimizer}, whose state a "
                              f"resumed run continues; drop --optimizer, or start a new run in another --out")
    else:
        preset_name = given.get("preset") or TrainConfig.preset
        preset = load_preset(preset_name)
        merged = dict(preset.get("train", {}))
        tok = preset.get("tokenizer", {})
        if "kind" in tok:
            merged["tokenizer"] = tok["kind"]
        if "vocab_size" in tok:
            merged["vocab_size"] = tok["vocab_size"]
        model = {**preset.get("model", {}), **model_table}
        build(ModelConfig, model, f"preset {preset_name} with [model]" if model_table else f"preset {preset_name}")
    merged.update(given)
    merged["preset"] = preset_name
    return RunConfig(train=build(TrainConfig, merged, "options"), model=model)
