"""Native CPU kernel of the fused vocabulary pass (csrc/vocab_pass.cpp), built on first use.

`vocab_pass_native` has the contract of the per-chunk kernel in DESIGN §4; afrl_fast/loss.py calls
it from its chunk loop when `native_available()`. The extension is compiled with
torch.utils.cpp_extension.load into a per-user cache directory keyed by a hash of the source, the
flags, the torch/Python versions and the CPU (the build uses -march=native), so edits rebuild and
a cache shared between machines never runs code built for another CPU.

Environment:
    AFRL_FAST_NO_NATIVE=1     never build; native_available() is False.
    AFRL_FAST_CACHE_DIR       cache root (default $XDG_CACHE_HOME/afrl_fast or ~/.cache/afrl_fast).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).resolve().parent.parent / "csrc" / "vocab_pass.cpp"]
# No -ffast-math: the exp's round-to-integer trick and the NaN-free -inf handling rely on IEEE
# semantics. fp-contract=fast only lets the compiler fuse a*b+c into FMAs.
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-Wno-class-memaccess"]
_LDFLAGS = ["-fopenmp"]
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # what the kernel reads and writes directly

_lock = threading.Lock()
_module = None
_reason: str | None = None  # set once the build was tried and failed


def _cpu_fingerprint() -> str:
    """The CPU feature flags, so a cache on a shared home never serves another CPU's -march=native."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_key() -> str:
    h = hashlib.sha256()
    for src in _SOURCES:
        h.update(src.read_bytes())
    for part in (*_CFLAGS, *_LDFLAGS, torch.__version__, sys.version, _cpu_fingerprint()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    if os.environ.get("AFRL_FAST_CACHE_DIR"):
        return Path(os.environ["AFRL_FAST_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "afrl_fast"


def _missing_toolchain() -> str | None:
    if os.environ.get("AFRL_FAST_NO_NATIVE", "") not in ("", "0"):
        return "disabled by AFRL_FAST_NO_NATIVE"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    if not all(src.is_file() for src in _SOURCES):
        return f"sources not found: {[str(s) for s in _SOURCES]}"
    return None


def _build():
    from torch.utils import cpp_extension

    cpp_extension.verify_ninja_availability()
    key = _build_key()
    build_dir = _cache_root() / "native" / f"vocab_pass_{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    # The key is in the module name too, so two versions can coexist in one process.
    return cpp_extension.load(
        name=f"afrl_fast_vocab_pass_{key}", sources=[str(s) for s in _SOURCES],
        extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS, build_directory=str(build_dir),
        verbose=False)


def _short(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else "…" + text[-limit:]


def _summary(reason: str) -> str:
    """One line for the warning: the first compiler error if there is one (the full log with the
    command lines stays in native_unavailable_reason())."""
    lines = reason.splitlines()
    return next((ln.strip() for ln in lines if "error:" in ln), lines[0][:300] if lines else "")


def _load():
    """The extension module, or None (reason in _reason). Builds at most once per process."""
    global _module, _reason
    if _module is not None or _reason is not None:
        return _module
    with _lock:
        if _module is None and _reason is None:
            _reason = _missing_toolchain()
            if _reason is None:
                try:
                    _module = _build()
                except Exception as exc:  # a failed build must not take training down
                    _reason = "build failed: " + _short(exc)
            if _reason is not None:
                log.warning("afrl_fast native vocab pass unavailable (%s); using the torch path. "
                            "Details: afrl_fast.native.native_unavailable_reason()",
                            _summary(_reason))
    return _module


def native_available() -> bool:
    """True when the extension is built (building it now if needed). Never raises."""
    return _load() is not None


def native_unavailable_reason() -> str:
    """Why native_available() is False ('' when it is True)."""
    _load()
    return _reason or ""


def _row_vec(t, dtype, c, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"vocab_pass_native: {name} must be a tensor, got {type(t).__name__}")
    t = t.detach()
    if t.dim() == 0 and c is not None:
        t = t.expand(c)
    return t.to(device="cpu", dtype=dtype).contiguous()


def vocab_pass_native(logits, targets, is_sft, advantages, old_logp, ref_logp, scale,
                      beta, eps_low, eps_high, inv_temp, with_grad):
    """(row_loss, logp, entropy, clipped, k3) for a chunk of raw logits [C, V]; see DESIGN §4.

    float32 and bfloat16 logits are processed in place by the kernel; any other dtype, or
    non-contiguous logits, go through a float32 copy whose gradient is copied back (when
    with_grad). Per-row inputs are converted to the kernel's dtypes (scalars broadcast).
    Raises RuntimeError when the extension is unavailable.
    """
    mod = _load()
    if mod is None:
        raise RuntimeError(f"afrl_fast native vocab pass unavailable: {_reason}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("vocab_pass_native: logits must be a 2-D tensor [C, V]")
    c = logits.shape[0]
    direct = logits.dtype in _NATIVE_DTYPES and logits.is_contiguous() and logits.device.type == "cpu"
    work = logits.detach() if direct else logits.detach().to("cpu", torch.float32).contiguous()
    out = mod.vocab_pass(
        work, _row_vec(targets, torch.int64, c, "targets"), _row_vec(is_sft, torch.bool, c, "is_sft"),
        _row_vec(advantages, torch.float32, c, "advantages"),
        _row_vec(old_logp, torch.float32, c, "old_logp"),
        None if ref_logp is None else _row_vec(ref_logp, torch.float32, c, "ref_logp"),
        _row_vec(scale, torch.float32, c, "scale"),
        float(beta), float(eps_low), float(eps_high), float(inv_temp), bool(with_grad))
    if with_grad and not direct:
        with torch.no_grad():
            logits.copy_(work)
    return out
