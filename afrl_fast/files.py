"""Files that are never seen half-written, and output paths checked before any work starts.

Every module that writes a result (checkpoints, data splits, metrics, reports) goes through here, so
a run killed at any instant leaves either the old file or the new one, never a torn one. Nothing here
imports torch: the light command-line tools write through it too.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, write_fn) -> None:
    """Write through write_fn(file) into a temp file next to `path`, fsync, then rename over it."""
    atomic_write_many({path: write_fn})


def atomic_write_many(writes: dict) -> None:
    """{path: write_fn(file)}: every file is written and fsync'ed to a temp name next to its path
    first, and only when all of them succeeded are they renamed into place, so a failure in any
    leaves none of them (a synthetic data set is all its splits or nothing). The files get the
    usual mode (0666 less the umask), not mkstemp's 0600."""
    temps = []
    try:
        for path, write_fn in writes.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                write_fn(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask is a set-and-get,
    racy in a threaded trainer)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def check_output_path(path, error=ValueError, kind: str = "file") -> Path:
    """Fail early (before any work) with `error`, one line, when `path` cannot be written: it is a
    directory (kind "file") or a file (kind "dir"), a parent is a file, or the nearest existing
    folder cannot be written (probed with a temp file, which also catches read-only mounts and
    permissions that os.access misjudges for root). Creates nothing that stays."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise error(f"{path}: is a directory; give a file name for the output")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise error(f"{path}: exists and is not a directory; give a folder for the output")
    folder = path if kind == "dir" else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise error(f"{path}: cannot be created, {folder} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".afrl-write-probe.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise error(f"{path}: cannot write in {folder} ({e.strerror or e})") from None
    return path


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def atomic_copy(src: Path, dst: Path) -> None:
    """`src`'s bytes into `dst`, atomically (a reader never sees half a file)."""
    def copy(f):
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f)
    atomic_write_bytes(dst, copy)
