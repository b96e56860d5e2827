"""The run folder that train.py and distill.py write: checked before any work, then made, locked for the
run's lifetime and cleared (--overwrite) or tidied (--resume); and the check that a run's inputs do not
live inside what it rewrites (that a resumed run is the same run: config.check_same_config).
"""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from .checkpoint import LATEST, remove_stale_temp_files
from .errors import ConfigError
from .files import check_output_path
from .observe import check_run_log

RUN_ARTIFACTS = ("checkpoints", "difficulty.parquet", "sft_model", "final_model", "engine_init", "rollouts",
                 "tensorboard", "plots", "metrics.jsonl", "results.json")


LOCK_FILE = ".run.lock"


def lock_run_dir(run_dir: Path):
    """An exclusive lock on the run folder for this run's lifetime (rank 0 holds it). flock dies with
    its process, so a killed run leaves no stale lock behind."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "?"
        f.close()
        raise ConfigError(f"{run_dir}: another run is using this folder (pid {owner}); wait for it to end "
                          "or choose another run.out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def existing_artifacts(run_dir: Path, names=RUN_ARTIFACTS) -> list[str]:
    return [name for name in names if (run_dir / name).exists() or (run_dir / name).is_symlink()]


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, names=RUN_ARTIFACTS,
                  inputs: dict | None = None) -> None:
    """The one check of a run folder (train.py and distill.py), before anything is read, made or
    removed; it creates nothing. Refused, with one line: run.out_dir that is a file or cannot be
    written; a folder holding a run without --resume or --overwrite; --resume without a checkpoint
    or with a damaged metrics.jsonl; an input (`inputs`: config key -> path) that lies inside an
    artifact of the run (`names`), which --overwrite removes and the run rewrites (paths resolved,
    symlinks followed)."""
    check_output_path(run_dir, ConfigError, kind="dir")
    found = existing_artifacts(run_dir, names)
    if found and not resume and not overwrite:
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(found[:4])}); continue it with --resume, "
                          "start a new one with run.out_dir=..., or replace it with --overwrite")
    if resume and not (run_dir / "checkpoints" / LATEST).is_file():
        raise ConfigError(f"{run_dir}: --resume, but there is no checkpoint to resume ({run_dir}/checkpoints/"
                          f"{LATEST}); drop --resume to start a new run")
    for key, value in (inputs or {}).items():
        where = Path(value).expanduser().resolve()
        for name in names:
            artifact = (run_dir / name).resolve()
            if where == artifact or artifact in where.parents:
                does = "--overwrite removes" if overwrite else "this run rewrites"
                raise ConfigError(f"{key}={value} lies inside {run_dir / name}, which {does}; copy it out of the "
                                  "run folder first, or choose another run.out_dir")
    if resume:
        check_run_log(run_dir / "metrics.jsonl")


def open_run_dir(run_dir: Path, resume: bool, overwrite: bool, names=RUN_ARTIFACTS, inputs: dict | None = None):
    """After every input was checked and loaded (rank 0): make the run folder and lock it, check it
    again under the lock (another run may have started meanwhile), then remove the earlier run's
    artifacts (--overwrite) or the temp files of interrupted writes (--resume). Returns the lock:
    hold it for the run's lifetime."""
    lock = lock_run_dir(run_dir)
    check_run_dir(run_dir, resume, overwrite, names, inputs)
    if resume:
        remove_stale_temp_files(run_dir / "checkpoints")
    elif overwrite:
        clear_previous_run(run_dir, names)
    return lock


def clear_previous_run(run_dir: Path, names=RUN_ARTIFACTS) -> None:
    """--overwrite, after every input was validated and loaded: remove the earlier run's artifacts,
    so nothing stale (a checkpoint, a difficulty file, a model) can leak into the new run. A symlink
    is removed, not what it points to."""
    for name in existing_artifacts(run_dir, names):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def check_model_folder(key: str, path) -> None:
    """A model folder named in the config exists and is a save_pretrained folder (before any work)."""
    if not path:
        return
    if not Path(path).is_dir():
        raise ConfigError(f"{key}={path}: model folder not found")
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{key}={path}: no config.json, so not a Hugging Face model folder (save_pretrained output)")


def check_data_dir_for_a_real_model(cfg) -> None:
    """A real checkpoint (model.path) trains on the user's data: without data.dir the run is refused
    rather than trained on the bundled synthetic pairs, which only the demo's from-scratch model uses."""
    if cfg.model.path and not cfg.data.dir and not cfg.run.init_from:
        raise ConfigError(f"data.dir: not set, but model.path={cfg.model.path} is a real checkpoint; set data.dir to "
                          "your folder with train.parquet and a <name>.parquet per eval.splits name (the bundled "
                          "synthetic data is for the demo's model built from scratch; to use it anyway, write it with "
                          "`python -m afrl_fast.data synth --n 800 --out DIR` and pass data.dir=DIR)")
