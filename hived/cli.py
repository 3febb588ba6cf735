"""The `hived` command line."""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .checkpoint import CheckpointError
from .config import ConfigError, ModelConfig, TrainConfig, load_preset, preset_names
from .data import DataError, build_tokenizer, discover, texts
from .export import FORMATS as EXPORT_FORMATS
from .export import QUANTS
from .logs import FORMATS, configure
from .hive.coordinator.limits import HELP as LIMITS_HELP
from .hive.coordinator.limits import Limits
from .hive.compression import COMPRESSIONS
from .server import HTTP_HELP, HttpLimits
from .settings import MODEL_TABLE, config_option, from_environment
from .tokenizer import TokenizerError

if TYPE_CHECKING:
    from .openai_api import ApiLimits

USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError)

TRAIN_HELP = {
    "preset": "model size: " + ", ".join(preset_names()),
    "data": "text file or folder (its .txt/.md files); repeat for several; default: the built-in corpus",
    "tokenizer": "char, bpe, or the path of a tokenizer.json made by `hived tokenize`",
    "vocab_size": "BPE vocabulary size",
    "min_frequency": "BPE: least frequency of a merged pair",
    "val_fraction": "share of the corpus (its end) held out for validation",
    "val_data": "validation text file or folder, instead of holding out --val-fraction (repeat for several)",
    "steps": "optimizer steps in total",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate as a fraction of --lr",
    "lr_schedule": "wsd (warmup-stable-decay), cosine or constant",
    "warmup_steps": "steps of linear warmup",
    "decay_fraction": "WSD: share of the steps spent decaying",
    "optimizer": "adamw, or muon: Muon for the blocks' matrices, AdamW for embeddings and gains",
    "muon_momentum": "Muon's momentum (with --optimizer muon)",
    "weight_decay": "weight decay (matrices only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this (0: no clipping)",
    "ema_decay": "keep an exponential moving average of the weights with this decay (e.g. 0.999); it is "
                 "evaluated beside the raw weights, saved with them, and what generation and export use",
    "z_loss": "add this times log(Z)^2 to the training loss (PaLM's z-loss; e.g. 1e-4)",
    "label_smoothing": "label smoothing of the training loss (validation loss stays plain)",
    "layer_drop": "chance each block is skipped for a training batch (LayerDrop)",
    "curriculum_fraction": "train this share of the steps on short contexts first: an eighth of block_size, "
                           "doubling until the full context (0: full context throughout)",
    "eval_interval": "evaluate on the validation split every N steps (a coordinator: rounds, default 1)",
    "eval_tokens": "most validation tokens per evaluation",
    "sample_interval": "print a text sample every N steps",
    "sample_tokens": "length of those samples",
    "checkpoint_interval": "write latest.pt every N steps (a coordinator checkpoints every round)",
    "log_interval": "a progress line every N steps (when not on a terminal)",
    "out": "run folder for checkpoints, metrics and tokenizer.json",
    "resume": "continue the run in --out from its latest.pt",
    "device": "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps",
    "dtype": "auto, float32, bfloat16 or float16 (mixed precision on GPUs)",
    "low_vram": "gradient checkpointing: less memory, about 30% slower",
    "compile": "torch.compile the model (faster steps after a slow start)",
    "seed": "random seed",
    "cache_dir": "where encoded corpora are cached (default ~/.cache/hived/tokens)",
}


