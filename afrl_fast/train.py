"""Train an AFRL relevance judge end to end:
SFT cold start → difficulty (Acc@8) → three-stage Mode-Balanced RL → first-token evaluation.

One device (the demo: CPU, small Qwen3 with the real Qwen3 tokenizer, synthetic data, ≤ 15 min):
    torchrun --nproc_per_node=1 afrl_fast/train.py
N devices / nodes (FSDP2; NCCL on GPU, gloo on CPU):
    torchrun --nproc_per_node=N [--nnodes M ...] afrl_fast/train.py --config configs/gpu_qwen3.yaml
Options: --config FILE (default configs/demo.yaml), --resume, --overwrite, and dotted overrides such as
    rl.kl_coef=0 rl.mode=stepwise_grpo sft.epochs=2 run.out_dir=runs/x
A killed run continues with --resume from its last atomic checkpoint; a run folder that already holds
a run is never replaced unless --overwrite says so, and never when an input (model.path, data.dir,
run.init_from, ...) lies inside what --overwrite removes or the run rewrites. Every input is checked,
and the data and the model loaded, before the run folder is made or anything in it removed. The run
folder gets config.yaml, metrics.jsonl, tensorboard/, rollouts/, difficulty.parquet, checkpoints/,
sft_model/ and final_model/ (save_pretrained, with the prompt settings), plots/ and results.json.

This file sequences the phases; each phase lives in the module named after it: sft.py,
curriculum.py (difficulty), rl.py (the step and the curriculum loop), evaluate.py.
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (`torchrun afrl_fast/train.py`): Python put afrl_fast/ itself first on sys.path,
    # where config.py, data.py, metrics.py ... would shadow distributions of those names. Drop it; the
    # installed package is found as usual, and an uninstalled checkout's root goes LAST.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from omegaconf import OmegaConf

from afrl_fast import checkpoint as C
from afrl_fast import dist as D
from afrl_fast.config import DEMO_CONFIG, ConfigError, load_config, to_yaml
from afrl_fast.curriculum import estimate_difficulty, write_difficulty
from afrl_fast.data import (RL_POOL, SPLITS, DataError, _normalize, configured_splits, read_pairs, validate_pairs,
                            write_splits)
from afrl_fast.evaluate import evaluate_splits, majority_baseline, results_table, trace_validity
from afrl_fast.format import FormatError, build_prompt, instructions_text, load_tokenizer
from afrl_fast.metrics import paired_bootstrap
from afrl_fast.observe import RunLog, Timer, check_run_log, log, setup_logging
from afrl_fast.optim import NonFiniteError, make_optimizer
from afrl_fast.policy import PolicyLoss, build_lm
from afrl_fast.rl import RLContext, train_rl
from afrl_fast.rollout import TrainerEngine
from afrl_fast.rulebook import RulebookError, load_rulebook
from afrl_fast.sft import train_sft

QWEN_VOCAB = 151936  # Qwen3's embedding rows (the tokenizer's 151,669 ids, padded)
RUN_ARTIFACTS = ("checkpoints", "difficulty.parquet", "sft_model", "final_model", "engine_init", "rollouts",
                 "tensorboard", "plots", "metrics.jsonl", "results.json")
LOCK_FILE = ".run.lock"


# ----------------------------------------------------------------------------- setup

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(DEMO_CONFIG), help="YAML config (default: configs/demo.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run that run.out_dir already holds (its checkpoints, models and logs)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.kl_coef=0")
    return p.parse_args(argv)


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
    C.check_output_path(run_dir, ConfigError, kind="dir")
    found = existing_artifacts(run_dir, names)
    if found and not resume and not overwrite:
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(found[:4])}); continue it with --resume, "
                          "start a new one with run.out_dir=..., or replace it with --overwrite")
    if resume and not (run_dir / "checkpoints" / C.LATEST).is_file():
        raise ConfigError(f"{run_dir}: --resume, but there is no checkpoint to resume ({run_dir}/checkpoints/"
                          f"{C.LATEST}); drop --resume to start a new run")
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
        C.remove_stale_temp_files(run_dir / "checkpoints")
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
                          "your folder with train/industry/longtail.parquet (the bundled synthetic data is for the "
                          "demo's model built from scratch; to use it anyway, write it with `python -m afrl_fast.data "
                          "synth --n 800 --out DIR` and pass data.dir=DIR)")


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
                    C.first_line(e))
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
        splits = SPLITS + ((RL_POOL,) if d.n_rl_pool else ())
        manifest = data_dir / "manifest.json"
        if read_manifest(manifest, warn=is_main) != wanted or \
                not all((data_dir / f"{s}.parquet").is_file() for s in splits):
            tables = configured_splits(d, rulebook)
            for s, t in tables.items():
                validate_pairs(t, data_dir / f"{s}.parquet", require_trace=need_trace and s == "train")
            return {s: _normalize(t) for s, t in tables.items()}, data_dir, {"tables": tables, "manifest": wanted}
    tables = {s: read_pairs(data_dir / f"{s}.parquet", require_trace=need_trace and s == "train") for s in SPLITS}
    pool = data_dir / f"{RL_POOL}.parquet"
    if d.n_rl_pool or (d.dir and pool.exists()):
        if not pool.exists():
            raise ConfigError(f"data.n_rl_pool={d.n_rl_pool} asks for an RL pool, but {data_dir} has no "
                              f"{RL_POOL}.parquet (a pairs file, labels only); add one or set data.n_rl_pool=0")
        tables[RL_POOL] = read_pairs(pool)
    return tables, data_dir, None


def write_data(data_dir: Path, pending: dict) -> None:
    """The synthesized splits (all or none), an earlier config's RL pool removed, then the manifest."""
    write_splits(data_dir, pending["tables"])
    C.atomic_write_text(data_dir / "manifest.json", json.dumps(pending["manifest"]))


