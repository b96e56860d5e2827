"""Train an AFRL relevance judge end to end:
SFT cold start → difficulty (Acc@8) → three-stage Mode-Balanced RL → first-token evaluation.

One device (the demo: CPU, small Qwen3 with the real Qwen3 tokenizer, synthetic data, ≤ 15 min):
    torchrun --nproc_per_node=1 afrl_fast/train.py
N devices / nodes (FSDP2; NCCL on GPU, gloo on CPU):
    torchrun --nproc_per_node=N [--nnodes M ...] afrl_fast/train.py --config configs/gpu_qwen3.yaml
Options: --config FILE (default configs/demo.yaml), --resume, and dotted overrides such as
    rl.beta=0 rl.mode=stepwise_grpo sft.epochs=2 run.out_dir=runs/x
A killed run continues with --resume from its last atomic checkpoint. The run folder gets
config.yaml, metrics.jsonl, tensorboard/, rollouts/, difficulty.parquet, checkpoints/,
sft_model/ and final_model/ (save_pretrained), plots/ and results.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file by torchrun: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from afrl_fast import checkpoint as C
from afrl_fast import dist as D
from afrl_fast.config import DEMO_CONFIG, ConfigError, load_config, to_yaml
from afrl_fast.curriculum import build_stages, difficulty_bucket, stage_batch, stage_schedule
from afrl_fast.data import DataError, read_pairs, write_synthetic_splits
from afrl_fast.evaluate import FirstTokenScorer
from afrl_fast.format import FormatError, build_prompt, instructions_text, load_tokenizer, save_prompt_settings
from afrl_fast.metrics import compute_metrics
from afrl_fast.observe import RunLog, Timer, log, setup_logging
from afrl_fast.policy import PolicyLoss, build_lm
from afrl_fast.rl import (STREAM_DIFFICULTY, STREAM_EVAL, forward_logprobs, rl_loss_backward,
                          rl_token_advantages, rollout_and_verify)
from afrl_fast.rollout import make_engine
from afrl_fast.rulebook import RulebookError, load_rulebook
from afrl_fast.sft import lr_at, optimizer_step, sft_batches, sft_loss_backward
from afrl_fast.verify import RewardConfig

QWEN_VOCAB = 151936  # Qwen3's embedding rows (the tokenizer's 151,669 ids, padded)
SPLITS = ("train", "industry", "longtail")


# ----------------------------------------------------------------------------- setup

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(DEMO_CONFIG), help="YAML config (default: configs/demo.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.beta=0")
    return p.parse_args(argv)


def prepare_data(cfg, run_dir: Path, rulebook, info) -> dict:
    """The three splits as pyarrow tables; synthesized into the run folder when no data.dir is given."""
    data_dir = Path(cfg.data.dir) if cfg.data.dir else run_dir / "data"
    if not cfg.data.dir and info.is_main:
        # regenerate unless the folder holds exactly what this config asks for
        wanted = {"n_train": cfg.data.n_train, "n_eval": cfg.data.n_eval, "seed": cfg.data.seed,
                  "reasons": cfg.data.reasons, "rulebook": str(rulebook.path)}
        manifest = data_dir / "manifest.json"
        have = json.loads(manifest.read_text()) if manifest.exists() else None
        if have != wanted or not all((data_dir / f"{s}.parquet").exists() for s in SPLITS):
            write_synthetic_splits(data_dir, cfg.data.n_train, cfg.data.seed, rulebook, n_industry=cfg.data.n_eval,
                                   n_longtail=cfg.data.n_eval, reasons=cfg.data.reasons)
            C.atomic_write_text(manifest, json.dumps(wanted))
    D.barrier()
    return {s: read_pairs(data_dir / f"{s}.parquet", require_trace=(s == "train")) for s in SPLITS}, data_dir


RUN_ARTIFACTS = ("checkpoints", "difficulty.parquet", "sft_model", "final_model", "engine_init", "rollouts",
                 "tensorboard", "plots", "metrics.jsonl", "results.json")


def prepare_run_dir(run_dir: Path, cfg) -> None:
    """A fresh (not resumed) run first removes an older run's artifacts, so nothing stale — a
    checkpoint, a difficulty file, a model — can leak into it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.run.resume:
        for name in RUN_ARTIFACTS:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    else:
        C.remove_stale_temp_files(run_dir / "checkpoints")


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


