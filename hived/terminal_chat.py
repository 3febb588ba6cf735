"""`hived chat`: a terminal chat with a checkpoint on this machine or with a running daemon.

Both talk the same way: a conversation rendered as in ``serving.render_chat`` and streamed back
piece by piece, printed with a typewriter effect on a terminal. Slash commands change the
sampling settings, the model and the conversation.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol, TextIO

from .checkpoint import CheckpointError
from .generate import SamplingParams, stream
from .serving import CHAT_STOP, chat_reply, render_chat

HELP = """commands:
  /temp X     sampling temperature (0: greedy)
  /topk N     sample among the N likeliest tokens (0: off)
  /topp X     nucleus sampling, 0 < X <= 1
  /max N      longest reply, in tokens
  /model NAME switch model (a checkpoint path, or a model the server lists)
  /models     list the models
  /reset      forget the conversation
  /params     show the settings
  /help       this text
  /quit       leave (Ctrl-D too)"""


@dataclass
class Settings:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    max_tokens: int = 200
    repetition_penalty: float = 1.1

    def sampling(self) -> SamplingParams:
        """The settings as sampling parameters; raises ValueError naming the rule a value breaks."""
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k or None,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty, stop=list(CHAT_STOP))


class Backend(Protocol):
    model: str

    def models(self) -> list[str]: ...
    def use(self, name: str) -> None: ...
    def reply(self, messages: list[dict[str, str]], settings: Settings) -> Iterator[str]: ...


class LocalBackend:
    """A checkpoint loaded in this process."""

    def __init__(self, checkpoint: str, device: str = "auto"):
        self.device = device
        self.use(checkpoint)

    def use(self, name: str) -> None:
        from .inference import load_model

        self.net, self.tokenizer = load_model(name, self.device)
        self.model = name

    def models(self) -> list[str]:
        return [self.model]

    def reply(self, messages: list[dict[str, str]], settings: Settings) -> Iterator[str]:
        yield from chat_reply(stream(self.net, self.tokenizer, render_chat(messages), settings.sampling()))


class HttpBackend:
    """A running daemon, through its OpenAI-compatible API."""

    def __init__(self, url: str, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.model = self.models()[0]

    def _request(self, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode() if body else None,
                                         headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=300)
        except urllib.error.HTTPError as exc:
            try:
                message = json.load(exc)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise ChatError(f"{self.url}: {message}") from None
        except urllib.error.URLError as exc:
            raise ChatError(f"cannot reach {self.url} ({exc.reason}); is `hived train` or `hived serve` running?"
                            ) from None

    def models(self) -> list[str]:
        with self._request("/v1/models") as r:
            return [m["id"] for m in json.load(r)["data"]]

    def use(self, name: str) -> None:
        if name not in self.models():
            raise ChatError(f"the server has no model {name!r}; /models lists them")
        self.model = name

    def reply(self, messages: list[dict[str, str]], settings: Settings) -> Iterator[str]:
        body = {"model": self.model, "messages": messages, "stream": True, **asdict(settings)}
        with self._request("/v1/chat/completions", body) as r:
            for line in r:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    text = json.loads(line[6:])["choices"][0]["delta"].get("content")
                    if text:
                        yield text


class ChatError(RuntimeError):
    pass


def _set(settings: Settings, command: str, raw: str) -> str:
    name, example = COMMANDS[command]
    kind = type(getattr(settings, name))
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{command} needs {'a whole number' if kind is int else 'a number'}, as in {command} "
                         f"{example}") from None
    replace(settings, **{name: value}).sampling()  # checks the value first
    setattr(settings, name, value)
    return f"{name} = {value}"


COMMANDS = {"/temp": ("temperature", "0.7"), "/topk": ("top_k", "40"), "/topp": ("top_p", "0.9"),
            "/max": ("max_tokens", "200")}
EMPTY = "(no reply: the model ended its turn at once; ask again, raise /temp, or /reset)"


def run(backend: Backend, out: TextIO = sys.stdout, typewriter: float | None = None) -> int:
    """The read-reply loop; returns the exit status."""
    settings = Settings()
    messages: list[dict[str, str]] = []
    delay = typewriter if typewriter is not None else (0.01 if out.isatty() else 0.0)
    print(f"hived chat with {backend.model} — /help for commands, /quit to leave", file=out)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            arg = arg.strip()
            try:
                if command == "/quit":
                    return 0
                if command == "/help":
                    print(HELP, file=out)
                elif command == "/params":
                    print("  ".join(f"{k}={v}" for k, v in asdict(settings).items()), file=out)
                elif command == "/reset":
                    messages.clear()
                    print("conversation cleared", file=out)
                elif command == "/models":
                    for name in backend.models():
                        print(("* " if name == backend.model else "  ") + name, file=out)
                elif command == "/model":
                    if not arg:
                        raise ValueError("/model needs a name (see /models)")
                    backend.use(arg)
                    messages.clear()
                    print(f"now chatting with {backend.model} (conversation cleared)", file=out)
                elif command in COMMANDS:
                    print(_set(settings, command, arg), file=out)
                else:
                    print(f"unknown command {command}; /help lists them", file=out)
            except (ValueError, ChatError, CheckpointError, OSError) as exc:
                print(f"error: {exc}", file=out)
            continue
        messages.append({"role": "user", "content": line})
        print("bot> ", end="", file=out, flush=True)
        answer = ""
        try:
            for piece in backend.reply(messages, settings):
                answer += piece
                _type(piece, out, delay)
        except ChatError as exc:
            messages.pop()
            print(f"\nerror: {exc}", file=out)
            continue
        print("" if answer.strip() else EMPTY, file=out)
        messages.append({"role": "assistant", "content": answer})


def _type(text: str, out: TextIO, delay: float) -> None:
    if not delay:
        out.write(text)
        out.flush()
        return
    for ch in text:
        out.write(ch)
        out.flush()
        time.sleep(delay)


def backend_for(checkpoint: str | None, url: str | None, api_key: str | None) -> Backend:
    if bool(checkpoint) == bool(url):
        raise ChatError("give either --checkpoint PATH or --url http://host:port")
    if checkpoint:
        if not Path(checkpoint).exists():
            raise ChatError(f"no checkpoint at {checkpoint}")
        return LocalBackend(checkpoint)
    return HttpBackend(url, api_key)
