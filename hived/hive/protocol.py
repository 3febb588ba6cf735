"""The hive's wire protocol: every message type, the frame codec and the tensor codec.

Coordinator, peer and tests all import this one module, so the protocol is defined once.
A frame is a msgpack map ``{"type": name, **fields}``, zstd-compressed. Nothing is ever
unpickled: msgpack decodes to plain maps, lists, numbers, strings and bytes, and every field is
checked against the dataclass it claims to be before use. Sizes are capped before and after
decompression, so a hostile peer cannot make the daemon allocate more than the caps.

Tensors are packed by ``compression`` (fp32, fp16, bf16 or blockwise int8, with error
feedback); this module splits a model's tensors into frames of about ``CHUNK_BYTES`` each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import torch
import zstandard

from .compression import MalformedTensor, pack, packed_nbytes

PROTOCOL_VERSION = 7  # 7: the train config has curriculum_fraction; 6: --optimizer and the training knobs
MAX_FRAME_BYTES = 64 << 20  # compressed, as received
MAX_MESSAGE_BYTES = 256 << 20  # after decompression
MAX_HELLO_BYTES = 16 << 10  # a frame before login, compressed or not: a Hello is a few hundred bytes
# Maps, lists and their items in one message: the largest honest one (Welcome, a part of a large
# model's weights) has a few thousand. A frame of a few hundred bytes can otherwise decode into
# millions of objects (seconds of CPU, gigabytes).
MAX_OBJECTS = 1 << 16
CHUNK_BYTES = 1 << 20  # tensor payload per frame: a connection buffers about one part (bench/hive.py --scale)
MAX_TEXT = 64  # names and device strings from peers
MAX_REPLICAS = 64  # data-parallel workers one peer may speak for (a Ray cluster joined as one peer)

# Tensor payloads barely compress (fp16 or int8: 1.07-1.09x at level 1, for 3-4x the time of
# level -1 both ways), so frames that carry them use zstd's fast level; small control frames
# compress well and cheaply. The threshold sits far below a part (CHUNK_BYTES): parts just under
# it must not fall back to the slow level.
_ZSTD_SMALL, _ZSTD_BIG, _BIG = 3, -1, 64 << 10


class ProtocolError(ValueError):
    """A frame that does not follow the protocol; the connection that sent it is closed."""


BAD_INPUT = (ProtocolError, MalformedTensor)  # what a peer's malformed frame or tensor raises


# ---------------------------------------------------------------------------- messages


@dataclass
class Hello:
    """Peer → coordinator, first frame of every connection."""

    version: int
    key: str
    name: str
    device: str
    replicas: int  # data-parallel workers behind this peer: each round gives it that many shares of work


@dataclass
class Welcome:
    """Coordinator → peer: everything needed to build the same model and trainer."""

    peer_id: str
    mode: str
    compression: str
    model_config: dict
    train_config: dict
    tokenizer: str
    round: int


@dataclass
class Refused:
    """Coordinator → peer, then the connection closes. ``final``: do not retry (a bad key)."""

    reason: str
    final: bool = False


@dataclass
class Weights:
    """Coordinator → peer: the model at the start of ``round`` (one part of ``parts``): whole,
    or (``base`` ≥ 0) as its change from the weights this peer was sent for round ``base``."""

    round: int
    part: int
    parts: int
    tensors: dict = field(default_factory=dict)
    base: int = -1


@dataclass
class Work:
    """Coordinator → peer: train on these token windows (rows of block_size + 1 tokens)."""

    round: int
    start: int  # index of the first window, for the ledger and for reproducibility
    count: int
    dtype: str
    windows: bytes
    steps: int  # optimizer steps (diloco: inner steps; sync: 1)
    first_step: int  # position of the first of them in the hive's learning-rate schedule
    go: bool = False  # upload as soon as trained, without Ready and Go: the round has a slot for every peer


@dataclass
class Training:
    """Peer → coordinator: the weights are loaded and training on ``round`` has begun. Once every
    peer of the round has said so, the coordinator evaluates: its cores then go to nothing else."""

    round: int


@dataclass
class Ready:
    """Peer → coordinator: my update for ``round`` is computed; tell me when to send it."""

    round: int


@dataclass
class Go:
    """Coordinator → peer: send your update now. Uploads are admitted a few at a time, so the
    coordinator's memory stays flat however many peers finish at once."""

    round: int


@dataclass
class Update:
    """Peer → coordinator: pseudo-gradient (diloco) or gradient (sync) for ``round``."""

    round: int
    part: int
    parts: int
    tokens: int
    loss: float
    seconds: float  # the peer's compute time, so round overhead can be told apart from training
    tensors: dict = field(default_factory=dict)


@dataclass
class Ack:
    """Coordinator → peer: what became of an update (accepted, clipped, late, rejected)."""

    round: int
    status: str
    detail: str = ""


@dataclass
class Resume:
    """Coordinator → peer, after a Welcome: the parts of your update for ``round`` that arrived
    before the connection dropped (``have[i]`` is 1 for part ``i``); send only the others."""

    round: int
    have: bytes


@dataclass
class Bye:
    reason: str = ""


