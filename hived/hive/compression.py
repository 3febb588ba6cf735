"""How tensors travel: fp32, fp16, bf16, blockwise int8 or int4, or sparse top-k, and the
sender's error feedback.

Kept apart from the wire protocol (which frames whatever this packs) as hivemind keeps its
``compression/`` apart from its averaging. A tensor packs to a msgpack-friendly map of dtype,
shape and bytes (int8 and int4 add one fp32 scale per block of ``INT8_BLOCK`` values; int4
holds two values a byte). The sender of fp16, bf16, int8 or int4 updates keeps what rounding or
quantisation dropped and adds it to the next update (error feedback), so over rounds nothing is
lost, only delayed. Unpacking checks every size against the declared shape before it touches
the bytes.

``topk`` is for updates over slow uplinks (as SparseLoCo): in each chunk of ``TOPK_CHUNK``
values only the ``TOPK_KEEP`` largest in magnitude travel, as int8 with one scale per chunk and
a 16-bit position each, about 0.75 bits a value in all; error feedback carries the rest into
later rounds. A change to the weights cannot be sparse (every weight moves with the outer
momentum), so a hive with topk updates sends each round's change to its weights as int4.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

INT8_BLOCK = 256
TOPK_CHUNK, TOPK_KEEP = 4096, 128  # 1/32 of the values (3.1%), each 3 bytes, + 4 bytes a chunk
COMPRESSIONS = ("fp32", "fp16", "bf16", "int8", "int4", "topk")


class MalformedTensor(ValueError):
    """A packed tensor whose fields do not agree; the protocol treats it as a protocol error."""


def pack(t: torch.Tensor, compression: str = "fp32") -> dict:
    """A tensor as a msgpack-friendly map; int8 is blockwise with a scale per block."""
    return _quantize(t, compression, received=False)[0]


def _quantize(t: torch.Tensor, compression: str, received: bool = True) -> tuple[dict, torch.Tensor | None]:
    """The packed map, and (except for fp32, or without ``received``) the values the receiver
    will decode, computed without a round trip through bytes (in half precision for fp16 and
    bf16: arithmetic with float32 tensors promotes them as it goes). Only error feedback needs
    them; for int8 they cost two more passes. The map holds views of the tensors' memory, not
    copies: msgpack packs any buffer."""
    t = t.detach().to("cpu", torch.float32).contiguous()
    shape = list(t.shape)
    if compression == "fp32":
        return {"dtype": "fp32", "shape": shape, "data": _buffer(t)}, None
    if compression == "fp16":
        h = t.half()
        return {"dtype": "fp16", "shape": shape, "data": _buffer(h)}, h
    if compression == "bf16":
        b = t.bfloat16()
        return {"dtype": "bf16", "shape": shape, "data": _buffer(b.view(torch.int16))}, b
    if compression in ("int8", "int4"):
        flat = t.flatten()
        pad = (-flat.numel()) % INT8_BLOCK
        blocks = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, INT8_BLOCK)
        top = 127 if compression == "int8" else 7
        scale = blocks.abs().amax(dim=1).clamp_min(1e-12) / top
        q = (blocks / scale[:, None]).round_().clamp_(-top, top).to(torch.int8)
        back = (q.float() * scale[:, None]).flatten()[: flat.numel()].view(t.shape) if received else None
        if compression == "int4":  # two a byte, offset by 8: the even value in the low nibble
            pairs = (q + 8).to(torch.uint8).view(-1, 2)
            q = pairs[:, 0] | (pairs[:, 1] << 4)
        return {"dtype": compression, "shape": shape, "data": _buffer(q), "scale": _buffer(scale)}, back
    if compression == "topk":
        flat = t.flatten()
        pad = (-flat.numel()) % TOPK_CHUNK
        chunks = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, TOPK_CHUNK)
        index = chunks.abs().topk(TOPK_KEEP, dim=1, sorted=False).indices
        values = chunks.gather(1, index)
        scale = values.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = (values / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        back = None
        if received:
            dense = torch.zeros_like(chunks).scatter_(1, index, q.float() * scale[:, None])
            back = dense.flatten()[: flat.numel()].view(t.shape)
        return {"dtype": "topk", "shape": shape, "data": _buffer(q), "index": _buffer(index.to(torch.int16)),
                "scale": _buffer(scale)}, back
    raise ValueError(f"unknown compression {compression!r}; use one of {', '.join(COMPRESSIONS)}")


BUFFERS = (bytes, memoryview)  # msgpack decodes to bytes; pack() makes views


def _buffer(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, shared (the view keeps the tensor alive)."""
    return memoryview(t.numpy()).cast("B")


