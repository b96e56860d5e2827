"""Atomic checkpoints: model, optimizer, RNG states, phase, step and data position.

A checkpoint is one file written by rank 0 to a temporary name in the same folder, flushed and
fsync'ed, then renamed over `latest.pt` (rename is atomic on POSIX), so a run killed at any instant
leaves either the previous checkpoint or the new one, never a torn file. `--resume` (run.resume=true)
loads it on every rank and the run continues from the saved phase, step and data position.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import dist as D

LATEST = "latest.pt"


def atomic_write_bytes(path: Path, write_fn) -> None:
    """Write through write_fn(file) into a temp file next to `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: Path, module, optimizer, progress: dict, info) -> None:
    """Collect full states on every rank (collective), write once from rank 0."""
    state = {
        "model": D.full_model_state(module, rank0_only=True),
        "optimizer": D.full_optimizer_state(module, optimizer) if optimizer is not None else None,
        "rng": rng_state(),
        "progress": dict(progress),
    }
    if info.is_main:
        atomic_write_bytes(Path(ckpt_dir) / LATEST, lambda f: torch.save(state, f))
    D.barrier()


def remove_stale_temp_files(folder: Path) -> None:
    """Temp files of writes a SIGKILL interrupted (the except clause above never ran for them)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def load_checkpoint(ckpt_dir: Path) -> dict | None:
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a file we did not write completely cannot exist (atomic rename)
        raise RuntimeError(f"{path}: unreadable checkpoint ({e}); delete it to start over") from None


def restore(state: dict, module, optimizer) -> dict:
    """Load model/optimizer/RNG from a checkpoint dict; returns its progress record."""
    D.load_full_model_state(module, state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        D.load_full_optimizer_state(module, optimizer, state["optimizer"])
    set_rng_state(state["rng"])
    return state["progress"]


# ----------------------------------------------------------------------------------------------
# Exported models (save_pretrained folders)


def strip_prefix(state: dict, prefix: str = "lm.") -> dict:
    """A PolicyLoss state dict with the LM's own parameter names."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def replica_of(lm, device=None):
    """An unsharded LM of the same class, config and dtype (weights still to be copied in)."""
    return type(lm)(lm.config).to(dtype=next(lm.parameters()).dtype, device=device)


def export_model(policy, tokenizer, path: Path, info, prompt=None) -> None:
    """save_pretrained of the full (unsharded) LM into `path`, replaced atomically by a rename; with
    `prompt` = (rulebook, instructions text) the folder also carries its prompt settings, so
    evaluation and serving prompt the model exactly as it was trained. Collective: every rank calls."""
    from .format import save_prompt_settings

    path = Path(path)
    state = strip_prefix(D.full_model_state(policy, rank0_only=True))
    if info.is_main:
        fresh = replica_of(policy.lm)
        fresh.load_state_dict(state)
        if getattr(policy, "compute_dtype", None) is not None:   # fp32 master weights → the model's dtype
            fresh.to(policy.compute_dtype)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if prompt is not None:
            save_prompt_settings(tmp, *prompt)
        old = path.with_name(path.name + ".old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    D.barrier()