def rl_split(tables: dict) -> str:
    """Where RL draws its prompts: the labels-only pool when there is one, else the SFT set."""
    return RL_POOL if RL_POOL in tables else "train"


def comparable_config(cfg) -> dict:
    """The config a checkpoint must match to be resumed (run-control switches excluded)."""
    d = json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg)), default=str))
    for key in ("resume", "stop_after", "out_dir", "device"):
        d["run"].pop(key, None)
    return d


def check_same_config(saved: dict, current: dict, where: Path) -> None:
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    a, b = flat(saved), flat(current)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if diff:
        raise ConfigError(f"{where}: cannot resume, the config differs from the checkpoint's in "
                         f"{', '.join(f'{k} ({a.get(k)!r} -> {b.get(k)!r})' for k in diff[:6])}")


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


def check_init_from(cfg) -> Path:
    """run.init_from must be a run of the same data and model that got through SFT and difficulty."""
    base = Path(cfg.run.init_from)
    for need in ("config.yaml", "sft_model/config.json", "difficulty.parquet", "results.json"):
        if not (base / need).exists():
            raise ConfigError(f"run.init_from={base}: missing {need}; run it first with run.stop_after=difficulty")
    saved = load_config(base / "config.yaml")
    for section in ("data", "model"):
        a, b = OmegaConf.structured(getattr(saved, section)), OmegaConf.structured(getattr(cfg, section))
        if a != b:
            raise ConfigError(f"run.init_from={base}: its {section} config differs from this run's; "
                              "RL must start from a model trained on the same data and architecture")
    return base


