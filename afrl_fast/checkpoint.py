"""Atomic checkpoints: model, optimizer, RNG states, phase, step and data position.

A checkpoint is one file written by rank 0 to a temporary name in the same folder, flushed and
fsync'ed, then renamed over `latest.pt` (rename is atomic on POSIX), so a run killed at any instant
leaves either the previous checkpoint or the new one, never a torn file. `--resume` (run.resume=true)
loads it on every rank and the run continues from the saved phase, step and data position.

A checkpoint holds only tensors and plain containers (dict, list, tuple, str, int, float, bool,
None): the RNG states are stored as tensors and lists, and `load_checkpoint` reads with
`torch.load(weights_only=True)`, so a crafted `latest.pt` cannot run code on `--resume`. A file
that is truncated, is not a checkpoint, or carries other Python objects is refused with one line
(CheckpointError, reported by the trainer like a config error: exit code 2).
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import dist as D
from .errors import ConfigError
from .files import atomic_write_bytes
from .format import save_prompt_settings

LATEST = "latest.pt"
CHECKPOINT_KEYS = ("model", "optimizer", "rng", "progress")
PLAIN_SCALARS = (str, int, float, bool, type(None))


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from; one line naming the file. A ConfigError, so the
    trainer reports it like any other bad run input (exit code 2)."""


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain lists (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": int(version), "state": list(py_state), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_plain(obj, where: str = "checkpoint"):
    """obj with numpy scalars/arrays turned into Python numbers/tensors; anything else that is not
    a tensor or a plain container is a TypeError naming its key path (caught at save time, not
    as an unloadable file at resume time)."""
    if isinstance(obj, np.generic):     # before the scalars: np.float64 is a float subclass
        return obj.item()
    if isinstance(obj, torch.Tensor) or type(obj) in PLAIN_SCALARS:
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: a {type(obj).__name__} cannot go into a checkpoint (only tensors and "
                    "plain containers load with weights_only=True)")


def save_checkpoint(ckpt_dir: Path, module, optimizer, progress: dict, info) -> None:
    """Collect full states on every rank (collective), write once from rank 0."""
    state = {
        "model": D.full_model_state(module, rank0_only=True),
        "optimizer": D.full_optimizer_state(module, optimizer) if optimizer is not None else None,
        "rng": rng_state(),
        "progress": dict(progress),
    }
    if info.is_main:
        state = to_plain(state)
        atomic_write_bytes(Path(ckpt_dir) / LATEST, lambda f: torch.save(state, f))
    D.barrier()


def remove_stale_temp_files(folder: Path) -> None:
    """Temp files of writes a SIGKILL interrupted (the except clause above never ran for them)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def load_checkpoint(ckpt_dir: Path) -> dict | None:
    """The checkpoint in ckpt_dir, None when there is none; CheckpointError (one line) when the
    file is truncated, not a checkpoint, or holds anything but tensors and plain containers."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    hint = "delete it to start the run over"
    # torch.save writes a zip archive whose directory is at the end: a cut-off file has none
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: unreadable checkpoint: not a complete torch.save archive "
                              f"(truncated, empty or another kind of file); {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: refused: the checkpoint holds Python objects other than tensors and "
                              "plain containers, which could run code when loaded (a file not written by this "
                              f"version of afrl-fast); {hint}") from None
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {first_line(e)}); "
                              f"{hint}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if not missing:
        rng = state["rng"]
        missing = [f"rng.{k}" for k in ("torch", "numpy", "python") if not isinstance(rng, dict) or k not in rng]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this trainer (missing {', '.join(missing)}); {hint}")
    return state


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