MESSAGES: dict[str, type] = {cls.__name__: cls for cls in (Hello, Welcome, Refused, Weights, Work, Training, Ready, Go,
                                                            Update, Ack, Resume, Bye)}
_FIELD_TYPES = {"int": int, "str": str, "bool": bool, "dict": dict, "bytes": bytes, "float": (float, int)}


def encode(msg: Any) -> bytes:
    payload = {"type": type(msg).__name__, **{f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}}
    raw = msgpack.packb(payload, use_bin_type=True)
    return zstandard.ZstdCompressor(level=_ZSTD_BIG if len(raw) > _BIG else _ZSTD_SMALL).compress(raw)


def decode(frame: bytes, max_bytes: int = MAX_MESSAGE_BYTES, max_objects: int = MAX_OBJECTS,
           max_frame: int = MAX_FRAME_BYTES) -> Any:
    """Decode and validate one frame of at most ``min(max_frame, max_bytes)`` bytes as received,
    ``max_bytes`` decompressed and ``max_objects`` maps, lists and items; anything unexpected
    raises ProtocolError."""
    if not isinstance(frame, (bytes, bytearray)):
        raise ProtocolError("expected a binary frame")
    if len(frame) > min(max_bytes, max_frame):
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {min(max_bytes, max_frame)}-byte cap")
    try:
        # The size a frame's header declares is allocated at once by decompress(): checked first.
        declared = zstandard.get_frame_parameters(frame).content_size
        if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > max_bytes:
            raise ProtocolError(f"message of {declared} bytes once decompressed exceeds the {max_bytes}-byte cap")
        raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=max_bytes)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"not a zstd frame: {exc}") from None
    if len(raw) > max_bytes:
        raise ProtocolError("message too large once decompressed")
    budget = [max_objects]

    def counted(container: Any) -> Any:
        budget[0] -= 1 + len(container)
        if budget[0] < 0:
            raise ProtocolError(f"more than {max_objects} objects in one message")
        return container

    try:
        payload = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=1 << 20,
                                  max_array_len=max_objects, max_map_len=max_objects,
                                  list_hook=counted, object_hook=counted)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"not a msgpack message: {type(exc).__name__}") from None
    if not isinstance(payload, dict) or payload.get("type") not in MESSAGES:
        raise ProtocolError("unknown message type")
    cls = MESSAGES[payload.pop("type")]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if set(payload) != set(fields):
        raise ProtocolError(f"{cls.__name__}: fields {sorted(payload)} do not match {sorted(fields)}")
    for name, value in payload.items():
        expected = _FIELD_TYPES[fields[name].type]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ProtocolError(f"{cls.__name__}.{name} has the wrong type")
    return cls(**payload)


def clean_text(text: str, limit: int = MAX_TEXT) -> str:
    """Untrusted text from a peer: printable characters only, length-limited."""
    return "".join(c for c in str(text) if c.isprintable())[:limit]


def split(numels: dict[str, int], compression: str, limit: int = CHUNK_BYTES) -> list[list[str]]:
    """Tensor names grouped into parts of at most ``limit`` packed payload bytes each (a tensor
    larger than the limit travels alone). Keeps every frame under the frame cap for any model size
    whose largest tensor fits one frame."""
    parts: list[list[str]] = [[]]
    size = 0
    for name, numel in numels.items():
        n = packed_nbytes(numel, compression)
        if parts[-1] and size + n > limit:
            parts.append([])
            size = 0
        parts[-1].append(name)
        size += n
    return parts


M = TypeVar("M", Weights, Update)


def tensor_frames(header: M, tensors: dict[str, torch.Tensor], compression: str,
                  pack_one: Callable[[str, torch.Tensor], dict] | None = None) -> list[Callable[[], bytes]]:
    """The frames of a message that carries tensors (``header`` with every field but the parts),
    as one job per part that packs and encodes it when called: the parts can be packed in
    parallel threads (``packed_ahead``), and a sender holds a few packed parts at a time, not the
    whole model."""
    pack_one = pack_one or (lambda _, t: pack(t, compression))
    parts = split({k: t.numel() for k, t in tensors.items()}, compression)
    return [functools.partial(_encode_part, header, i, len(parts), {k: tensors[k] for k in names}, pack_one)
            for i, names in enumerate(parts)]


def _encode_part(header: M, part: int, parts: int, tensors: dict[str, torch.Tensor],
                 pack_one: Callable[[str, torch.Tensor], dict]) -> bytes:
    return encode(dataclasses.replace(header, part=part, parts=parts,
                                      tensors={k: pack_one(k, t) for k, t in tensors.items()}))


async def packed_ahead(jobs: list[Callable[[], bytes]], ahead: int = 2) -> AsyncIterator[bytes]:
    """The jobs' frames in order, each packed on the default executor up to ``ahead`` parts before
    it is needed: packing (which releases the GIL) runs on several cores and overlaps sending."""
    loop = asyncio.get_running_loop()
    todo = iter(jobs)
    running = deque(loop.run_in_executor(None, job) for job in itertools.islice(todo, ahead))
    while running:
        frame = await running.popleft()
        if (job := next(todo, None)) is not None:
            running.append(loop.run_in_executor(None, job))
        yield frame