def start_from_run(base: Path, policy, run_dir: Path, progress: dict, info) -> None:
    """Fresh run with run.init_from: the policy takes the base run's SFT weights, the run folder its
    SFT model (the reference) and difficulty file, and the history its SFT evaluation."""
    from transformers import AutoModelForCausalLM

    state = {}   # read on rank 0 alone: load_full_model_state sends the other ranks their shards
    if info.is_main:
        state = AutoModelForCausalLM.from_pretrained(base / "sft_model", dtype=torch.float32).state_dict()
    D.load_full_model_state(policy, {f"lm.{k}": v for k, v in state.items()})
    if info.is_main:
        shutil.copytree(base / "sft_model", run_dir / "sft_model", dirs_exist_ok=True)
        shutil.copy2(base / "difficulty.parquet", run_dir / "difficulty.parquet")
    results = json.loads((base / "results.json").read_text())
    sft_name = next((k for k in results["results"] if k != "majority-class"), None)
    if sft_name is not None:
        progress["history"]["sft"] = results["results"][sft_name]
    if "sft_traces" in results:
        progress["history"]["sft_traces"] = results["sft_traces"]
    progress.update(phase="rl", phase_step=0)
    D.barrier()


def compute_dtype(cfg) -> torch.dtype | None:
    return torch.bfloat16 if cfg.model.dtype == "bfloat16" else None


def build_policy(cfg, vocab_size: int, info, state_dict=None, trainable: bool = True):
    """The LM + fused loss, sharded with FSDP2 on several ranks. A trained policy keeps fp32
    parameters whatever model.dtype says — AdamW's updates at lr 1e-6 are far below bf16's resolution
    and would round away — and computes in model.dtype; a frozen one is stored in model.dtype.
    `state_dict` (the LM's own names) replaces the initial weights; with several ranks only rank 0's
    is read, and only rank 0 builds the initial weights (see shard_policy)."""
    compute = compute_dtype(cfg)
    dtype = torch.float32 if trainable or compute is None else compute
    if D.is_distributed():
        return shard_policy(cfg, vocab_size, info, dtype, state_dict if info.is_main else None, trainable)
    lm = build_lm(cfg.model, vocab_size, dtype)
    if state_dict is not None:
        lm.load_state_dict(state_dict)
    if cfg.model.gradient_checkpointing and trainable:
        lm.gradient_checkpointing_enable()
    lm.to(info.device)
    return PolicyLoss(lm, cfg.run.loss_backend, compute_dtype=compute)


def shard_policy(cfg, vocab_size: int, info, dtype, state_dict, trainable: bool):
    """Several ranks: no rank holds the full model on its device. The LM is built with its
    parameters on the meta device, sharded, and each rank allocates its shard and receives it from
    rank 0, which alone builds the full state on CPU: `state_dict`, or the one-process path's
    initial weights (the same seeded init, or model.path), so 1 and N ranks start identical."""
    full = None
    if info.is_main:
        full = state_dict if state_dict is not None else build_lm(cfg.model, vocab_size, dtype).state_dict()
        full = {f"lm.{k}": v for k, v in full.items()}
    lm = build_lm(cfg.model, vocab_size, dtype, empty=True)
    if cfg.model.gradient_checkpointing and trainable:
        lm.gradient_checkpointing_enable()
    policy = PolicyLoss(lm, cfg.run.loss_backend, compute_dtype=compute_dtype(cfg))
    D.shard_model(policy, lm.get_decoder().layers, info, param_dtype=compute_dtype(cfg))
    D.materialize_from_rank0(policy, info, full)
    return policy


def build_ref_policy(cfg, policy, info, ref_state):
    """The frozen reference π_ref: the SFT model (`ref_state`, on rank 0 only with several ranks;
    from the run's sft_model/ on resume)."""
    if ref_state is None and info.is_main:
        from transformers import AutoModelForCausalLM
        ref_state = AutoModelForCausalLM.from_pretrained(Path(cfg.run.out_dir) / "sft_model",
                                                         dtype=torch.float32).state_dict()
    ref = build_policy(cfg, policy.lm.config.vocab_size, info, ref_state, trainable=False)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    """Bad inputs (config, rulebook, data files, tokenizer) end the run with one clear line, exit 2;
    a non-finite loss or gradient ends it with one line, exit 3, before the weights change."""
    try:
        return train(argv)
    except (ConfigError, DataError, RulebookError, FormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}; the last checkpoint is intact: lower the learning rate or check the data, "
              "then continue with --resume", file=sys.stderr)
        return 3