def train_options(fn):
    """One click option per TrainConfig field. Defaults are None ("not given") so a --config
    file and the preset can supply them; the help shows what a run with the default preset
    really uses (the preset's own value where it sets one)."""
    preset = load_preset(TrainConfig.preset).get("train", {})
    for f in reversed(dataclasses.fields(TrainConfig)):
        flag = "--" + f.name.replace("_", "-")
        default = TrainConfig.__dataclass_fields__[f.name]
        shown = default.default if default.default is not dataclasses.MISSING else None
        if f.name in preset:
            shown = f"{preset[f.name]} with preset {TrainConfig.preset}; each preset sets its own"
        help_text = TRAIN_HELP[f.name] + (f" [default: {shown}]" if shown not in (None, "", False) else "")
        if f.type == "bool":
            fn = click.option(f"{flag}/--no-{flag[2:]}", default=None, help=help_text)(fn)
        elif f.name in ("data", "val_data"):  # none given: None, as for every other option
            fn = click.option(flag, multiple=True, type=click.Path(), help=help_text,
                              callback=lambda ctx, param, value: list(value) or None)(fn)
        else:
            fn = click.option(flag, type={"int": int, "float": float}.get(f.type, str), default=None,
                              help=help_text)(fn)
    return config_option(model_table=True)(fn)


def dataclass_options(cls: type, help: dict[str, str], prefix: str = ""):
    """One option per field of ``cls`` (``--{prefix}{field}``), defaulting to the field's default;
    ``pop_dataclass`` collects them back into a ``cls``."""
    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            fn = click.option("--" + (prefix + f.name).replace("_", "-"), type={"int": int, "float": float}[f.type],
                              default=f.default, show_default=True, help=help[f.name])(fn)
        return fn
    return decorate


def pop_dataclass(cls: type, flags: dict, prefix: str = ""):
    return cls(**{f.name: flags.pop(prefix + f.name) for f in dataclasses.fields(cls)})


def _model_table() -> dict:
    """The ``[model]`` table of the command's ``--config`` file (empty without one)."""
    return click.get_current_context().meta.get(MODEL_TABLE, {})


def user_errors(fn):
    """Turn the errors a user can fix into a one-line message and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise click.ClickException(str(exc)) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="hived")
def main() -> None:
    """hived: train your own small GPT from scratch."""


def stop_on_signals() -> threading.Event:
    """Ctrl-C or SIGTERM asks the run to stop at the next step boundary (and save); a second
    Ctrl-C stops at once."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        click.echo("\nstopping after this step (Ctrl-C again to quit without saving)", err=True)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


LOG_FORMAT = click.option("--log-format", type=click.Choice(FORMATS), default="text", show_default=True,
                          help="one line per event: text, or JSON for a log pipeline")


WEB_HOST = click.option("--host", default="127.0.0.1", show_default=True,
                        help="address of the dashboard, chat and API (0.0.0.0: every interface)")
THREADS = click.option("--threads", type=click.IntRange(min=1), envvar="HIVED_THREADS",
                        help="CPU threads for torch (default: every core); where several hived processes share "
                             "a machine, give each its share [env HIVED_THREADS]")
API_KEY = click.option("--api-key-file", type=click.File("r"), envvar="HIVED_API_KEY_FILE",
                       help="require this bearer key on /v1/ (the chat API); or set HIVED_API_KEY")


