"""The native build system: the C++/OpenMP kernels of csrc/ (`csrc/vocab_pass.cpp`,
`csrc/distill_pass.cpp`, bindings in `csrc/module.cpp`; the package `afrl_fast_csrc`) built together into
ONE extension, on first use, with torch.utils.cpp_extension, into a per-user cache keyed by a hash of
the sources and headers, the flags, the torch/Python versions and the CPU (-march=native), so edits
rebuild and a cache shared between machines never runs code built for another CPU.

The native build runs under an OS file lock in its cache folder (released by the kernel when its
holder dies, so a killed build cannot leave a lock behind); a process waiting for another's build
says so every few seconds and gives up after AFRL_FAST_BUILD_LOCK_TIMEOUT seconds (the backend
is then unavailable and "auto" falls back to torch). A cached library is loaded only when it and
its folder belong to the current user and its SHA-256 matches the one recorded after it was
built; otherwise it is rebuilt (ours, but damaged) or refused (someone else's).

Environment:
    AFRL_FAST_NO_NATIVE=1            never build the native kernel; "auto" uses torch on CPU.
    AFRL_FAST_CACHE_DIR              cache root (default $XDG_CACHE_HOME/afrl_fast or ~/.cache/afrl_fast).
    AFRL_FAST_BUILD_LOCK_TIMEOUT     seconds to wait for another process's build (default 900).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from .resources import CSRC_DIR

log = logging.getLogger(__name__)


# Every kernel's source goes into the one extension; module.cpp holds the bindings of all of them.
_SOURCES = [CSRC_DIR / "vocab_pass.cpp", CSRC_DIR / "distill_pass.cpp", CSRC_DIR / "module.cpp"]


# Headers are not compiled on their own but change what is: they are part of the build key.
_HEADERS = [CSRC_DIR / "simd.h", CSRC_DIR / "checks.h", CSRC_DIR / "passes.h"]


# No -ffast-math: the exp's round-to-integer trick and the NaN-free -inf handling rely on IEEE
# semantics. fp-contract=fast only lets the compiler fuse a*b+c into FMAs.
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-Wno-class-memaccess"]


_LDFLAGS = ["-fopenmp"]


NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # what the kernel reads and writes directly


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
    for src in (*_SOURCES, *_HEADERS):
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
    missing = [str(src) for src in (*_SOURCES, *_HEADERS) if not src.is_file()]
    if missing:
        return f"sources not found: {missing}"
    return None


BUILD_LOCK = "afrl_build.lock"        # flock'ed by the process that builds or loads


BUILD_OWNER = "afrl_build.owner"      # who holds it, for the waiting message


TORCH_BATON = "lock"                  # torch.utils.cpp_extension's own lock file in the build folder


DEFAULT_LOCK_TIMEOUT_S = 900.0        # a build takes about a minute; 15 min of waiting means a problem


LOCK_NOTICE_EVERY_S = 10.0


def _lock_timeout() -> float:
    try:
        return float(os.environ.get("AFRL_FAST_BUILD_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S))
    except ValueError:
        return DEFAULT_LOCK_TIMEOUT_S


@contextlib.contextmanager
def build_lock(build_dir: Path, timeout: float | None = None, notice_every: float = LOCK_NOTICE_EVERY_S):
    """Hold the build folder's lock: an OS file lock (flock via `filelock`), which the kernel drops
    when its holder dies, so a killed build leaves nothing stale. torch's own lock file, which a
    killed build does leave (and on which every later torch build waits forever), is removed while
    we hold ours: every build of this folder goes through this lock first. RuntimeError after
    `timeout` seconds of waiting; a log line every `notice_every` seconds until then."""
    from filelock import FileLock, Timeout

    timeout = _lock_timeout() if timeout is None else timeout
    lock, owner = FileLock(str(build_dir / BUILD_LOCK)), build_dir / BUILD_OWNER
    start = time.monotonic()
    while True:
        waited = time.monotonic() - start
        try:
            lock.acquire(timeout=max(0.0, min(notice_every, timeout - waited)), poll_interval=0.05)
            break
        except Timeout:
            waited = time.monotonic() - start
            holder = _read_text(owner) or "another process"
            if waited >= timeout:
                raise RuntimeError(f"gave up after {waited:.0f} s waiting for {build_dir / BUILD_LOCK} (held by "
                                   f"{holder}); raise AFRL_FAST_BUILD_LOCK_TIMEOUT if that build is still running")
            log.warning("afrl_fast: waiting %.0f s for the native kernel build in %s (held by %s; gives up after "
                        "%.0f s)", waited, build_dir, holder, timeout)
    try:
        owner.write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
        baton = build_dir / TORCH_BATON
        if baton.exists():
            log.warning("afrl_fast: removing %s, left behind by an interrupted build", baton)
            baton.unlink(missing_ok=True)
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_cached_library(build_dir: Path, name: str) -> None:
    """Before anything in build_dir is imported: the folder and the cached library must belong to
    this user (RuntimeError otherwise: code someone else can replace is never loaded), and the
    library must match the SHA-256 recorded when it was built (otherwise it is deleted, so the
    build relinks it: a library a killed link left half-written has no record)."""
    so, digest = build_dir / f"{name}.so", build_dir / f"{name}.so.sha256"
    uid = os.getuid()
    for path in (build_dir, so, digest):
        if path.exists() and path.stat().st_uid != uid:
            raise RuntimeError(f"{path} belongs to uid {path.stat().st_uid}, not to this user ({uid}); refusing to "
                               "load code another user can replace (set AFRL_FAST_CACHE_DIR to a folder of your own)")
    if build_dir.stat().st_mode & 0o022:
        os.chmod(build_dir, 0o700)      # ours, but others could swap files in it
    if so.exists() and _read_text(digest) != _sha256(so):
        log.warning("afrl_fast: %s %s; rebuilding it", so,
                    "does not match its recorded SHA-256" if digest.exists() else "has no recorded SHA-256")
        so.unlink()
        digest.unlink(missing_ok=True)


def record_library_hash(build_dir: Path, name: str) -> None:
    so = build_dir / f"{name}.so"
    if so.exists():
        tmp = build_dir / f".{name}.so.sha256.tmp"
        tmp.write_text(_sha256(so) + "\n")
        os.replace(tmp, build_dir / f"{name}.so.sha256")


def _build():
    from torch.utils import cpp_extension

    cpp_extension.verify_ninja_availability()
    key = _build_key()
    build_dir = _cache_root() / "native" / f"vocab_pass_{key}"
    build_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The key is in the module name too, so two versions can coexist in one process.
    name = f"afrl_fast_vocab_pass_{key}"
    with build_lock(build_dir):
        check_cached_library(build_dir, name)
        module = cpp_extension.load(
            name=name, sources=[str(s) for s in _SOURCES],
            extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS, build_directory=str(build_dir),
            verbose=False)
        record_library_hash(build_dir, name)
    return module


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
                log.warning("afrl_fast native kernels unavailable (%s); using the torch path. "
                            "Details: afrl_fast.native_build.native_unavailable_reason()",
                            _summary(_reason))
    return _module


def native_available() -> bool:
    """True when the extension is built (building it now if needed). Never raises."""
    return _load() is not None


def native_unavailable_reason() -> str:
    """Why native_available() is False ('' when it is True)."""
    _load()
    return _reason or ""


def row_vector(t, dtype, c, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"native kernel: {name} must be a tensor, got {type(t).__name__}")
    t = t.detach()
    if t.dim() == 0 and c is not None:
        t = t.expand(c)
    return t.to(device="cpu", dtype=dtype).contiguous()


def native_module():
    """The built extension, building it now if needed; RuntimeError naming why when it is unavailable."""
    module = _load()
    if module is None:
        raise RuntimeError(f"afrl_fast native kernels unavailable: {_reason}")
    return module


def unavailable_summary() -> str:
    """One line of why the build failed ('' when it did not)."""
    return _summary(_reason or "")
