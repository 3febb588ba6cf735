"""Updates as they arrive: decoded a frame at a time off the event loop, with what the guard
needs to judge them whole (their shapes and their norm, summed part by part)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..aggregation import squared_norm
from ..compression import unpack
from ..protocol import Update, decode
from .limits import Limits

if TYPE_CHECKING:
    from .rounds import Round


@dataclass
class Upload:
    """An update arriving in parts. Its squared norm is summed part by part as the parts are
    decoded, and each part goes into its round's aggregator as it arrives, off the event loop,
    for as long as the update could still be accepted; it is judged whole once complete."""

    round: int
    parts: int
    rnd: Round | None  # the round it reports to (None: no round was open for it)
    tokens: int  # the tokens behind it (its weight), capped at what its peer was given
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # of the model's tensors it has sent
    foreign: str = ""  # why a tensor it sent is not one of the model's (the first such), if one was not
    seen: set[int] = field(default_factory=set)
    squared_norm: float = 0.0
    bytes: int = 0
    summing: bool = True  # every part so far went into the aggregator
    adding: asyncio.Future | None = None  # the last part's add, not yet done


@dataclass
class Held:
    """An upload cut off by its connection, kept (its parts are already in the round's sum) for
    its participant to finish after reconnecting, until ``until``."""

    peer_id: str  # the session it came from, as the round knows it
    upload: Upload
    until: float

    def have(self) -> bytes:
        return bytes(i in self.upload.seen for i in range(self.upload.parts))


Part = list[tuple[str, torch.Tensor, Any]]  # (name, tensor as received, its packed form)


def decode_frame(frame: bytes, shapes: dict[str, tuple[int, ...]], limits: Limits) -> tuple[Any, Part, float]:
    """A frame's message and, for an update part, the tensors the model has (name, float32,
    packed) and their squared norm. Converted once, for both the norm and the sum; anything
    else is left for the guard to reject, never unpacked."""
    m = decode(frame, limits.max_message_bytes, limits.max_message_objects, limits.max_frame_bytes)
    if not isinstance(m, Update):
        return m, [], 0.0
    known = [(name, unpack(d).float(), d) for name, d in m.tensors.items() if declared_shape(d) == shapes.get(name)]
    return m, known, squared_norm(t for _, t, _ in known)


def declared_shape(packed: Any) -> tuple[int, ...] | None:
    """The shape a packed tensor declares (None if it declares none)."""
    shape = packed.get("shape") if isinstance(packed, dict) else None
    return tuple(shape) if isinstance(shape, list) else None