def _use_threads(threads: int | None) -> None:
    """Set before any work starts. Processes whose threads outnumber the cores slow each other
    down far more than their share: torch's parallel operations wait at a barrier for threads
    that are not running (docs/benchmarks.md, "Sharing a machine: --threads")."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _api_limits(api_key_file) -> ApiLimits:
    import os

    from .openai_api import ApiLimits

    key = api_key_file.read().strip() if api_key_file else os.environ.get("HIVED_API_KEY") or None
    return ApiLimits(api_key=key)


def _open_browser(url: str) -> None:
    """Only where someone can see it: a terminal on a machine with a display."""
    import os
    import webbrowser

    if sys.stderr.isatty() and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                                or sys.platform in ("darwin", "win32")):
        webbrowser.open(url)


@from_environment
@main.command()
@WEB_HOST
@click.option("--port", type=int, default=8765, show_default=True,
              help="dashboard and chat port; a free one is taken if it is busy")
@click.option("--no-ui", is_flag=True, help="train without serving the dashboard and chat")
@THREADS
@API_KEY
@train_options
@user_errors
def train(config_file: str | None, host: str, port: int, no_ui: bool, threads: int | None, api_key_file,
          **flags) -> None:
    """Train a GPT on your text (or the built-in corpus) on this machine, with a live dashboard."""
    _use_threads(threads)
    from .local import resolve_run
    from .loop import Diverged
    from .local import train as run_training

    run, state = resolve_run(flags, _model_table())
    stop = stop_on_signals()
    listeners: tuple = ()
    ui = None
    if not no_ui:
        from .dashboard import RunState
        from .server import Background, make_app
        from .serving import ModelHost

        run_state, model_host = RunState("train"), ModelHost(Path(run.train.out).name or "hived")
        ui = Background(make_app(run_state, model_host, _api_limits(api_key_file)), host, port)
        click.echo(f"hived: {ui.notice}dashboard at {ui.url} (chat at {ui.url}chat)", err=True)
        _open_browser(ui.url)
        listeners = (run_state, model_host)
    try:
        run_training(run, state, listeners=listeners, stop=stop)
    except KeyboardInterrupt:
        sys.exit(130)
    except Diverged as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if ui is not None:
            ui.stop()
    if stop.is_set():
        sys.exit(130)


@from_environment
@main.command()
@click.option("--workers", default="1", show_default=True,
              help="Ray Train workers: N, or MIN-MAX to start once MIN fit and grow as more appear")
@click.option("--cpus-per-worker", type=float, default=1.0, show_default=True)
@click.option("--gpus-per-worker", type=float, default=0.0, show_default=True, help="0: train on CPUs")
@click.option("--storage", default="", help="a folder every node shares, or a bucket URI (s3://, gs://), "
                                            "where Ray keeps checkpoints [default: OUT/ray]")
@click.option("--max-failures", type=int, default=3, show_default=True,
              help="times Ray restarts the workers from the last checkpoint before giving up (-1: always)")
@click.option("--resize-every", type=float, default=60.0, show_default=True,
              help="with --workers MIN-MAX: seconds between Ray's checks for room to add workers")
@click.option("--address", default="", envvar="RAY_ADDRESS",
              help="a running Ray cluster (auto, or HOST:PORT) [env RAY_ADDRESS]; default: start one here")
@click.option("--join", "join_url", default="", help="train as one peer of this hive coordinator (ws:// or wss://)")
@click.option("--key-file", type=click.File("r"), help="the hive key, for --join (or HIVED_KEY)")
@click.option("--name", default="", help="how the coordinator lists this cluster, with --join")
@click.option("--max-rounds", type=int, default=0, help="with --join: leave after N rounds (0: never)")
@WEB_HOST
@click.option("--port", type=int, default=8765, show_default=True,
              help="dashboard and chat port; a free one is taken if it is busy")
@click.option("--threads", type=click.IntRange(min=1), envvar="HIVED_THREADS",
              help="torch threads in each worker [default: its CPUs]")
@API_KEY
@LOG_FORMAT
@train_options
@user_errors
def cluster(config_file: str | None, workers: str, cpus_per_worker: float, gpus_per_worker: float, storage: str,
            max_failures: int, resize_every: float, address: str, join_url: str, key_file, name: str,
            max_rounds: int, host: str, port: int, threads: int | None, api_key_file, log_format: str,
            **flags) -> None:
    """Train data-parallel on a Ray cluster (started here, or --address), with the dashboard and
    chat on this machine; or (--join) make the whole cluster one peer of a hive. Running the same
    command again continues the run from its last checkpoint."""
    import asyncio
    import os

    from .cluster.driver import ClusterDriver, plan
    from .cluster.options import ClusterError, ClusterOptions, parse_workers
    from .dashboard import RunState
    from .events import Events
    from .server import make_app, runner, start_site
    from .serving import ModelHost

    log = _logging(log_format)
    try:
        opts = ClusterOptions(parse_workers(workers), cpus_per_worker, gpus_per_worker, storage, max_failures,
                              address, join_url, key_file.read().strip() if key_file else os.environ.get("HIVED_KEY", ""),
                              name, max_rounds, threads or 0, resize_every)
    except ClusterError as exc:
        raise click.UsageError(str(exc)) from None
    the_plan = plan(flags, _model_table(), opts)
    events = Events()
    driver = ClusterDriver(the_plan, events)
    run_state = RunState("cluster", status=driver.status)
    model_host = ModelHost(the_plan.out.resolve().name or "hived")
    for listener in (run_state, model_host):
        events.subscribe(listener)

    async def serve_and_train() -> int:
        import signal

        app_runner = runner(make_app(run_state, model_host, _api_limits(api_key_file)))
        bound, notice = await start_site(app_runner, host, port)
        log.info("%sdashboard at http://%s:%d/ (chat at http://%s:%d/chat)", notice, host, bound, host, bound)
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        try:
            return await driver.run(stop)
        finally:
            await app_runner.cleanup()

    try:
        sys.exit(asyncio.run(serve_and_train()))
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="a .pt file of a run")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="hf: a Hugging Face folder (transformers); gguf: one file for llama.cpp, Ollama, LM Studio")
@click.option("--out", required=True, type=click.Path(), help="the folder (hf) or file (gguf) to write")
@click.option("--quant", type=click.Choice(QUANTS), default="f16", show_default=True,
              help="GGUF only: the weights' type (q8_0: about half the size)")
@user_errors
def export(checkpoint: str, fmt: str, out: str, quant: str) -> None:
    """Export a trained model for other tools: transformers (hf) or llama.cpp (gguf)."""
    from .export import export as write

    click.echo(write(checkpoint, fmt, out, quant))


@main.command()
@click.option("--data", multiple=True, type=click.Path(), help="text file or folder; repeat for several")
@click.option("--vocab-size", type=int, default=4096, show_default=True)
@click.option("--min-frequency", type=int, default=2, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default="tokenizer.json", show_default=True)
@user_errors
def tokenize(data: tuple[str, ...], vocab_size: int, min_frequency: int, out: str) -> None:
    """Train a byte-level BPE tokenizer and save it as tokenizer.json."""
    from .tokenizer import save

    docs = discover(data)
    tok = build_tokenizer("bpe", docs, vocab_size, min_frequency)
    save(tok, out)
    chars = tokens = 0
    for text in texts(docs):
        chars += len(text)
        tokens += len(tok.encode(text))
    click.echo(f"saved {out}: vocabulary {tok.vocab_size}, {len(docs)} file(s), "
               f"{tokens:,} tokens, {chars / max(tokens, 1):.2f} characters per token")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(),
              help="a .pt file of a run, or a folder `hived export --format hf` wrote")
@click.option("--prompt", default="", help="text to continue")
@click.option("--max-tokens", type=int, default=200, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0: greedy")
@click.option("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="nucleus sampling")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--num-samples", type=int, default=1, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--device", default="auto", show_default=True)
@user_errors
def generate(checkpoint: str, prompt: str, num_samples: int, device: str, **params) -> None:
    """Generate text from a trained checkpoint."""
    from .generate import SamplingParams
    from .generate import generate as sample
    from .inference import load_model

    try:
        sampling = SamplingParams(**params)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    model, tok = load_model(checkpoint, device)
    unknown = tok.unknown(prompt)
    if unknown:
        click.echo(f"warning: the prompt has characters this model never saw: {''.join(sorted(unknown))!r}; "
                   "they are read as an unknown token", err=True)
    for i, text in enumerate(sample(model, tok, prompt, sampling, num_samples)):
        if num_samples > 1:
            click.echo(f"--- sample {i + 1} ---")
        click.echo(prompt + text)


@main.command()
@click.option("--data", multiple=True, type=click.Path(),
              help="corpus that sets char-level vocabularies (default: the built-in corpus)")
@click.option("--tokenizer", default=None, help="char, bpe or a tokenizer.json (default: each preset's own)")
@click.option("--vocab-size", type=int, default=None, help="BPE vocabulary size (default: each preset's own)")
@user_errors
def presets(data: tuple[str, ...], tokenizer: str | None, vocab_size: int | None) -> None:
    """List the model presets with their true parameter counts."""
    import torch

    from .model import GPT
    from .tokenizer import load

    char_vocab = None
    rows = []
    for name in preset_names():
        preset = load_preset(name)
        kind = tokenizer or preset.get("tokenizer", {}).get("kind", "char")
        if kind == "char":
            if char_vocab is None:
                char_vocab = build_tokenizer("char", discover(data), 0, 0).vocab_size
            vocab = char_vocab
        elif kind == "bpe":
            vocab = vocab_size or preset.get("tokenizer", {}).get("vocab_size", TrainConfig.vocab_size)
        else:
            vocab = load(kind).vocab_size
            kind = Path(kind).name
        cfg = ModelConfig(**{**preset["model"], "vocab_size": vocab})
        with torch.device("meta"):
            params = GPT(cfg).num_params()
        rows.append((name, f"{cfg.n_layer}/{cfg.n_head}/{cfg.n_embd}/{cfg.block_size}",
                     f"{kind} {vocab}", f"{params:,}", f"{params / 1e6:.2f}M"))
    header = ("preset", "layers/heads/width/context", "tokenizer", "parameters", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


@main.command()
@click.option("--checkpoint", type=click.Path(), help="chat with this checkpoint (or exported folder), here")
@click.option("--url", help="chat with a running daemon (hived train or hived serve), e.g. http://127.0.0.1:8765")
@click.option("--typewriter", type=float, default=None, help="seconds per character (default: 0.01 on a terminal)")
def chat(checkpoint: str | None, url: str | None, typewriter: float | None) -> None:
    """Chat with a model in the terminal; /help lists the commands. A daemon's bearer key, if it
    needs one, is read from HIVED_API_KEY."""
    import os

    from .terminal_chat import ChatError, backend_for, run

    try:
        backend = backend_for(checkpoint, url, os.environ.get("HIVED_API_KEY"))
    except (ChatError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(run(backend, typewriter=typewriter))


def _logging(fmt: str) -> logging.Logger:
    """The daemon's log, and its own logger for what it says about itself."""
    configure(fmt)
    return logging.getLogger("hived")


