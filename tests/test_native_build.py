"""The native build's lock and cache checks (afrl_fast.native_build): a killed build leaves nothing that
makes later processes wait forever, a live build is waited for with a message and a time limit,
and a cached library is loaded only when it is this user's and matches its recorded hash.

cpp_extension.load is replaced by a stand-in that behaves like torch's at the point that matters
here: it takes torch's FileBaton in the build folder (a present baton would make torch wait
forever, so the stand-in fails instead) and writes the library; the real build is exercised by
tests/test_vocab_pass_native.py.
"""
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton

from afrl_fast import backends
from afrl_fast import native_build as B

SENTINEL = object()


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """Cache root under tmp_path, no module loaded yet, load() replaced (see the module docstring)."""
    monkeypatch.setenv("AFRL_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AFRL_FAST_BUILD_LOCK_TIMEOUT", "3")
    monkeypatch.setattr(B, "_module", None)
    monkeypatch.setattr(B, "_reason", None)
    calls = []

    def fake_load(name, build_directory, **_):
        baton = FileBaton(os.path.join(build_directory, B.TORCH_BATON))
        if not baton.try_acquire():
            raise AssertionError("torch's baton is present: the real load would wait on it forever")
        try:
            so = Path(build_directory) / f"{name}.so"
            calls.append({"name": name, "had_library": so.exists()})
            if not so.exists():
                so.write_bytes(b"\x7fELF built " + name.encode())
        finally:
            baton.release()
        return SENTINEL

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    build_dir = tmp_path / "cache" / "native" / f"vocab_pass_{B._build_key()}"
    return build_dir, f"afrl_fast_vocab_pass_{B._build_key()}", calls


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def hold_lock_in_child(build_dir: Path) -> subprocess.Popen:
    """A process that takes the build lock and keeps it (a build in progress)."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from afrl_fast.native_build import build_lock
        with build_lock(Path({str(build_dir)!r})):
            print("held", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_killed_build_leaves_nothing_to_wait_for(cache):
    """What a SIGKILLed first build leaves: torch's baton, our lock file and an owner record naming
    a dead pid, and no library. The next build must go ahead (not wait for the dead owner)."""
    build_dir, name, calls = cache
    build_dir.mkdir(parents=True)
    pid = dead_pid()
    (build_dir / B.TORCH_BATON).write_text("")
    (build_dir / B.BUILD_LOCK).write_text(f"{pid}\n")
    (build_dir / B.BUILD_OWNER).write_text(f"pid {pid} on this host\n")
    assert B._build() is SENTINEL
    assert calls == [{"name": name, "had_library": False}]
    assert not (build_dir / B.TORCH_BATON).exists() and not (build_dir / B.BUILD_OWNER).exists()
    recorded = (build_dir / f"{name}.so.sha256").read_text().strip()
    assert recorded == B._sha256(build_dir / f"{name}.so")


def test_the_lock_dies_with_its_holder(tmp_path):
    holder = hold_lock_in_child(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with B.build_lock(tmp_path, timeout=5):
        assert (tmp_path / B.BUILD_OWNER).read_text().startswith(f"pid {os.getpid()} ")


def test_a_live_build_is_waited_for_with_a_message_then_given_up(tmp_path, caplog):
    holder = hold_lock_in_child(tmp_path)
    try:
        with caplog.at_level(logging.WARNING, logger=B.__name__):
            with pytest.raises(RuntimeError, match=rf"waiting for .*{B.BUILD_LOCK} \(held by pid {holder.pid} "):
                with B.build_lock(tmp_path, timeout=0.6, notice_every=0.2):
                    pass
        waiting = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
        assert waiting and f"pid {holder.pid}" in waiting[0]
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()


def test_backend_unavailable_not_hung_when_the_lock_stays_held(cache, monkeypatch):
    build_dir, _, calls = cache
    build_dir.mkdir(parents=True)
    holder = hold_lock_in_child(build_dir)
    try:
        monkeypatch.setenv("AFRL_FAST_BUILD_LOCK_TIMEOUT", "0.5")
        assert B.native_available() is False
        assert "gave up after" in B.native_unavailable_reason() and calls == []
        assert backends.resolve_backend("auto", torch.device("cpu"))[0] == "torch"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()


@pytest.mark.parametrize("state", ["recorded", "no_record", "tampered"])
def test_cached_library_is_loaded_only_with_a_matching_hash(cache, state):
    build_dir, name, calls = cache
    build_dir.mkdir(parents=True)
    so = build_dir / f"{name}.so"
    so.write_bytes(b"\x7fELF cached")
    if state == "recorded":
        B.record_library_hash(build_dir, name)
    elif state == "tampered":
        B.record_library_hash(build_dir, name)
        so.write_bytes(b"\x7fELF replaced")
    assert B._build() is SENTINEL
    assert calls == [{"name": name, "had_library": state == "recorded"}]
    assert (so.read_bytes() == b"\x7fELF cached") == (state == "recorded")
    assert (build_dir / f"{name}.so.sha256").read_text().strip() == B._sha256(so)


def test_someone_elses_library_is_refused(cache, monkeypatch):
    build_dir, name, calls = cache
    build_dir.mkdir(parents=True)
    (build_dir / f"{name}.so").write_bytes(b"\x7fELF theirs")
    B.record_library_hash(build_dir, name)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(build_dir).st_uid + 1)   # we are another user now
    assert B.native_available() is False
    assert "belongs to uid" in B.native_unavailable_reason() and calls == []