def tokenize_traces(tokenizer, table, max_tokens: int, where) -> list[list[int]]:
    """SFT targets: the expert trace followed by EOS, so the model learns to stop."""
    eos = tokenizer.eos_token_id
    out = []
    for row, trace in enumerate(table.column("trace").to_pylist()):
        ids = tokenizer.encode(trace, add_special_tokens=False) + [eos]
        if len(ids) > max_tokens:
            raise DataError(f"{where}: row {row}, column 'trace': {len(ids)} tokens, more than "
                            f"data.max_response_tokens={max_tokens}", where, row, "trace")
        out.append(ids)
    return out


def build_policy(cfg, vocab_size: int, info, state_dict=None):
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    lm = build_lm(cfg.model, vocab_size, dtype)
    if state_dict is not None:
        lm.load_state_dict(state_dict)
    if cfg.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    lm.to(info.device)
    policy = PolicyLoss(lm, cfg.run.loss_backend)
    D.shard_model(policy, lm.get_decoder().layers, info)
    return policy


def strip_prefix(state: dict, prefix: str = "lm.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def replica_of(lm, device=None):
    """An unsharded LM of the same class, config and dtype (weights still to be copied in)."""
    return type(lm)(lm.config).to(dtype=next(lm.parameters()).dtype, device=device)


def export_model(policy, tokenizer, path: Path, info, prompt=None) -> None:
    """save_pretrained of the full (unsharded) LM into `path`, replaced atomically by a rename; with
    `prompt` = (rulebook, instructions text) the folder also carries its prompt settings."""
    state = strip_prefix(D.full_model_state(policy, rank0_only=True))
    if info.is_main:
        fresh = replica_of(policy.lm)
        fresh.load_state_dict(state)
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


class Engine:
    """The rollout engine plus how it gets the trainer's weights. With one process the embedded
    engine decodes with the policy's own LM; with FSDP each rank holds an unsharded replica that is
    refreshed parameter by parameter after every optimizer step (the push SGLang's
    update_weights_from_tensor receives in the colocated setup: one engine per rank)."""

    def __init__(self, cfg, policy, tokenizer, info, run_dir: Path):
        self.policy, self.info, self.kind = policy, info, cfg.run.engine
        lm = policy.lm
        if D.is_distributed():
            lm = replica_of(policy.lm, info.device)
            D.copy_full_params(policy, lm)
        self.lm = lm  # the full policy on this rank: first-token evaluation scores with it
        if self.kind == "sglang":
            # SGLang loads from disk once, then receives every update in memory (sync below)
            export_model(policy, tokenizer, run_dir / "engine_init", info)
            self.engine = make_engine("sglang", model_path=str(run_dir / "engine_init"), tokenizer=tokenizer)
        else:
            self.engine = make_engine("embedded", model=lm, tokenizer=tokenizer, device=info.device)

    def sync(self):
        if D.is_distributed():
            D.copy_full_params(self.policy, self.lm)
        self.engine.sync_weights(self.lm if self.kind == "embedded" else self.lm.state_dict())


# ----------------------------------------------------------------------------- evaluation

def evaluate_splits(lm, tokenizer, rulebook, tables, names, cfg, info, instructions) -> dict:
    """First-token metrics on held-out splits; each rank scores a slice, rank 0 reduces."""
    scorer = FirstTokenScorer(lm, tokenizer, rulebook, batch_size=cfg.eval.batch_size, device=info.device,
                              instructions=instructions, max_prompt_tokens=cfg.data.max_prompt_tokens,
                              progress=False)
    results = {}
    for name in names:
        table = tables[name]
        if cfg.eval.max_rows and table.num_rows > cfg.eval.max_rows:
            table = table.slice(0, cfg.eval.max_rows)
        rows = list(range(info.rank, table.num_rows, info.world))
        probs = scorer.score_pairs(table.take(rows)) if rows else np.zeros((0, 5))
        gathered = D.all_gather_objects((rows, probs))
        full = np.zeros((table.num_rows, 5))
        for r, p in gathered:
            full[r] = p
        results[name] = compute_metrics(np.asarray(table.column("label").to_pylist()), full,
                                        np.asarray(table.column("query_id").to_pylist()))
    return results


def majority_baseline(tables, names) -> dict:
    """Always predicting the most frequent training grade (all scores tie: Pair-ACC 0.5)."""
    train_labels = np.asarray(tables["train"].column("label").to_pylist())
    majority = int(np.bincount(train_labels, minlength=5).argmax())
    out = {}
    for name in names:
        t = tables[name]
        probs = np.zeros((t.num_rows, 5))
        probs[:, majority] = 1.0
        out[name] = compute_metrics(np.asarray(t.column("label").to_pylist()), probs,
                                    np.asarray(t.column("query_id").to_pylist()))
    return out


def trace_validity(engine, tokenizer, rulebook, prompt_ids, labels, n: int, cfg, seed) -> dict:
    """Greedy traces of the first n held-out prompts: how many are valid AFRL traces."""
    n = min(n, len(prompt_ids))
    if n == 0:
        return {"trace_fmt_rate": None, "trace_cst_rate": None, "trace_logic_rate": None, "n_traces": 0}
    ro = rollout_and_verify(engine.engine, tokenizer, rulebook, RewardConfig(gate="literal"), list(range(n)),
                            prompt_ids[:n], labels[:n], group_size=1, temperature=0.0, top_p=1.0,
                            max_new_tokens=cfg.rl.max_new_tokens, run_seed=seed, step=0,
                            stream=STREAM_EVAL)
    res = ro.result
    return {"trace_fmt_rate": float(res.fmt.mean()), "trace_cst_rate": float(res.cst.mean()),
            "trace_logic_rate": float((res.fmt & (res.y_hat == res.y_dec)).mean()), "n_traces": n}


def results_table(rows: dict, names) -> str:
    keys = [("acc5", "5-ACC"), ("acc2", "2-ACC"), ("pair_acc", "Pair-ACC"), ("ndcg3", "NDCG@3"),
            ("macro_f1", "Macro-F1"), ("weighted_f1", "W-F1")]
    lines = []
    for name in names:
        lines.append(f"\n{name.upper()}")
        lines.append(f"{'model':<16}" + "".join(f"{h:>10}" for _, h in keys))
        for model, res in rows.items():
            m = res[name]
            lines.append(f"{model:<16}" + "".join(f"{100 * m[k]:>10.2f}" if m.get(k) is not None else f"{'n/a':>10}"
                                                  for k, _ in keys))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    """Bad inputs (config, rulebook, data files, tokenizer) end the run with one clear line, exit 2."""
    try:
        return train(argv)
    except (ConfigError, DataError, RulebookError, FormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    cfg.run.resume = cfg.run.resume or args.resume
    info = D.init_distributed(cfg.run.device)
    setup_logging(info.is_main)
    run_dir = Path(cfg.run.out_dir)
    ckpt_dir = run_dir / "checkpoints"
    if info.is_main:
        prepare_run_dir(run_dir, cfg)
    D.barrier()
    torch.manual_seed(cfg.run.seed)
    t_start = time.time()

    # 1. Data: rulebook, splits, prompts rendered with the chat template, expert traces.
    rulebook = load_rulebook(cfg.data.rulebook)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    instructions = instructions_text(rulebook, cfg.data.instructions)
    tables, data_dir = prepare_data(cfg, run_dir, rulebook, info)
    prompts = {s: tokenize_prompts(tokenizer, rulebook, tables[s], instructions, cfg.data.max_prompt_tokens,
                                   data_dir / f"{s}.parquet") for s in SPLITS}
    labels = {s: tables[s].column("label").to_pylist() for s in SPLITS}
    traces = tokenize_traces(tokenizer, tables["train"], cfg.data.max_response_tokens, data_dir / "train.parquet")
    sft_examples = list(zip(prompts["train"], traces))
    pad_id = tokenizer.pad_token_id
    vocab = QWEN_VOCAB if cfg.model.tokenizer == "qwen3" and len(tokenizer) <= QWEN_VOCAB \
        else 64 * math.ceil(len(tokenizer) / 64)
    log.info("data: %s", {s: tables[s].num_rows for s in SPLITS})

    # 2. Policy, sharded with FSDP2 when launched on several ranks; resume state if asked.
    policy = build_policy(cfg, vocab, info)
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
    if info.is_main:
        C.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))  # as resolved, once resuming is allowed
    engine = Engine(cfg, policy, tokenizer, info, run_dir)
    evaluate = lambda names: evaluate_splits(engine.lm, tokenizer, rulebook, tables, names, cfg, info,
                                             instructions)
    eval_names = list(cfg.eval.splits)

    def log_eval(results: dict, phase: str):
        for name, m in results.items():
            runlog.write({"step": progress["step"], "split": name, "phase": phase,
                          **{k: m[k] for k in ("acc5", "acc2", "pair_acc", "ndcg3", "macro_f1", "weighted_f1")}})

    def close_phase(phase: str, export_dir: str, next_phase: str):
        """Push weights, export, evaluate held-out splits and greedy traces, checkpoint the switch."""
        engine.sync()
        export_model(policy, tokenizer, run_dir / export_dir, info, prompt=(rulebook, instructions))
        results = evaluate(eval_names)
        log_eval(results, phase)
        progress["history"][phase] = results
        progress["history"][f"{phase}_traces"] = trace_validity(
            engine, tokenizer, rulebook, prompts["industry"], labels["industry"], 32, cfg, cfg.run.seed)
        log.info("%s traces: %s", phase.upper(), progress["history"][f"{phase}_traces"])
        progress.update(phase=next_phase, phase_step=0)
        C.save_checkpoint(ckpt_dir, policy, None, progress, info)

    # 3. SFT cold start: cross-entropy on expert trajectories through the fused loss.
    if progress["phase"] == "sft":
        batches = sft_batches(len(sft_examples), cfg.sft.batch_size, cfg.sft.epochs, cfg.run.seed)
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.sft.lr, weight_decay=cfg.sft.weight_decay)
        if saved_opt.get("sft") is not None:
            D.load_full_optimizer_state(policy, opt, saved_opt["sft"])
        bar = tqdm(total=len(batches), initial=progress["phase_step"], desc="sft", disable=not info.is_main)
        for k in range(progress["phase_step"], len(batches)):
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(k, len(batches), cfg.sft.lr, cfg.sft.warmup_steps)
            local = D.rank_slice(batches[k], info)
            st = sft_loss_backward(policy, [sft_examples[i] for i in local], pad_id=pad_id, info=info,
                                   micro_batch=cfg.sft.micro_batch_size)
            gnorm = optimizer_step(policy, opt, cfg.sft.grad_clip)
            loss_sum, ent_sum, tok = D.all_reduce_sum([st["loss"], st["entropy_all"], float(st["n_rows"])],
                                                      info.device)
            progress["step"] += 1
            progress["phase_step"] = k + 1
            dt = time.perf_counter() - t0
            # each rank's loss is its share of the global token mean times world (FSDP averages grads)
            runlog.write({"step": progress["step"], "stage": "sft", "loss": loss_sum / info.world,
                          "entropy": ent_sum / max(tok, 1), "lr": opt.param_groups[0]["lr"],
                          "grad_norm": gnorm, "tokens_per_s": tok / dt})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / info.world:.3f}")
            # SFT steps are short: checkpoint every 4·checkpoint_every of them
            if cfg.run.checkpoint_every and (k + 1) % (cfg.run.checkpoint_every * 4) == 0 and k + 1 < len(batches):
                C.save_checkpoint(ckpt_dir, policy, opt, progress, info)
        bar.close()
        del opt
        close_phase("sft", "sft_model", "difficulty")
        if cfg.run.stop_after == "sft":
            return finish(cfg, run_dir, progress, tables, eval_names, info, runlog)

    # 4. Difficulty: Acc@8 of the SFT model per training prompt; Easy / Medium / Hard; 0 correct dropped.
    diff_path = run_dir / "difficulty.parquet"
    if progress["phase"] == "difficulty":
        n_prompts = len(prompts["train"]) if not cfg.difficulty.max_prompts \
            else min(cfg.difficulty.max_prompts, len(prompts["train"]))
        counts = estimate_difficulty(engine, tokenizer, rulebook, prompts["train"], labels["train"],
                                     n_prompts, cfg, info)
        if info.is_main:
            write_difficulty(diff_path, tables["train"], counts, cfg)
        D.barrier()
        progress.update(phase="rl", phase_step=0)
        C.save_checkpoint(ckpt_dir, policy, None, progress, info)
        if cfg.run.stop_after == "difficulty":
            return finish(cfg, run_dir, progress, tables, eval_names, info, runlog)

    # 5. Curriculum Mode-Balanced RL (Algorithm 1).
    if progress["phase"] == "rl":
        run_rl(cfg, policy, engine, tokenizer, rulebook, prompts, labels, sft_examples, diff_path,
               progress, saved_opt.get("rl"), runlog, evaluate, log_eval, info, ckpt_dir, pad_id)
        close_phase("rl", "final_model", "done")

    log.info("total time %.1f s", time.time() - t_start)
    return finish(cfg, run_dir, progress, tables, eval_names, info, runlog)