def _state_dir(required: bool):
    return click.option("--state-dir", type=click.Path(file_okay=False), required=required, envvar="HIVED_STATE_DIR",
                        help="the coordinator's state folder (keys, checkpoint) [env HIVED_STATE_DIR]")


STATE_DIR = _state_dir(required=True)


@from_environment
@main.command()
@click.option("--role", type=click.Choice(["coordinator"]), default="coordinator", show_default=True)
@click.option("--checkpoint", type=click.Path(exists=True),
              help="serve a trained model's dashboard and chat (instead of coordinating a hive): a .pt file, "
                   "or a folder `hived export --format hf` wrote")
@click.option("--runs", "runs_dir", type=click.Path(exists=True, file_okay=False),
              help="list the runs in this folder on the dashboard, to compare their curves and configs "
                   "(with --checkpoint, or alone)")
@_state_dir(required=False)
@WEB_HOST
@click.option("--port", type=int, default=8765, show_default=True)
@click.option("--mode", type=click.Choice(["diloco", "sync"]), default="diloco", show_default=True)
@click.option("--inner-steps", type=int, default=50, show_default=True, help="diloco: peer steps per round")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default="fp16", show_default=True,
              help="how updates travel: int8 is 4x smaller than fp32; topk sends 1/32 of each update's values "
                   "(about 0.75 bits a value) with the rest carried to later rounds, for slow uplinks")
