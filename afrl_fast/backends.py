"""The backends of the per-chunk kernels of the fused losses, in one place, and the dispatch that
picks one.

Two kernels, each with one function per backend (contracts in `afrl_fast.loss`'s docstrings and,
in float64, `afrl_fast_kernels.reference`):

    "vocab_pass"    the GRPO/SFT vocabulary pass of `fused_loss`
    "distill_pass"  the teacher–student pass of `fused_distill_loss`

    "torch"   `vocab_pass_torch` / `distill_pass_torch` below: plain torch in row blocks, any device;
              float64 inputs give the exact checking path.
    "native"  the C++/OpenMP kernels `csrc/vocab_pass.cpp` and `csrc/distill_pass.cpp`, built together
              into ONE extension (bindings in `csrc/module.cpp`; the package `afrl_fast_csrc`),
              compiled on first use with torch.utils.cpp_extension into a per-user cache keyed by a hash
              of the sources and headers, the flags, the torch/Python versions and the CPU
              (-march=native), so edits rebuild and a cache shared between machines never runs code
              built for another CPU.
    "triton"  `afrl_fast_kernels.<kernel>.<kernel>_triton`, CUDA (or CPU under TRITON_INTERPRET=1).
    "auto"    CUDA → triton; CPU → native if it builds, else torch.

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
import importlib
import logging
import math
import os
import platform
import shutil
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from afrl_fast_kernels.constants import DISTILL_KINDS, IGNORE_INDEX

from .resources import CSRC_DIR

BACKENDS = ("auto", "torch", "native", "triton")
KERNELS = ("vocab_pass", "distill_pass")
VocabPass = Callable[..., tuple]

# The torch vocab pass walks a chunk in row blocks of this many fp32 bytes: its one [rows, V]
# temporary (the exponentials) stays 1/8 of a chunk, while blocks stay big enough that the ~10
# parallel ops per block amortise their thread barriers (8 MiB blocks measured 3x slower on 2 cores).
TORCH_BLOCK_BYTES = {"cpu": 32 * 2**20, "cuda": 64 * 2**20}


# ----------------------------------------------------------------------------------------------
# Per-row scalars: the loss and its derivative w.r.t. log p


def rowwise_terms(logp, valid, is_sft, advantages, old_logp, ref_logp, scale, beta, eps_low, eps_high):
    """(scale·L, c = scale·dL/dlog p, clipped, k3) for a block of rows, fp32.

    clipped and k3 are False/0 outside valid RL rows; row_loss and c are 0 on ignored rows. old_logp
    None is on-policy: old is log p itself, so the ratio is exactly 1 (its slope stays that of log p)."""
    ratio = torch.ones_like(logp) if old_logp is None else torch.exp(logp - old_logp)
    adv = advantages
    pg = -torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    # The clamped branch is the min exactly when the ratio left the trust region on the side the
    # advantage pushes towards; there the clamp is flat, so the policy-gradient term has slope 0.
    clipped = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps_low))
    dpg = torch.where(clipped, torch.zeros_like(ratio), -adv * ratio)
    if ref_logp is not None:
        delta = ref_logp - logp
        exp_delta = torch.exp(delta)
        k3 = exp_delta - delta - 1.0
        dk3 = 1.0 - exp_delta                     # d k3 / d log p
        rl_loss, drl = pg + beta * k3, dpg + beta * dk3
    else:
        k3 = torch.zeros_like(logp)
        rl_loss, drl = pg, dpg
    loss = torch.where(is_sft, -logp, rl_loss)
    dloss = torch.where(is_sft, torch.full_like(logp, -1.0), drl)
    zero = torch.zeros_like(logp)
    rl_valid = valid & ~is_sft
    return (torch.where(valid, scale * loss, zero), torch.where(valid, scale * dloss, zero),
            clipped & rl_valid, torch.where(rl_valid, k3, zero))


# ----------------------------------------------------------------------------------------------
# The torch backend of the vocab pass


def _block_rows(n_cols: int, device: torch.device) -> int:
    budget = TORCH_BLOCK_BYTES.get(device.type, TORCH_BLOCK_BYTES["cuda"])
    return max(1, budget // (4 * n_cols))


def vocab_pass_torch(logits, targets, is_sft, advantages, old_logp, ref_logp, scale,
                     beta, eps_low, eps_high, inv_temp, with_grad):
    """Vocab pass in plain torch (fp32 math). See the module docstring for the contract.

    Per row block x (raw logits):  m = max x,  u = (x − m)·t,  e = exp(u),  S = Σ e
        log p = u_y − log S      entropy = log S − Σ e·u / S      (shift by m: exact at |x| ~ 1e4)
        grad  = c·t·(onehot(y) − e/S), written over x,
    with t = inv_temp on RL rows and 1 on SFT rows (SFT rows are plain cross-entropy).
    A NaN or +inf logit makes S NaN, so the row's outputs and gradient are NaN (as in the float64
    reference); ignored rows get a zero gradient row whatever their logits hold.
    """
    n_rows, n_cols = logits.shape
    dev = logits.device
    f32 = torch.float64 if logits.dtype == torch.float64 else torch.float32   # float64: the exact test path
    row_loss = torch.zeros(n_rows, dtype=f32, device=dev)
    logp = torch.zeros(n_rows, dtype=f32, device=dev)
    entropy = torch.zeros(n_rows, dtype=f32, device=dev)
    clipped = torch.zeros(n_rows, dtype=torch.bool, device=dev)
    k3 = torch.zeros(n_rows, dtype=f32, device=dev)
    valid = targets != IGNORE_INDEX
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))[:, None]
    # Ignored rows' gradient rows are zeroed explicitly: 0·exp(NaN logit) would be NaN.
    ignored = (~valid).nonzero().squeeze(1) if with_grad else None
    rows = min(_block_rows(n_cols, dev), n_rows)
    exps = torch.empty(rows, n_cols, dtype=f32, device=dev)      # the one block-sized temporary
    for r0 in range(0, n_rows, rows):
        r1 = min(r0 + rows, n_rows)
        x = logits[r0:r1]
        u = x if x.dtype == f32 else x.float()                    # fp32 math for bf16 logits
        e = exps[: r1 - r0]
        u.sub_(u.amax(dim=1, keepdim=True))
        t = None
        if inv_temp != 1.0:
            t = torch.where(is_sft[r0:r1], torch.ones((), dtype=f32, device=dev),
                            torch.full((), inv_temp, dtype=f32, device=dev))
            u.mul_(t[:, None])
        u_y = u.gather(1, safe_t[r0:r1]).squeeze(1)
        torch.exp(u, out=e)
        sum_e = e.sum(dim=1)
        # u is not needed after Σ e·u (the gradient needs only e and S): multiply in place rather
        # than allocate a third [rows, V] array. nansum: a −inf logit gives (−inf)·0 = NaN where
        # its term is 0 (p log p → 0); any real NaN (a NaN or +inf logit) already made sum_e NaN.
        sum_eu = u.mul_(e).nansum(dim=1)
        log_s = torch.log(sum_e)
        v = valid[r0:r1]
        lp = torch.where(v, u_y - log_s, torch.zeros_like(log_s))
        logp[r0:r1] = lp
        entropy[r0:r1] = torch.where(v, log_s - sum_eu / sum_e, torch.zeros_like(log_s))
        rl, c, clp, kk = rowwise_terms(lp, v, is_sft[r0:r1], advantages[r0:r1],
                                       None if old_logp is None else old_logp[r0:r1],
                                       None if ref_logp is None else ref_logp[r0:r1],
                                       scale[r0:r1], beta, eps_low, eps_high)
        row_loss[r0:r1], clipped[r0:r1], k3[r0:r1] = rl, clp, kk
        if with_grad:
            c = c if t is None else c * t
            # x ← −c·p (p = e/S), then +c at the target; ignored rows have c = 0 → a zero row.
            torch.mul(e, (-c / sum_e)[:, None], out=u)
            u.scatter_add_(1, safe_t[r0:r1], c[:, None])
            if len(ignored):
                block = ignored[(ignored >= r0) & (ignored < r1)] - r0
                u.index_fill_(0, block, 0.0)
            if u is not x:
                x.copy_(u)
    return row_loss, logp, entropy, clipped, k3


# ----------------------------------------------------------------------------------------------
# The torch backend of the distill pass


def _check_kind(kind, beta):
    if kind not in DISTILL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(DISTILL_KINDS)}, got {kind!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for kind='jsd', got {beta!r}")


def _log_softmax_into(x, inv_temp, log_out, p_out):
    """log_out ← log_softmax(x·inv_temp), p_out ← its softmax, in the given buffers (no temporaries
    of the block's size): shift by the row max, exponentiate, subtract the log of the row sum."""
    torch.mul(x, inv_temp, out=log_out)
    log_out.sub_(log_out.amax(dim=1, keepdim=True))
    torch.exp(log_out, out=p_out)
    total = p_out.sum(dim=1, keepdim=True)
    log_out.sub_(total.log())
    p_out.div_(total)


def _masked_kl(p, log_p, log_q, scratch):
    """Σ p·(log p − log q) per row with 0·log(0/q) = 0; "p == 0" rather than "p > 0" so NaN stays."""
    torch.sub(log_p, log_q, out=scratch).mul_(p)
    return scratch.masked_fill_(p == 0, 0.0).sum(1)


def distill_pass_torch(student_logits, teacher_logits, targets, coef, ce_coef, kind, beta, inv_temp, with_grad):
    """Distill pass in plain torch (fp32 math; float64 inputs: float64). Contract: afrl_fast.loss.

    Per row block: log Q = log_softmax(z_s·τ⁻¹), log P = log_softmax(z_t·τ⁻¹), D from them (jsd:
    log M = logaddexp(log β + log P, log(1−β) + log Q), exact where β·P underflows), CE from
    log_softmax(z_s); then z_s ← coef·τ⁻¹·dD/du + ce_coef·(softmax(z_s) − onehot(y)). A row whose D is
    NaN (a NaN or +inf logit) gets an all-NaN gradient row, as in the float64 reference; ignored rows
    get zeros whatever their logits hold. teacher_logits is only read. Six block buffers are
    allocated once and reused by every block (fresh per-block temporaries of several MB each stay
    resident in the allocator's heap and showed as 2× the chunk's memory).
    """
    _check_kind(kind, beta)
    n_rows, n_cols = student_logits.shape
    dev = student_logits.device
    f32 = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    div = torch.zeros(n_rows, dtype=f32, device=dev)
    ce = torch.zeros(n_rows, dtype=f32, device=dev)
    valid = targets != IGNORE_INDEX
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))[:, None]
    zero = torch.zeros((), dtype=f32, device=dev)
    coef = coef.to(f32)
    # Six buffers of a quarter of the vocab pass's block: 1.5 of its blocks in all.
    rows = min(max(1, _block_rows(n_cols, dev) // 4), n_rows)
    bufs = torch.empty(6, rows, n_cols, dtype=f32, device=dev)
    for r0 in range(0, n_rows, rows):
        r1 = min(r0 + rows, n_rows)
        x = student_logits[r0:r1]
        v = valid[r0:r1]
        log_q, log_p, q, p, e, f = (b[: r1 - r0] for b in bufs)
        _log_softmax_into(x, inv_temp, log_q, q)
        _log_softmax_into(teacher_logits[r0:r1], inv_temp, log_p, p)
        if kind == "forward_kl":
            d = _masked_kl(p, log_p, log_q, e)
            du = torch.sub(q, p, out=e)
        elif kind == "reverse_kl":
            d = _masked_kl(q, log_q, log_p, e)
            du = torch.sub(log_q, log_p, out=e).sub_(d[:, None]).mul_(q).masked_fill_(q == 0, 0.0)
        else:
            log_m = torch.logaddexp(torch.add(log_p, math.log(beta), out=e), torch.add(log_q, math.log1p(-beta), out=f),
                                    out=e)
            kl_q = _masked_kl(q, log_q, log_m, f)
            d = beta * _masked_kl(p, log_p, log_m, f) + (1 - beta) * kl_q
            du = torch.sub(log_q, log_m, out=f).sub_(kl_q[:, None]).mul_(q).mul_(1 - beta).masked_fill_(q == 0, 0.0)
        if inv_temp == 1.0:
            log_q1, q1 = log_q, q
        else:                                       # the CE at τ = 1, in the teacher's spent buffers
            log_q1, q1 = log_p, p
            _log_softmax_into(x, 1.0, log_q1, q1)
        div[r0:r1] = torch.where(v, d, zero)
        ce[r0:r1] = torch.where(v, -log_q1.gather(1, safe_t[r0:r1]).squeeze(1), zero)
        if with_grad:
            g = du.mul_((coef[r0:r1] * inv_temp)[:, None])
            if ce_coef:
                g.add_(q1, alpha=ce_coef).scatter_add_(
                    1, safe_t[r0:r1], torch.full((r1 - r0, 1), -float(ce_coef), dtype=f32, device=dev))
            g.masked_fill_(d.isnan()[:, None], float("nan"))
            g.masked_fill_(~v[:, None], 0.0)
            x.copy_(g)
    return div, ce


# ----------------------------------------------------------------------------------------------
# The native backend: csrc/*.cpp, one extension built on first use

log = logging.getLogger(__name__)

# Every kernel's source goes into the one extension; module.cpp holds the bindings of all of them.
_SOURCES = [CSRC_DIR / "vocab_pass.cpp", CSRC_DIR / "distill_pass.cpp", CSRC_DIR / "module.cpp"]
# Headers are not compiled on their own but change what is: they are part of the build key.
_HEADERS = [CSRC_DIR / "simd.h", CSRC_DIR / "checks.h", CSRC_DIR / "passes.h"]
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
                            "Details: afrl_fast.backends.native_unavailable_reason()",
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
    """(row_loss, logp, entropy, clipped, k3) for a chunk of raw logits [C, V] (the contract above).

    float32 and bfloat16 logits are processed in place by the kernel; any other dtype, or
    non-contiguous logits, go through a float32 copy whose gradient is copied back (when
    with_grad). Per-row inputs are converted to the kernel's dtypes (scalars broadcast).
    Raises RuntimeError when the extension is unavailable.
    """
    mod = _load()
    if mod is None:
        raise RuntimeError(f"afrl_fast native kernels unavailable: {_reason}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("vocab_pass_native: logits must be a 2-D tensor [C, V]")
    c = logits.shape[0]
    direct = logits.dtype in _NATIVE_DTYPES and logits.is_contiguous() and logits.device.type == "cpu"
    work = logits.detach() if direct else logits.detach().to("cpu", torch.float32).contiguous()
    out = mod.vocab_pass(
        work, _row_vec(targets, torch.int64, c, "targets"), _row_vec(is_sft, torch.bool, c, "is_sft"),
        _row_vec(advantages, torch.float32, c, "advantages"),
        None if old_logp is None else _row_vec(old_logp, torch.float32, c, "old_logp"),
        None if ref_logp is None else _row_vec(ref_logp, torch.float32, c, "ref_logp"),
        _row_vec(scale, torch.float32, c, "scale"),
        float(beta), float(eps_low), float(eps_high), float(inv_temp), bool(with_grad))
    if with_grad and not direct:
        with torch.no_grad():
            logits.copy_(work)
    return out


def distill_pass_native(student_logits, teacher_logits, targets, coef, ce_coef, kind, beta, inv_temp, with_grad):
    """(div [C] f32, ce [C] f32) for a chunk of raw student and teacher logits [C, V] (the contract of
    `distill_pass_torch`). float32 contiguous CPU student logits are processed in place; any other
    student dtype or layout goes through a float32 copy whose gradient is copied back (when
    with_grad); the teacher's are read from a float32 contiguous view or copy. Raises RuntimeError
    when the extension is unavailable."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"afrl_fast native kernels unavailable: {_reason}")
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"distill_pass_native: {name} must be a 2-D tensor [C, V]")
    _check_kind(kind, beta)
    c = student_logits.shape[0]
    direct = (student_logits.dtype == torch.float32 and student_logits.is_contiguous()
              and student_logits.device.type == "cpu")
    work = student_logits.detach() if direct else student_logits.detach().to("cpu", torch.float32).contiguous()
    teacher = teacher_logits.detach().to("cpu", torch.float32).contiguous()
    out = mod.distill_pass(work, teacher, _row_vec(targets, torch.int64, c, "targets"),
                           _row_vec(coef, torch.float32, c, "coef"), float(ce_coef), DISTILL_KINDS.index(kind),
                           float(beta), float(inv_temp), bool(with_grad))
    if with_grad and not direct:
        with torch.no_grad():
            student_logits.copy_(work)
    return out


# ----------------------------------------------------------------------------------------------
# Backend dispatch

_TORCH = {"vocab_pass": vocab_pass_torch, "distill_pass": distill_pass_torch}
_NATIVE = {"vocab_pass": vocab_pass_native, "distill_pass": distill_pass_native}


def _native_kernel(kernel: str) -> VocabPass:
    if not native_available():
        raise RuntimeError("backend 'native' is unavailable: the C++ kernels in csrc/ did not build "
                           f"on this machine ({_summary(_reason or '')}; full log: "
                           "afrl_fast.backends.native_unavailable_reason())")
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