def unpack(d: Any) -> torch.Tensor:
    """The inverse of ``pack``, checking that sizes agree before touching the bytes. For fp32,
    fp16 and bf16 it is a read-only view of the received bytes in the precision they travelled
    in: whoever reads it into float32 (a norm, a sum, the model) converts as it goes, with no
    float32 copy of the whole tensor. int8 comes back dequantized."""
    if not isinstance(d, dict) or not isinstance(d.get("shape"), list) or not isinstance(d.get("data"), BUFFERS):
        raise MalformedTensor("malformed tensor")
    shape = d["shape"]
    if not all(isinstance(s, int) and 0 <= s < 1 << 31 for s in shape) or len(shape) > 8:
        raise MalformedTensor("malformed tensor shape")
    n = math.prod(shape)
    kind = d.get("dtype")
    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 1, "topk": 1}.get(kind)
    if itemsize is None:
        raise MalformedTensor(f"unknown tensor dtype {kind!r}")
    if kind == "topk":
        return _unpack_topk(d, shape, n)
    blocks = -(-n // INT8_BLOCK)
    expected = {"int8": blocks * INT8_BLOCK, "int4": blocks * INT8_BLOCK // 2}.get(kind, n * itemsize)
    if len(d["data"]) != expected:
        raise MalformedTensor("tensor data does not match its shape")
    if kind == "fp32":
        out = _view(d["data"], np.float32)
    elif kind == "fp16":
        out = _view(d["data"], np.float16)
    elif kind == "bf16":
        out = _view(d["data"], np.int16).view(torch.bfloat16)
    else:
        scale = d.get("scale")
        if not isinstance(scale, BUFFERS) or len(scale) != blocks * 4:
            raise MalformedTensor(f"{kind} tensor has no valid scales")
        if kind == "int8":
            q = _view(d["data"], np.int8).view(blocks, INT8_BLOCK)
        else:
            b = _view(d["data"], np.uint8)
            q = (torch.stack((b & 15, b >> 4), dim=1).to(torch.int8) - 8).view(blocks, INT8_BLOCK)
        out = (q.float() * _view(scale, np.float32)[:, None]).flatten()[:n]
    return out.view(shape)


def _unpack_topk(d: dict, shape: list[int], n: int) -> torch.Tensor:
    """A sparse top-k tensor, dense again; every position is checked to lie in its chunk."""
    chunks = -(-n // TOPK_CHUNK)
    scale, index = d.get("scale"), d.get("index")
    if (len(d["data"]) != chunks * TOPK_KEEP or not isinstance(scale, BUFFERS) or len(scale) != chunks * 4
            or not isinstance(index, BUFFERS) or len(index) != chunks * TOPK_KEEP * 2):
        raise MalformedTensor("topk tensor data does not match its shape")
    positions = _view(index, np.int16).view(chunks, TOPK_KEEP).long() & 0xFFFF
    if chunks and int(positions.max()) >= TOPK_CHUNK:
        raise MalformedTensor("topk tensor has a position outside its chunk")
    values = _view(d["data"], np.int8).view(chunks, TOPK_KEEP).float() * _view(scale, np.float32)[:, None]
    dense = torch.zeros(chunks, TOPK_CHUNK).scatter_(1, positions, values)
    return dense.flatten()[:n].view(shape)


# Received tensors are read-only views of the frame's bytes, and only ever read. Torch warns
# about such views; the filter is set once here because ``warnings.catch_warnings`` around each
# call is not thread-safe, and frames decode in several threads at once.
warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)


def _view(data: bytes | memoryview, dtype) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=dtype))


class ErrorFeedback:
    """Sender-side memory of what compression dropped, added back into the next update.

    With it, the sum of the tensors received tracks the sum of the true updates to within one
    round's quantisation error, instead of drifting by every round's error.
    """

    def __init__(self, compression: str):
        self.compression = compression
        self.residual: dict[str, torch.Tensor] = {}

    def pack(self, name: str, t: torch.Tensor) -> dict:
        t = t.detach().float().cpu()
        if self.compression == "fp32" or not math.isfinite(float(t.sum())):
            # A NaN or Inf (the sum of any tensor holding one is one) is sent as it is, for the
            # receiver to reject, and never folded into the residual: it would stay there.
            return pack(t, self.compression)
        # The residual becomes the target in place, then what the receiver will decode is taken
        # off it in place: no temporaries the size of the tensor.
        target = self.residual[name].add_(t) if name in self.residual else t.clone()
        packed, received = _quantize(target, self.compression)
        self.residual[name] = target.sub_(received)
        return packed


def packed_nbytes(numel: int, compression: str) -> int:
    """Payload bytes of a tensor of ``numel`` values once packed."""
    if compression in ("int8", "int4"):
        blocks = -(-numel // INT8_BLOCK)
        return blocks * INT8_BLOCK // (1 if compression == "int8" else 2) + 4 * blocks
    if compression == "topk":
        return -(-numel // TOPK_CHUNK) * (TOPK_KEEP * 3 + 4)
    return numel * {"fp32": 4, "fp16": 2, "bf16": 2}[compression]


def weights_compression(compression: str) -> str:
    """How a round's change to the weights travels in a hive whose updates travel as
    ``compression``: the same, but that change is dense, so topk hives send it as int4."""
    return "int4" if compression == "topk" else compression
