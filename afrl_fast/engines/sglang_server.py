"""The SGLang server process of one engine group: the supported versions, where the group's server
runs, how it is launched, stopped and asked for GPU memory, and the run folder every node's servers
start from. (The engine that drives it: afrl_fast.engines.sglang.)"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.distributed as dist
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from .. import dist as D
from ..errors import ConfigError

log = logging.getLogger("afrl_fast")

SGLANG_SPEC = ">=0.5.21,<0.5.24"


class SGLangError(RuntimeError):
    """SGLang refused or failed an operation; one line with its message."""


# ----------------------------------------------------------------------------------------------
# Version guard
# ----------------------------------------------------------------------------------------------

def check_sglang_version(installed: str | None = None) -> str:
    """The installed SGLang version, or a one-line error when it is missing or outside SGLANG_SPEC."""

    if installed is None:
        try:
            installed = version("sglang")
        except PackageNotFoundError:
            raise SGLangError("SGLang is not installed: pip install 'afrl-fast[sglang]' on a GPU machine; "
                              "the embedded engine runs everywhere") from None
    try:
        ok = Version(installed) in SpecifierSet(SGLANG_SPEC)
    except InvalidVersion:
        ok = False
    if not ok:
        raise SGLangError(f"SGLang {installed} is not supported: this trainer is checked against sglang{SGLANG_SPEC} "
                          "(weight-update sessions, per-request seeds, transformers >= 5); "
                          "pip install 'afrl-fast[sglang]'")
    return installed


# ----------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    group: int           # engine group index on this node
    leader: int          # global rank that owns the server
    is_leader: bool
    base_gpu_id: int     # first GPU of the group on this node
    port: int


def placement(rank: int, local_rank: int, local_world: int, tp_size: int, base_port: int) -> Placement:
    """Engine groups are `tp_size` consecutive ranks of one node."""
    if tp_size < 1 or local_world % tp_size:
        raise SGLangError(f"rl.sglang.tp_size={tp_size} must divide the {local_world} ranks (GPUs) per node")
    group = local_rank // tp_size
    leader_local = group * tp_size
    return Placement(group=group, leader=rank - (local_rank - leader_local), is_leader=local_rank == leader_local,
                     base_gpu_id=leader_local, port=base_port + group)


def launch_command(model_path: str, settings, place: Placement, seed: int) -> list[str]:
    """`python -m sglang.launch_server ...` for one engine group."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), "--host", "127.0.0.1",
           "--port", str(place.port), "--tp-size", str(settings.tp_size), "--base-gpu-id", str(place.base_gpu_id),
           "--mem-fraction-static", str(settings.mem_fraction_static), "--dtype", settings.dtype,
           "--random-seed", str(seed), "--enable-deterministic-inference", "--skip-tokenizer-init"]
    if settings.enable_memory_saver:
        cmd.append("--enable-memory-saver")
    return cmd + list(settings.extra_args)


