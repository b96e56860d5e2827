"""A training run's data: the splits read from data.dir or synthesized into the run folder (with the
manifest that says from what), the prompts and SFT targets as token ids, and the paths the run reads.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .checkpoint import first_line
from .data import RL_POOL, configured_splits, write_splits
from .pairs import SYNTHETIC_SPLITS, DataError, checked_pairs, read_pairs
from .errors import ConfigError
from .files import atomic_write_text
from .format import build_prompt
from .observe import log

QWEN_VOCAB = 151936  # Qwen3's embedding rows (the tokenizer's 151,669 ids, padded)


def instructions_path(value):
    """data.instructions when it names a file (not full / short)."""
    return value if value and value not in ("full", "short") else None


def train_inputs(cfg) -> dict:
    """Every path the run reads (config key -> path), for check_run_dir."""
    inputs = {"model.path": cfg.model.path,
              "model.tokenizer": None if cfg.model.tokenizer == "qwen3" else cfg.model.tokenizer,
              "data.dir": cfg.data.dir, "data.rulebook": cfg.data.rulebook,
              "data.instructions": instructions_path(cfg.data.instructions)}
    if cfg.run.init_from:
        for need in ("sft_model", "difficulty.parquet", "results.json", "config.yaml"):
            inputs[f"run.init_from ({need})"] = str(Path(cfg.run.init_from) / need)
    return {k: v for k, v in inputs.items() if v}


def read_manifest(manifest: Path, warn: bool = True) -> dict | None:
    """What the run folder's synthesized data was made from; None when there is no manifest or it
    cannot be read (one warning line). Synthesizing again is safe: the manifest records only config
    fields and the generator is deterministic in them, so the same config rewrites the same data.
    A folder in its place is an error: it cannot be replaced without deleting what it holds."""
    if manifest.is_dir():
        raise ConfigError(f"{manifest}: is a directory, not the data manifest; remove it or choose another "
                          "run.out_dir")
    if not manifest.exists():
        return None
    try:
        return json.loads(manifest.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        if warn:
            log.warning("%s is unreadable (%s: %s); synthesizing the data again", manifest, type(e).__name__,
                    first_line(e))
        return None


def data_manifest(cfg, rulebook) -> dict:
    """What the run folder's synthesized data is made from (data/manifest.json)."""
    d = cfg.data
    wanted = {"n_train": d.n_train, "n_eval": d.n_eval, "seed": d.seed, "reasons": d.reasons,
              "rulebook": str(rulebook.path)}
    if d.n_rl_pool or d.train_tail_share is not None or d.rl_pool_tail_share is not None:
        wanted.update(n_rl_pool=d.n_rl_pool, train_tail_share=d.train_tail_share, rl_pool_tail_share=d.rl_pool_tail_share)
    return wanted


def prepare_data(cfg, run_dir: Path, rulebook, is_main: bool = True) -> tuple[dict, Path, dict | None]:
    """The splits as pyarrow tables, and the synthesized data still to be written (or None).
    `rl_pool` (labels only) is among them when the config asks for one or data.dir holds one.
    Nothing is written here: with no data.dir the splits are synthesized in memory (every rank does
    it, deterministically) unless run_dir/data holds exactly what this config asks for, and
    write_data puts them there once the run folder is made."""
    d = cfg.data
    data_dir = Path(d.dir) if d.dir else run_dir / "data"
    need_trace = cfg.sft.target == "trace"
    if not d.dir:
        wanted = data_manifest(cfg, rulebook)
        splits = SYNTHETIC_SPLITS + ((RL_POOL,) if d.n_rl_pool else ())
        manifest = data_dir / "manifest.json"
        if read_manifest(manifest, warn=is_main) != wanted or \
                not all((data_dir / f"{s}.parquet").is_file() for s in splits):
            tables = configured_splits(d, rulebook)
            checked = {s: checked_pairs(t, data_dir / f"{s}.parquet", require_trace=need_trace and s == "train")
                       for s, t in tables.items()}
            return checked, data_dir, {"tables": tables, "manifest": wanted}
    # data.dir holds train and the splits eval.splits names; the run folder's synthetic data, the generator's
    names = cfg.eval.splits if d.dir else [s for s in SYNTHETIC_SPLITS if s != "train"]
    tables = read_splits(data_dir, names, need_trace)
    pool = data_dir / f"{RL_POOL}.parquet"
    if d.n_rl_pool or (d.dir and pool.exists()):
        if not pool.exists():
            raise ConfigError(f"data.n_rl_pool={d.n_rl_pool} asks for an RL pool, but {data_dir} has no "
                              f"{RL_POOL}.parquet (a pairs file, labels only); add one or set data.n_rl_pool=0")
        tables[RL_POOL] = read_pairs(pool)
    return tables, data_dir, None