def train(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    cfg.run.resume = cfg.run.resume or args.resume
    info = D.init_distributed(cfg.run.device)
    setup_logging(info.is_main)
    run_dir = Path(cfg.run.out_dir)
    ckpt_dir = run_dir / "checkpoints"
    inputs = train_inputs(cfg)
    if info.is_main:     # the run folder and every input path, before anything is read, made or removed
        check_run_dir(run_dir, cfg.run.resume, args.overwrite, RUN_ARTIFACTS, inputs)
    base_run = check_init_from(cfg) if cfg.run.init_from else None
    check_model_folder("model.path", cfg.model.path)
    check_data_dir_for_a_real_model(cfg)
    torch.manual_seed(cfg.run.seed)
    t_start = time.time()

    # 1. Data: rulebook, splits, prompts rendered with the chat template, expert traces — all validated
    #    before the run folder is made or anything of an earlier run is touched.
    rulebook = load_rulebook(cfg.data.rulebook)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    instructions = instructions_text(rulebook, cfg.data.instructions)
    tables, data_dir, pending_data = prepare_data(cfg, run_dir, rulebook, info.is_main)
    prompts = {s: tokenize_prompts(tokenizer, rulebook, tables[s], instructions, cfg.data.max_prompt_tokens,
                                   data_dir / f"{s}.parquet") for s in tables}
    labels = {s: tables[s].column("label").to_pylist() for s in tables}
    rl_on = rl_split(tables)       # RL's prompts: the labels-only pool, or the SFT set itself
    traces = tokenize_targets(tokenizer, tables["train"], cfg.sft.target, cfg.data.max_response_tokens,
                              data_dir / "train.parquet")
    sft_examples = list(zip(prompts["train"], traces))
    pad_id = tokenizer.pad_token_id
    vocab = QWEN_VOCAB if cfg.model.tokenizer == "qwen3" and len(tokenizer) <= QWEN_VOCAB \
        else 64 * math.ceil(len(tokenizer) / 64)
    log.info("data: %s; RL prompts from %s", {s: tables[s].num_rows for s in tables}, rl_on)

    # 2. Policy, sharded with FSDP2 when launched on several ranks (model.path is read here, before
    #    anything is removed); then the run folder is made and locked, and --overwrite clears it.
    policy = build_policy(cfg, vocab, info)
    D.barrier()          # every rank has read the data before rank 0 writes any
    if info.is_main:
        # the lock is held until the process exits
        lock = open_run_dir(run_dir, cfg.run.resume, args.overwrite, RUN_ARTIFACTS, inputs)  # noqa: F841
        if pending_data is not None:
            write_data(data_dir, pending_data)
    D.barrier()
    if cfg.run.engine == "sglang":  # every node's SGLang servers start from run_dir/engine_init, written by rank 0
        from afrl_fast.rollout_sglang import check_shared_run_dir
        check_shared_run_dir(run_dir)
    runlog = RunLog(run_dir, info.is_main)
    state = C.load_checkpoint(ckpt_dir) if cfg.run.resume else None
    progress = {"phase": "sft", "step": 0, "phase_step": 0, "history": {}, "config": comparable_config(cfg)}
    saved_opt = {}  # phase -> optimizer state of the checkpoint, used only by that same phase
    if state is not None:
        check_same_config(state["progress"].get("config", {}), progress["config"], ckpt_dir)
        progress = copy.deepcopy(state["progress"])
        saved_opt = {progress["phase"]: state.get("optimizer")}
        C.restore(state, policy, None)  # the optimizer is restored by the phase it belongs to
        runlog.truncate_after(progress["step"])
        log.info("resumed at phase %s, step %d", progress["phase"], progress["step"])
        del state
    elif base_run is not None:
        start_from_run(base_run, policy, run_dir, progress, info)
        log.info("starting RL from %s (its SFT model and difficulty file)", base_run)
    if info.is_main:
        C.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))  # as resolved, once resuming is allowed
    eval_names = list(cfg.eval.splits)
    engines = []

    def engine() -> TrainerEngine:
        """The rollout engine, built on first use: after SFT, so it never holds memory during SFT."""
        if not engines:
            engines.append(TrainerEngine(cfg.run.engine, policy, tokenizer, info, run_dir / "engine_init",
                                         sglang=cfg.rl.sglang, seed=cfg.run.seed))
        return engines[0]

    def evaluate(phase: str) -> dict:
        scorer = engine().first_token_scorer(tokenizer, rulebook, instructions=instructions,
                                             batch_size=cfg.eval.batch_size, max_prompt_tokens=cfg.data.max_prompt_tokens)
        results = evaluate_splits(scorer, tables, eval_names, max_rows=cfg.eval.max_rows, info=info)
        for name, m in results.items():
            runlog.write({"step": progress["step"], "split": name, "phase": phase,
                          **{k: m[k] for k in ("acc5", "acc2", "pair_acc", "ndcg3", "macro_f1", "weighted_f1",
                                                 "mean_entropy")}})
        return results

    def checkpoint(optimizer=None) -> None:
        C.save_checkpoint(ckpt_dir, policy, optimizer, progress, info)

    def close_phase(phase: str, export_dir: str, next_phase: str) -> None:
        """Push weights, export, evaluate held-out splits and greedy traces, checkpoint the switch."""
        engine().sync()
        C.export_model(policy, tokenizer, run_dir / export_dir, info, prompt=(rulebook, instructions))
        progress["history"][phase] = evaluate(phase)
        if cfg.sft.target == "trace":   # a grade-only model writes no trace
            progress["history"][f"{phase}_traces"] = trace_validity(
                engine(), tokenizer, rulebook, prompts["industry"], labels["industry"], 32,
                max_new_tokens=cfg.rl.max_new_tokens, seed=cfg.run.seed)
            log.info("%s traces: %s", phase.upper(), progress["history"][f"{phase}_traces"])
        progress.update(phase=next_phase, phase_step=0)
        checkpoint()

    try:
        # 3. SFT cold start: cross-entropy on expert trajectories through the fused loss.
        if progress["phase"] == "sft":
            train_sft(policy, sft_examples, cfg, info, pad_id=pad_id, progress=progress, seed=cfg.run.seed,
                      write=runlog.write, checkpoint=checkpoint, optimizer_state=saved_opt.get("sft"))
            close_phase("sft", "sft_model", "difficulty")
            if cfg.run.stop_after == "sft":
                return finish(run_dir, progress, tables, eval_names, info, runlog)

        # 4. Difficulty: Acc@8 of the SFT model per training prompt; Easy / Medium / Hard; 0 correct dropped.
        diff_path = run_dir / "difficulty.parquet"
        if progress["phase"] == "difficulty":
            n_prompts = min(cfg.difficulty.max_prompts or len(prompts[rl_on]), len(prompts[rl_on]))
            counts = estimate_difficulty(engine(), tokenizer, rulebook, prompts[rl_on], labels[rl_on], n_prompts,
                                         cfg, cfg.run.seed, info)
            if info.is_main:
                write_difficulty(diff_path, tables[rl_on], counts, cfg)
            D.barrier()
            progress.update(phase="rl", phase_step=0)
            checkpoint()
            if cfg.run.stop_after == "difficulty":
                return finish(run_dir, progress, tables, eval_names, info, runlog)

        # 5. Curriculum Mode-Balanced RL (Algorithm 1), from the SFT model as the frozen reference.
        if progress["phase"] == "rl":
            # the SFT weights, gathered on rank 0 alone (CPU); the other ranks get theirs from it
            ref_state = C.strip_prefix(D.full_model_state(policy, rank0_only=True)) \
                if progress["phase_step"] == 0 else None
            ctx = RLContext(cfg=cfg, info=info, policy=policy, ref_policy=build_ref_policy(cfg, policy, info, ref_state),
                            engine=engine(), optimizer=make_optimizer(policy, cfg.rl.lr, cfg.rl.weight_decay),
                            tokenizer=tokenizer, rulebook=rulebook, prompts=prompts[rl_on], labels=labels[rl_on],
                            sft_examples=sft_examples, pad_id=pad_id, timer=Timer())
            del ref_state
            if saved_opt.get("rl") is not None:
                D.load_full_optimizer_state(policy, ctx.optimizer, saved_opt["rl"])
            train_rl(ctx, diff_path, progress, runlog=runlog, evaluate=lambda: evaluate("rl"), checkpoint=checkpoint)
            close_phase("rl", "final_model", "done")
    except NonFiniteError as e:
        raise NonFiniteError(f"{progress['phase']} step {progress['step'] + 1}: {e}") from None
    finally:
        for e in engines:
            e.shutdown()

    log.info("total time %.1f s", time.time() - t_start)
    return finish(run_dir, progress, tables, eval_names, info, runlog)