@click.option("--outer-lr", type=float, help="diloco's outer step  [default: 0.7, or 1.0 with --compression topk]")
@click.option("--outer-momentum", type=float,
              help="its Nesterov momentum  [default: 0.9, or 0 with --compression topk: error feedback stands in "
                   "for it, as in SparseLoCo]")
@click.option("--round-timeout", type=float, default=120.0, show_default=True, help="seconds")
@click.option("--min-peers", type=int, default=1, show_default=True)
@click.option("--rounds", type=int, default=0, help="stop after this many rounds (0: never)")
@click.option("--upload-slots", type=int, default=4, show_default=True,
              help="updates received at once (bounds memory, whatever the number of peers)")
@click.option("--send-slots", type=int, default=16, show_default=True,
              help="weight frames being sent at once, to all peers together (bounds memory likewise)")
@click.option("--send-timeout", type=float, default=30.0, show_default=True,
              help="seconds a peer has to take each part (about 1 MiB) of the weights before it is dropped")
@click.option("--overlap", is_flag=True,
              help="diloco: peers train the next round while their update and the new weights travel (one round "
                   "of delay in the outer update, as Streaming DiLoCo)")
@click.option("--work-by-speed", is_flag=True,
              help="diloco: give each peer as many inner steps as it takes in the time the fastest takes for all, "
                   "so a slow peer does not set the pace; updates count by their tokens")