def read_splits(data_dir: Path, eval_names, need_trace: bool) -> dict:
    """train.parquet (with its traces when `need_trace`) and <name>.parquet for each evaluation split
    the config names (eval.splits); a missing split file is one error naming it and that key."""
    tables = {}
    for s in dict.fromkeys(("train", *eval_names)):
        path = data_dir / f"{s}.parquet"
        if s != "train" and not path.exists():
            raise ConfigError(f"{path}: file not found; eval.splits={list(eval_names)} names the split {s!r}, so "
                              f"{data_dir} must hold {s}.parquet (or leave {s!r} out of eval.splits)")
        tables[s] = read_pairs(path, require_trace=need_trace and s == "train")
    return tables


def trace_split(eval_names) -> str:
    """Where the greedy traces after SFT and RL are checked: the first evaluation split (train when
    none is named)."""
    return eval_names[0] if eval_names else "train"


def write_data(data_dir: Path, pending: dict) -> None:
    """The synthesized splits (all or none), an earlier config's RL pool removed, then the manifest."""
    write_splits(data_dir, pending["tables"])
    atomic_write_text(data_dir / "manifest.json", json.dumps(pending["manifest"]))


def rl_split(tables: dict) -> str:
    """Where RL draws its prompts: the labels-only pool when there is one, else the SFT set."""
    return RL_POOL if RL_POOL in tables else "train"


def tokenize_prompts(tokenizer, rulebook, table, instructions: str, max_tokens: int, where) -> list[list[int]]:
    queries, docs = table.column("query").to_pylist(), table.column("document").to_pylist()
    out = []
    for row, (q, d) in enumerate(zip(queries, docs)):
        ids = tokenizer.encode(build_prompt(tokenizer, rulebook, q, d, instructions), add_special_tokens=False)
        if len(ids) > max_tokens:
            raise DataError(f"{where}: row {row}, column 'document': the prompt is {len(ids)} tokens, more than "
                            f"data.max_prompt_tokens={max_tokens}", where, row, "document")
        out.append(ids)
    return out


def tokenize_targets(tokenizer, table, target: str, max_tokens: int, where) -> list[list[int]]:
    """SFT targets followed by EOS, so the model learns to stop: the expert trace (target=trace), or
    the grade token alone (target=grade, the standard-scoring baseline)."""
    eos = tokenizer.eos_token_id
    texts = table.column("trace").to_pylist() if target == "trace" else [str(x) for x in table.column("label").to_pylist()]
    out = []
    for row, trace in enumerate(texts):
        ids = tokenizer.encode(trace, add_special_tokens=False) + [eos]
        if len(ids) > max_tokens:
            raise DataError(f"{where}: row {row}, column 'trace': {len(ids)} tokens, more than "
                            f"data.max_response_tokens={max_tokens}", where, row, "trace")
        out.append(ids)
    return out


def embedding_rows(model_tokenizer: str, tokenizer) -> int:
    """The embedding's rows: Qwen3's padded vocabulary for its tokenizer, else the tokenizer's size
    rounded up to a multiple of 64."""
    if model_tokenizer == "qwen3" and len(tokenizer) <= QWEN_VOCAB:
        return QWEN_VOCAB
    return 64 * math.ceil(len(tokenizer) / 64)