RL_NAMES = {"grpo": "GRPO", "stepwise_grpo": "Stepwise-GRPO", "mode_balanced": "Mode-Balanced RL"}


def rl_name(rl: dict) -> str:
    """The results row of the RL model, named after what trained it (paper Table 3's names)."""
    return RL_NAMES[rl["mode"]] + (" (random order)" if rl.get("random_order") else "")


def rl_change(history: dict, tables: dict, eval_names) -> dict:
    """RL's change in 5-ACC over its SFT start per evaluation split, with a paired bootstrap interval:
    one RL run at this scale moves 5-ACC by several points either way, so the change is only worth
    reading beside its uncertainty."""
    out = {}
    for split in eval_names:
        sft, rl = (history.get(k, {}).get(split, {}).get("answers") for k in ("sft", "rl"))
        if not sft or not rl or len(sft) != len(rl):
            continue
        labels = np.asarray(tables[split].column("label").to_pylist())[:len(sft)]
        right = [np.array([int(c) for c in answers]) == labels for answers in (sft, rl)]
        out[split] = paired_bootstrap(*right)
    return out


def finish(run_dir, progress, tables, eval_names, info, runlog) -> int:
    """Print SFT vs RL vs the majority baseline, save results.json and draw the plots."""
    if info.is_main:
        rows = {"majority-class": majority_baseline(tables["train"], tables, eval_names)}
        sft_name = "SFT" if progress["config"]["sft"]["target"] == "trace" else "Standard scoring"
        for key, name in (("sft", sft_name), ("rl", rl_name(progress["config"]["rl"]))):
            if key in progress["history"]:
                rows[name] = progress["history"][key]
        print(results_table(rows, eval_names))
        for key in ("sft_traces", "rl_traces"):
            if key in progress["history"]:
                print(f"{key}: {progress['history'][key]}")
        change = rl_change(progress["history"], tables, eval_names)
        for split, c in change.items():
            print(f"RL - SFT, 5-ACC on {split}: {100 * c['diff']:+.1f} points (95 % CI {100 * c['lo']:+.1f} to "
                  f"{100 * c['hi']:+.1f}; paired bootstrap over the {c['n']} pairs, {c['n_boot']} resamples)")
        C.atomic_write_text(run_dir / "results.json", json.dumps(
            {"results": rows, **{k: v for k, v in progress["history"].items() if k.endswith("traces")},
             **({"rl_minus_sft_acc5": change} if change else {})}, indent=2, default=float))
        runlog.close()
        try:
            from afrl_fast.report import draw_report
            files = draw_report(run_dir)
            print(f"plots: {', '.join(str(f) for f in files)}")
        except Exception as e:  # plots are a convenience; a plotting problem must not fail a finished run
            log.warning("report failed: %s", e)
    D.barrier()
    D.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
