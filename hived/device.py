"""Choosing where and in what precision to train."""

from __future__ import annotations

import contextlib
import platform

import torch


def pick_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu, unless the user forces one with --device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


def describe(device: torch.device) -> str:
    """For logs, the status and the hive's list of peers: a GPU by its name, the CPU with the
    threads torch gives it (``--threads``), which is what a CPU's throughput depends on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        n = torch.get_num_threads()
        return f"cpu ({platform.processor() or platform.machine()}, {n} thread{'s' if n > 1 else ''})"
    return device.type


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """Mixed precision where it pays: bf16 (or fp16) on CUDA. On CPU, fp32: autocast to bf16 was
    measured slower on CPUs without native bf16 matmuls (docs/benchmarks.md)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