@click.option("--resume-timeout", type=float, default=60.0, show_default=True,
              help="seconds an upload cut off mid-way is kept for its peer to reconnect and finish (0: never)")
@click.option("--aggregator", type=click.Choice(["mean", "trimmed-mean", "centered-clip"]), default="mean",
              show_default=True, help="how updates are combined: robust ones bound what a dishonest peer can do")
@click.option("--max-update-ratio", type=float, default=1.0, show_default=True,
              help="reject an update whose norm exceeds this times the model's")
@click.option("--clip-factor", type=float, default=5.0, show_default=True,
              help="clip an update whose norm exceeds this times the median of recent ones")
@click.option("--max-strikes", type=int, default=3, show_default=True,
              help="ban a key after this many rejected or clipped updates (each clean one works one off)")
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), help="serve https/wss with this certificate")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True))
@dataclass_options(Limits, LIMITS_HELP)
@dataclass_options(HttpLimits, HTTP_HELP, prefix="http_")
@THREADS
@API_KEY
@LOG_FORMAT
@train_options
@user_errors
def serve(role: str, checkpoint: str | None, runs_dir: str | None, state_dir: str | None, host: str, port: int,
          tls_cert: str | None, tls_key: str | None, threads: int | None, api_key_file, log_format: str,
          config_file: str | None, **flags) -> None:
    """Run the daemon: a hive coordinator that peers join with `hived join`, or (--checkpoint) a
    trained model's dashboard and chat, or (--runs) a dashboard that compares runs. All serve the
    dashboard at / and the chat at /chat."""
    import ssl

    from aiohttp import web

    from .dashboard import RunState
    from .server import make_app
    from .serving import ModelHost

    log = _logging(log_format)
    _use_threads(threads)
    limits, http_limits = pop_dataclass(Limits, flags), pop_dataclass(HttpLimits, flags, prefix="http_")
    context = None
    if tls_cert:
        if not tls_key:
            raise click.UsageError("--tls-cert needs --tls-key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls_cert, tls_key)
    http = f"http{'s' if context else ''}://{host}:{port}"
    if checkpoint or runs_dir:
        state, model_host = _model_state(checkpoint) if checkpoint else (RunState("runs"), ModelHost("none"))
        state.set_state("serving")
        app = make_app(state, model_host, _api_limits(api_key_file), http_limits)
        if runs_dir:
            from . import runs

            runs.add_routes(app, Path(runs_dir))
            log.info("comparing the runs in %s: dashboard at %s/", runs_dir, http)
        if checkpoint:
            log.info("serving %s: dashboard at %s/, chat at %s/chat, OpenAI-compatible API at %s/v1 (model %r)",
                     checkpoint, http, http, http, model_host.name)
    else:
        from .config import resolve
        from .hive.coordinator import Coordinator, HiveConfig, add_routes

        if not state_dir:
            raise click.UsageError("a coordinator needs --state-dir (or serve a model with --checkpoint)")
        if flags["eval_interval"] is None:
            flags["eval_interval"] = 1  # rounds, for a coordinator
        hive = pop_dataclass(HiveConfig, flags)
        run = resolve(flags, _model_table())
        if run.train.ema_decay:
            raise click.UsageError("--ema-decay is for hived train and hived cluster: a hive's coordinator "
                                   "keeps no average of its weights")
        coordinator = Coordinator(run, hive, Path(state_dir), limits=limits)
        state = RunState(role, info={"preset": run.train.preset, "hive": dataclasses.asdict(hive),
                                     "model": dataclasses.asdict(coordinator.trainer.model_cfg),
                                     "config": dataclasses.asdict(run.train),
                                     "params": coordinator.model.num_params()},
                         status=coordinator.status)
        state.set_state("coordinating")
        model_host = ModelHost(f"hive-{run.train.preset}")
        for listener in (state, model_host):
            coordinator.events.subscribe(listener)
        app = make_app(state, model_host, _api_limits(api_key_file), http_limits)
        add_routes(app, coordinator)
        scheme = "wss" if context else "ws"
        log.info("coordinator on %s://%s:%d (peers: hived join %s://%s:%d --key-file KEY_FILE); dashboard at %s/, "
                 "status at %s/api/status, metrics at %s/metrics", scheme, host, port, scheme, host, port, http, http, http)
    web.run_app(app, host=host, port=port, ssl_context=context, print=None, access_log=None,
                keepalive_timeout=http_limits.header_timeout)


def _model_state(path: str) -> tuple:
    """The dashboard's state and the chat's model for a finished checkpoint (with the curves of
    its run, when the run's metrics.jsonl sits beside it)."""
    from .dashboard import replay
    from .inference import load_state, model_from_state
    from .serving import ModelHost

    saved = load_state(path)
    model, tok = model_from_state(saved, path)
    where = Path(path).resolve()
    run_dir = where if where.is_dir() else where.parent  # an exported folder is named for its model
    host = ModelHost(run_dir.name or "hived")
    host.publish(model, tok, Path(path).name, snapshot=True)  # nothing else holds this model
    state = replay(run_dir)
    # after the run's records, whose start would say where the run began rather than where this model is
    state.info.update({"checkpoint": str(path), "step": saved.get("step"),
                       "steps": (saved.get("train_config") or {}).get("steps"), "model": saved.get("model_config"),
                       "config": saved.get("train_config"), "params": model.num_params()})
    return state, host


@from_environment
@main.command()
@click.argument("url", required=False)
@click.option("--key", envvar="HIVED_KEY", help="your key; --key-file keeps it out of `ps`")
@click.option("--key-file", type=click.File("r"), help="read the key from this file")
@click.option("--name", default=None, help="how the coordinator lists you (default: this host's name)")
@click.option("--device", default="auto", show_default=True)
@click.option("--max-rounds", type=int, default=0, help="leave cleanly after N rounds (0: never)")
@click.option("--slowdown", type=click.FloatRange(min=1.0), default=1.0, hidden=True,
              help="take this many times as long over each step (resting between them): a slow volunteer, "
                   "to try --work-by-speed on one machine")
@click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True),
              help="trust this certificate for wss:// (a coordinator's self-signed one)")
