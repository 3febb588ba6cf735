"""The model behind the chat: generation off the event loop, a concurrency limit, hot swaps.

Training (local or in a hive) keeps its own model. The chat talks to a snapshot that is replaced
whole after each evaluation or round, so a generation in flight never sees half-updated weights
and training never waits for a lock. Generations run on their own small thread pool: however
many people chat, the event loop keeps serving the dashboard and the hive's peers, and the
coordinator's decoding threads are never taken.

Base models do not know about chat, so a conversation is rendered as plain text (``render_chat``):
the system message, a blank line, then one ``User: ...`` or ``Assistant: ...`` line per turn,
ending with ``Assistant:`` for the model to continue; the reply stops at the next ``User:``.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor


from .generate import SamplingParams, Usage, stream
from .model import GPT
from .tokenizer import Tokenizer

CHAT_STOP = ["\nUser:", "\nAssistant:"]


class NoModel(RuntimeError):
    """No weights to chat with yet."""


class Busy(RuntimeError):
    """Every generation slot is taken and the queue is full."""


def render_chat(messages: list[dict[str, str]]) -> str:
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
             for m in messages if m["role"] != "system"]
    return (f"{system}\n\n" if system else "") + "\n".join([*turns, "Assistant:"])


def chat_reply(pieces: Iterable[str]) -> Iterator[str]:
    """A chat reply's text as it streams, without the space the model writes after the
    template's "Assistant:" (it belongs to the template, not to the reply)."""
    leading = True
    for piece in pieces:
        if leading:
            piece = piece.lstrip(" ")
            leading = not piece
        if piece:
            yield piece


class ModelHost:
    def __init__(self, name: str, max_concurrent: int = 2, max_waiting: int = 16):
        self.name = name
        self.label = ""  # where the weights come from ("step 400", "round 12", a file)
        self._snapshot: tuple[GPT, Tokenizer] | None = None
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="hived-generate")
        self._slots = threading.BoundedSemaphore(max_concurrent + max_waiting)

    @property
    def ready(self) -> bool:
        return self._snapshot is not None

    def __call__(self, kind: str, data: dict) -> None:
        """An Events listener: training announces new weights with a ``weights`` event (its own
        model, which it goes on changing: copied here)."""
        if kind == "weights":
            self.publish(data["model"], data["tokenizer"], data["label"])

    def publish(self, model: GPT, tokenizer: Tokenizer, label: str, snapshot: bool = False) -> None:
        """Chat with ``model`` from now on: a copy of it (taken here, from the training thread),
        or the model itself when it is a ``snapshot`` no one else changes."""
        if not snapshot:
            model = copy.deepcopy(model)  # copies the tensors; no re-initialisation
        self._snapshot = model.eval(), tokenizer
        self.label = label

    async def stream(self, prompt: str, params: SamplingParams, usage: Usage, chat: bool = False) -> AsyncIterator[str]:
        """The text as it is generated (``chat``: as a reply to ``render_chat``'s prompt). Stopping
        early (the client left) stops the generation thread at its next token."""
        if self._snapshot is None:
            raise NoModel("no weights yet; the model appears after the first evaluation")
        if not self._slots.acquire(blocking=False):
            raise Busy("too many generations at once; try again in a moment")
        model, tokenizer = self._snapshot
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def run() -> None:
            try:
                text = stream(model, tokenizer, prompt, params, usage)
                for piece in chat_reply(text) if chat else text:
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(pieces.put_nowait, piece)
                loop.call_soon_threadsafe(pieces.put_nowait, None)
            except BaseException as exc:  # handed to the request, which reports it  # noqa: BLE001
                loop.call_soon_threadsafe(pieces.put_nowait, exc)

        try:
            done = loop.run_in_executor(self._pool, run)
            try:
                while (item := await pieces.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                stop.set()
                await asyncio.shield(done)
        finally:
            self._slots.release()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