def estimate_difficulty(engine, tokenizer, rulebook, prompt_ids, labels, n_prompts, cfg, info) -> np.ndarray:
    """[n_prompts, 2]: correct first-token answers out of G samples, and valid-format samples."""
    local = list(range(info.rank, n_prompts, info.world))
    per_call = max(1, 64 // cfg.difficulty.group_size)  # prompts decoded together: ~64 rows per batch
    rows = []
    reward_cfg = RewardConfig(gate=cfg.rl.gate, gamma=cfg.rl.reward_gamma)
    for start in tqdm(range(0, len(local), per_call), desc="difficulty", disable=not info.is_main):
        idx = local[start:start + per_call]
        ro = rollout_and_verify(engine.engine, tokenizer, rulebook, reward_cfg, idx, [prompt_ids[i] for i in idx],
                                [labels[i] for i in idx], group_size=cfg.difficulty.group_size,
                                temperature=cfg.difficulty.temperature, top_p=1.0,
                                max_new_tokens=cfg.rl.max_new_tokens, run_seed=cfg.run.seed, step=0,
                                stream=STREAM_DIFFICULTY)
        g = cfg.difficulty.group_size
        correct = (ro.result.y_dec == ro.labels).reshape(-1, g).sum(1)
        fmt = ro.result.fmt.reshape(-1, g).sum(1)
        rows += [(i, int(c), int(f)) for i, c, f in zip(idx, correct, fmt)]
    counts = np.zeros((n_prompts, 2), dtype=np.int64)
    for part in D.all_gather_objects(rows):
        for i, c, f in part:
            counts[i] = (c, f)
    return counts


def write_difficulty(path: Path, table, counts: np.ndarray, cfg) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(counts)
    d = cfg.difficulty
    buckets = [difficulty_bucket(int(c), d.easy_min, d.medium_min, d.drop_unsolved) for c in counts[:, 0]]
    out = pa.table({"prompt_index": np.arange(n), "query_id": table.column("query_id").slice(0, n),
                    "doc_id": table.column("doc_id").slice(0, n), "label": table.column("label").slice(0, n),
                    "n_correct": counts[:, 0], "n_valid_format": counts[:, 1],
                    "group_size": np.full(n, cfg.difficulty.group_size), "bucket": buckets})
    C.atomic_write_bytes(path, lambda f: pq.write_table(out, f))
    log.info("difficulty: %s", {b: buckets.count(b) for b in ("easy", "medium", "hard", "dropped")})


def load_buckets(path: Path) -> dict:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    out = {"easy": [], "medium": [], "hard": []}
    for i, b in zip(t.column("prompt_index").to_pylist(), t.column("bucket").to_pylist()):
        if b in out:
            out[b].append(i)
    return out


def run_rl(cfg, policy, engine, tokenizer, rulebook, prompts, labels, sft_examples, diff_path,
           progress, saved_opt, runlog, evaluate, log_eval, info, ckpt_dir, pad_id):
    rl = cfg.rl
    stages = build_stages(load_buckets(diff_path), rl.stages, cfg.run.seed, rl.random_order)
    plan = stage_schedule(stages, rl.batch_prompts, [s.epochs for s in rl.stages])
    if rl.max_steps:
        plan = plan[:rl.max_steps]
    log.info("curriculum: %s; %d RL steps", [(s.name, s.composition) for s in stages], len(plan))
    if not plan:
        log.warning("no RL step to run: every difficulty bucket the stages draw from is empty")
    ref_state = strip_prefix(D.full_model_state(policy)) if progress["phase_step"] == 0 else None
    ref_policy = build_ref_policy(cfg, policy, info, ref_state)
    del ref_state
    opt = torch.optim.AdamW(policy.parameters(), lr=rl.lr, weight_decay=rl.weight_decay)
    if saved_opt is not None:
        D.load_full_optimizer_state(policy, opt, saved_opt)
    weights = None if rl.mode == "grpo" else tuple(rl.token_weights)
    reward_cfg = RewardConfig(gate=rl.gate, gamma=rl.reward_gamma)
    timer = Timer()
    G = rl.group_size
    bar = tqdm(total=len(plan), initial=progress["phase_step"], desc="rl", disable=not info.is_main)
    for t in range(progress["phase_step"], len(plan)):
        t0 = time.perf_counter()
        si, bi = plan[t]
        stage = stages[si]
        alpha, gamma = stage.alpha, (stage.gamma if rl.mode == "mode_balanced" else 0.0)
        step = progress["step"] + 1
        # Global mini-batches first, then each split over ranks: the same updates on any world size.
        batch = stage_batch(stage, bi, rl.batch_prompts)
        mb_positions = [D.rank_slice(list(r), info) for r in split_even(len(batch), rl.mini_batches)]
        positions = [p for mb in mb_positions for p in mb]
        local = [batch[p] for p in positions]

        with timer("rollout"):
            # seeds keyed by the position in the global batch: a prompt drawn twice samples twice
            ro = rollout_and_verify(engine.engine, tokenizer, rulebook, reward_cfg, local,
                                    [prompts["train"][i] for i in local], [labels["train"][i] for i in local],
                                    group_size=G, temperature=rl.temperature, top_p=rl.top_p,
                                    max_new_tokens=rl.max_new_tokens, run_seed=cfg.run.seed, step=step,
                                    seed_keys=positions)
        with timer("verify"):
            tok_adv = rl_token_advantages(ro, tokenizer, G, rl.adv_std_norm, weights)
        with timer("logprobs"):
            lp_args = dict(pad_id=pad_id, temperature=rl.temperature, device=info.device,
                           micro_batch=rl.micro_batch_size)
            old_logp = forward_logprobs(policy, ro.prompt_ids, ro.response_ids, **lp_args)
            ref_logp = forward_logprobs(ref_policy, ro.prompt_ids, ro.response_ids, **lp_args)
        engine_logp = torch.tensor([x for lp in ro.engine_logp for x in lp], dtype=torch.float32)
        dlogp = float((engine_logp - old_logp).abs().sum()) if len(engine_logp) else 0.0

        sft_global = np.random.default_rng([cfg.run.seed, step, 7]).choice(
            len(sft_examples), rl.sft_batch, replace=len(sft_examples) < rl.sft_batch).tolist() if gamma > 0 else []
        stats = []
        first_group = 0
        for mb, mb_pos in enumerate(mb_positions):
            groups = range(first_group, first_group + len(mb_pos))
            first_group += len(mb_pos)
            rows = minibatch_rows(ro, tok_adv, old_logp, ref_logp, groups, G)
            sft_mb = [sft_examples[sft_global[p]] for p in
                      D.rank_slice(list(split_even(len(sft_global), rl.mini_batches)[mb]), info)]
            n_rl, n_sft = D.all_reduce_sum([float(sum(map(len, rows["responses"]))),
                                            float(sum(len(e[1]) for e in sft_mb))], info.device)
            if n_rl + n_sft == 0:
                continue  # nothing anywhere in this mini-batch: no step, so AdamW's decay does not move the weights
            with timer("loss"):
                stats.append(rl_loss_backward(policy, rows, sft_mb, pad_id=pad_id, info=info, alpha=alpha,
                                              gamma=gamma, rl_cfg=rl, n_rl_global=n_rl, n_sft_global=n_sft))
            with timer("optimizer"):
                optimizer_step(policy, opt, rl.grad_clip)
        engine.sync()

        res = ro.result
        n_resp, n_tok = len(ro.response_ids), sum(len(r) for r in ro.response_ids)
        tot = lambda key: sum(s[key] for s in stats)
        sums = D.all_reduce_sum([
            float(res.reward.sum()), float((res.reward.astype(np.float64) ** 2).sum()), float(n_resp),
            float(res.fmt.sum()), float(res.cst.sum()), float(res.logic.sum()),
            float((res.y_dec == ro.labels).sum()), float(n_tok), dlogp, tot("entropy_rl"), tot("clipped"),
            tot("kl_sum"), float(tot("n_rl")), tot("loss"),
        ], info.device)
        (r_sum, r_sq, n, fmt, cst, logic, acc, tok, dl, ent, clip, kl, n_rows, loss) = sums
        dt = time.perf_counter() - t0
        progress["step"] = step
        progress["phase_step"] = t + 1
        n1 = max(n, 1)
        mean = r_sum / n1
        record = {"step": step, "stage": stage.name, "alpha": alpha, "gamma": gamma,
                  "reward_mean": mean, "reward_std": math.sqrt(max(r_sq / n1 - mean ** 2, 0.0)),
                  "fmt_rate": fmt / n1, "cst_rate": cst / n1, "logic_rate": logic / n1, "acc_first_token": acc / n1,
                  "entropy": ent / max(n_rows, 1), "kl": kl / max(n_rows, 1), "clip_frac": clip / max(n_rows, 1),
                  "response_len": tok / n1, "dlogp_engine": dl / max(tok, 1), "tokens_per_s": tok / dt,
                  "loss": loss / info.world, **timer.pop()}  # each rank's loss carries the factor world
        runlog.write(record)
        write_rollout_log(runlog, step, ro, info)
        bar.update(1)
        bar.set_postfix(stage=stage.name, reward=f"{mean:.3f}")
        if cfg.eval.every and (t + 1) % cfg.eval.every == 0 and t + 1 < len(plan):
            log_eval(evaluate(cfg.eval.splits), "rl")
        if cfg.run.checkpoint_every and (t + 1) % cfg.run.checkpoint_every == 0 and t + 1 < len(plan):
            C.save_checkpoint(ckpt_dir, policy, opt, progress, info)
    bar.close()


def split_even(n: int, parts: int) -> list[range]:
    """[0, n) cut into `parts` consecutive ranges whose sizes differ by at most one."""
    return [range(k * n // parts, (k + 1) * n // parts) for k in range(parts)]


def minibatch_rows(ro, tok_adv, old_logp, ref_logp, groups: range, group_size: int) -> dict:
    """The responses of the given prompt groups, with their per-token advantages and log-probs."""
    resp_idx = [g * group_size + k for g in groups for k in range(group_size)]
    starts = np.concatenate([[0], np.cumsum([len(r) for r in ro.response_ids])]).astype(np.int64)
    tok_idx = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in resp_idx]) if resp_idx \
        else np.zeros(0, dtype=np.int64)
    tok_idx_t = torch.as_tensor(tok_idx, dtype=torch.long)
    return {"prompts": [ro.prompt_ids[i] for i in resp_idx], "responses": [ro.response_ids[i] for i in resp_idx],
            "advantages": tok_adv[tok_idx], "old_logp": old_logp[tok_idx_t], "ref_logp": ref_logp[tok_idx_t]}


def write_rollout_log(runlog, step: int, ro, info) -> None:
    """Every rank's rollouts of the step, gathered into one Parquet file by rank 0."""
    res = ro.result
    part = {"prompt_index": ro.prompt_index, "response": ro.texts, "label": ro.labels.tolist(),
            "reward": res.reward.tolist(), "fmt": res.fmt.tolist(), "cst": res.cst.tolist(),
            "logic": res.logic.tolist(), "y_dec": res.y_dec.tolist(), "y_hat": res.y_hat.tolist()}
    parts = D.all_gather_objects(part)
    if info.is_main:
        runlog.write_rollouts(step, {k: [x for p in parts for x in p[k]] for k in part})


def build_ref_policy(cfg, policy, info, ref_state):
    """The frozen reference π_ref: the SFT model (from the run's sft_model/ on resume)."""
    if ref_state is None:
        from transformers import AutoModelForCausalLM
        sft = AutoModelForCausalLM.from_pretrained(Path(cfg.run.out_dir) / "sft_model",
                                                   dtype=next(policy.lm.parameters()).dtype)
        ref_state = sft.state_dict()
    ref = build_policy(cfg, policy.lm.config.vocab_size, info, ref_state)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def finish(cfg, run_dir, progress, tables, eval_names, info, runlog) -> int:
    """Print SFT vs RL vs the majority baseline, save results.json and draw the plots."""
    if info.is_main:
        rows = {"majority-class": majority_baseline(tables, eval_names)}
        for key, name in (("sft", "SFT"), ("rl", "Mode-Balanced RL")):
            if key in progress["history"]:
                rows[name] = progress["history"][key]
        print(results_table(rows, eval_names))
        for key in ("sft_traces", "rl_traces"):
            if key in progress["history"]:
                print(f"{key}: {progress['history'][key]}")
        C.atomic_write_text(run_dir / "results.json", json.dumps(
            {"results": rows, **{k: v for k, v in progress["history"].items() if k.endswith("traces")}},
            indent=2, default=float))
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