@click.option("--heartbeat", type=click.FloatRange(min=1.0), default=30.0, show_default=True,
              help="seconds between pings to the coordinator; no answer within half of it and the peer reconnects")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="serve /metrics (Prometheus) and /healthz on this port")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="address of --metrics-port")
@THREADS
@LOG_FORMAT
@config_option(model_table=False)
def join(url: str | None, key: str | None, key_file, name: str | None, device: str, max_rounds: int, slowdown: float,
         tls_ca: str | None, heartbeat: float, metrics_port: int | None, metrics_host: str, threads: int | None,
         log_format: str, config_file: str | None) -> None:
    """Join a hive: train the coordinator's model with this machine. URL is the coordinator's
    ws:// or wss:// address (or `url` in the --config file)."""
    import asyncio
    import platform

    from aiohttp import web

    from .hive.peer import HivePeer, PeerOptions

    log = _logging(log_format)
    _use_threads(threads)
    if key_file:
        key = key_file.read().strip()
    if not key:
        raise click.UsageError("a key is needed: --key, --key-file or HIVED_KEY")
    if not url or not url.startswith(("ws://", "wss://")):
        raise click.BadParameter("the coordinator's URL starts with ws:// or wss://", param_hint="URL")
    from .device import pick_device
    from .hive.worker import TrainerWorker

    peer = HivePeer(PeerOptions(url, key, name or platform.node() or "peer", device, max_rounds, ca_file=tls_ca,
                                heartbeat=heartbeat),
                    TrainerWorker(pick_device(device), slowdown))

    async def run_peer() -> int:
        if metrics_port is None:
            return await peer.run()
        from .monitoring import Monitor, metrics_app
        from .server import start_site

        monitor = Monitor("peer", peer.status)
        peer.events.subscribe(monitor)
        site = web.AppRunner(metrics_app(monitor), access_log=None)
        bound, notice = await start_site(site, metrics_host, metrics_port)
        log.info("%smetrics at http://%s:%d/metrics", notice, metrics_host, bound)
        try:
            return await peer.run()
        finally:
            await site.cleanup()

    try:
        sys.exit(asyncio.run(run_peer()))
    except KeyboardInterrupt:
        sys.exit(130)