def gpu_memory(stage: str, empty: bool = True) -> tuple[int, int] | None:
    """Before SGLang takes memory on this rank's GPU: wait for the GPU's work, let CUDA-IPC blocks the
    server has let go of return to the allocator, and hand PyTorch's cached blocks back to the driver
    (`empty=True`); then log the GPU's free memory. (free, total) in bytes; None without CUDA (nothing
    to free: the calls are skipped, and CUDA is not initialised by them)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    if empty:
        torch.cuda.synchronize()
        torch.cuda.ipc_collect()
        torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    log.info("SGLang %s: cuda:%d has %.2f GiB free of %.2f GiB", stage, torch.cuda.current_device(),
             free / 2 ** 30, total / 2 ** 30)
    return free, total


# ----------------------------------------------------------------------------------------------
# The run folder every node's servers start from
# ----------------------------------------------------------------------------------------------

SHARED_MARK = ".shared_check"


def check_shared_run_dir(run_dir, *, all_gather=None, rank: int | None = None, host: str | None = None,
                         wait_s: float = 15.0) -> None:
    """Every rank sees the run folder rank 0 writes (collective: every rank calls it at start).

    Only rank 0 exports the model the SGLang servers start from (`run.out_dir/engine_init`), and the
    leader of every engine group, on every node, launches its server from it; a run folder that is
    node-local (or a relative path under another working folder) would fail hours later, after SFT.
    Rank 0 writes a random token into the folder, every rank reads it back; otherwise one ConfigError
    line, on every rank, names the ranks and hosts that cannot see it. A rank that does not see the
    token at once looks again for `wait_s` (a network filesystem may cache the folder's listing)."""

    if all_gather is None:

        if not D.is_distributed():
            return
        all_gather = D.all_gather_objects
    if rank is None:

        rank = dist.get_rank()
    host = host or socket.gethostname()
    mark = Path(run_dir) / SHARED_MARK
    token = None
    if rank == 0:
        token = uuid.uuid4().hex
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text(token)
    token = all_gather(token)[0]               # rank 0 wrote it before it joined the gather
    deadline = time.monotonic() + wait_s
    while True:
        try:
            seen = mark.read_text() == token
        except OSError:
            seen = False
        if seen or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    results = all_gather((rank, host, str(mark.parent.resolve()), seen, str(run_dir)))
    if rank == 0:
        mark.unlink(missing_ok=True)           # every rank has read it: the gather above returned
    blind = [r for r in results if not r[3]]
    if blind:                                  # the same line on every rank: rank 0's names for the folder
        where = ", ".join(f"rank {r[0]} on {r[1]} ({r[2]})" for r in blind[:4]) + (" ..." if len(blind) > 4 else "")
        raise ConfigError(f"run.out_dir={results[0][4]} is not one folder every node shares: {where} cannot see "
                          f"what rank 0 on {results[0][1]} wrote in {results[0][2]}; every node's SGLang server starts "
                          "from the model rank 0 exports there (engine_init), so put run.out_dir on a shared "
                          "filesystem, as an absolute path")


# ----------------------------------------------------------------------------------------------
# The server and the engine
# ----------------------------------------------------------------------------------------------

class SGLangServer:
    """`python -m sglang.launch_server` in its own session (so ending it ends only its processes)."""

    def __init__(self, cmd: list[str], url: str, log_path, timeout_s: float):
        import httpx

        self.url = url
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SGLangError(f"the SGLang server exited with code {self.proc.returncode} at start-up; "
                                  f"see {log_path}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        self.shutdown()
        raise SGLangError(f"the SGLang server at {url} did not answer /health within {timeout_s:.0f} s; see {log_path}")

    def shutdown(self, grace_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def error_text(resp) -> str:
    """SGLang's message in a failed answer, whichever shape it has: `{"success": false, "message": ...}`
    (weight updates, sessions), `{"error": {"message": ...}}` (/generate, release, resume),
    `{"error": "..."}` (a /generate body its schema refuses), FastAPI's `{"detail": ...}`, or plain
    text (a failed /flush_cache). One line, at most 300 characters."""
    data = None
    if resp.headers.get("content-type", "").startswith("application/json"):
        try:
            data = resp.json()
        except ValueError:
            data = None
    message = None
    if isinstance(data, Mapping):
        error = data.get("error")
        if isinstance(error, Mapping):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        message = message or data.get("message") or data.get("detail")
        message = message or json.dumps(data)
    if message is None:
        message = resp.text or resp.reason_phrase or "(no message)"
    return " ".join(str(message).split())[:300]


def check_model_visible(model_path: str) -> None:
    """The leader's one-line error when the exported model is not there on its node."""
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise SGLangError(f"{model_path}: no exported model here on host {socket.gethostname()}, so SGLang cannot "
                          "start from it; rank 0 exports it into run.out_dir, which must be one folder every node "
                          "shares")
