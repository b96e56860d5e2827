"""Which implementation of a fused-loss kernel runs: the dispatch over the backends.

Two kernels, each with a module listing its implementations side by side:

    "vocab_pass"    afrl_fast.vocab_pass: the GRPO/SFT vocabulary pass of `fused_loss`
    "distill_pass"  afrl_fast.distill_pass: the teacher–student pass of `fused_distill_loss`

    "torch"   `vocab_pass_torch` / `distill_pass_torch`: plain torch in row blocks, any device;
              float64 inputs give the exact checking path.
    "native"  the C++/OpenMP kernels of csrc/, built on first use by afrl_fast.native_build.
    "triton"  `afrl_fast_kernels.<kernel>.<kernel>_triton`, CUDA (or CPU under TRITON_INTERPRET=1).
    "auto"    CUDA → triton; CPU → native if it builds, else torch.

Environment: AFRL_FAST_NO_NATIVE=1 never builds the native kernel ("auto" uses torch on CPU); the
build's cache and lock settings are in afrl_fast.native_build.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable

import torch

from .distill_pass import distill_pass_native, distill_pass_torch
from .native_build import native_available, unavailable_summary
from .vocab_pass import vocab_pass_native, vocab_pass_torch

BACKENDS = ("auto", "torch", "native", "triton")
KERNELS = ("vocab_pass", "distill_pass")
VocabPass = Callable[..., tuple]


# ----------------------------------------------------------------------------------------------
# Backend dispatch

_TORCH = {"vocab_pass": vocab_pass_torch, "distill_pass": distill_pass_torch}
_NATIVE = {"vocab_pass": vocab_pass_native, "distill_pass": distill_pass_native}


def _native_kernel(kernel: str) -> VocabPass:
    if not native_available():
        raise RuntimeError("backend 'native' is unavailable: the C++ kernels in csrc/ did not build "
                           f"on this machine ({unavailable_summary()}; full log: "
                           "afrl_fast.native_build.native_unavailable_reason())")
    return _NATIVE[kernel]


def _triton_kernel(kernel: str, device: torch.device) -> VocabPass:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend 'triton' needs CUDA tensors (these are on "
                           f"{device.type}), or TRITON_INTERPRET=1 set before triton is imported")
    try:
        module = importlib.import_module(f"afrl_fast_kernels.{kernel}")
    except ImportError as err:
        raise RuntimeError(f"backend 'triton' is unavailable: afrl_fast_kernels.{kernel} does not import ({err})") from err
    return getattr(module, f"{kernel}_triton")


def resolve_backend(backend: str, device: torch.device, kernel: str = "vocab_pass") -> tuple[str, VocabPass]:
    """(name, function) of `kernel` ("vocab_pass" or "distill_pass") for a backend name and the
    device of the inputs."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda":
            try:
                return "triton", _triton_kernel(kernel, device)
            except RuntimeError as err:
                warnings.warn(f"{kernel}: falling back to the torch backend ({err})")
                return "torch", _TORCH[kernel]
        try:
            return "native", _native_kernel(kernel)
        except RuntimeError:
            return "torch", _TORCH[kernel]
    if backend == "torch":
        return "torch", _TORCH[kernel]
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend 'native' runs on CPU tensors only (these are on {device.type})")
        return "native", _native_kernel(kernel)
    return "triton", _triton_kernel(kernel, device)