@main.group()
def keys() -> None:
    """Manage the keys that let peers join this coordinator."""


@keys.command("add")
@click.argument("name")
@STATE_DIR
def keys_add(name: str, state_dir: str) -> None:
    """Create a key; it is printed once, alone on the last line, and stored only hashed."""
    from .hive.keys import KeyStore, KeyStoreError

    try:
        key = KeyStore(state_dir).add(name)
    except KeyStoreError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"key {name!r} created; it is shown only this once:", err=True)
    click.echo(key)


@keys.command("list")
@STATE_DIR
def keys_list(state_dir: str) -> None:
    """List key names (the keys themselves are not stored)."""
    import time

    from .hive.keys import KeyStore

    for name, info in KeyStore(state_dir).names().items():
        banned = f"\tbanned: {info['banned']}" if "banned" in info else ""
        click.echo(f"{name}\tcreated {time.strftime('%Y-%m-%d %H:%M', time.localtime(info['created']))}{banned}")


@keys.command("revoke")
@click.argument("name")
@STATE_DIR
def keys_revoke(name: str, state_dir: str) -> None:
    """Revoke a key: peers using it are refused from their next connection."""
    from .hive.keys import KeyStore, KeyStoreError

    try:
        KeyStore(state_dir).revoke(name)
    except KeyStoreError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {name!r}")


@keys.command("unban")
@click.argument("name")
@STATE_DIR
def keys_unban(name: str, state_dir: str) -> None:
    """Lift the ban a coordinator put on a key after repeated bad updates; it applies at the key's
    next connection, with no strikes against it."""
    from .hive.keys import KeyStore, KeyStoreError

    try:
        KeyStore(state_dir).unban(name)
    except KeyStoreError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"unbanned {name!r}")


if __name__ == "__main__":
    main()
