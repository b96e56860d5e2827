"""Train an AFRL relevance judge end to end:
SFT cold start → difficulty (Acc@8) → three-stage Mode-Balanced RL → first-token evaluation.

One device (the demo: CPU, small Qwen3 with the real Qwen3 tokenizer, synthetic data, ≤ 15 min):
    torchrun --nproc_per_node=1 afrl_fast/train.py
    python -m afrl_fast.train                      # the same, one process without torchrun
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

import copy
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (`torchrun afrl_fast/train.py`): Python put afrl_fast/ itself first on sys.path,
    # where config.py, data.py, metrics.py ... would shadow distributions of those names. Drop it; the
    # installed package is found as usual, and an uninstalled checkout's root goes LAST.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import torch

from afrl_fast import checkpoint as C
from afrl_fast import dist as D
from afrl_fast.cli import Parser
from afrl_fast.config import DEMO_CONFIG, ConfigError, check_same_config, comparable_config, load_config, to_yaml
from afrl_fast.curriculum import estimate_difficulty, write_difficulty
from afrl_fast.pairs import DataError
from afrl_fast.engines.sglang_server import check_shared_run_dir
from afrl_fast.evaluate import evaluate_splits, trace_validity
from afrl_fast.files import atomic_write_text
from afrl_fast.format import FormatError, instructions_text, load_tokenizer
from afrl_fast.observe import RunLog, Timer, log, setup_logging
from afrl_fast.optim import NonFiniteError, make_optimizer
from afrl_fast.rl import RLContext, train_rl
from afrl_fast.rollouts import TrainerEngine
from afrl_fast.rulebook import RulebookError, load_rulebook
from afrl_fast.run_data import (embedding_rows, prepare_data, rl_split, tokenize_prompts, tokenize_targets,
                                trace_split, train_inputs, write_data)
from afrl_fast.run_dir import (RUN_ARTIFACTS, check_data_dir_for_a_real_model, check_model_folder, check_run_dir,
                               open_run_dir)
from afrl_fast.run_policy import build_policy, build_ref_policy, check_init_from, start_from_run
from afrl_fast.run_results import finish
from afrl_fast.sft import train_sft

DESCRIPTION = ("Train an AFRL relevance judge end to end: SFT cold start, difficulty (Acc@8), Mode-Balanced RL, "
               "first-token evaluation. Run as `torchrun --nproc_per_node=N afrl_fast/train.py [flags] "
               "[key=value ...]`, or on one process as `python -m afrl_fast.train [flags] [key=value ...]`.")

# run keys a resumed run may change: they say how this attempt runs, not what it trains
TRAIN_SWITCHES = ("resume", "stop_after", "out_dir", "device")


# ----------------------------------------------------------------------------- setup

def parse_args(argv=None):
    p = Parser(prog="afrl_fast/train.py", description=DESCRIPTION)
    p.add_argument("--config", default=str(DEMO_CONFIG), help="YAML config (default: configs/demo.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run that run.out_dir already holds (its checkpoints, models and logs)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (section.key=value), e.g. rl.kl_coef=0")
    return p.parse_args(argv)


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
    vocab = embedding_rows(cfg.model.tokenizer, tokenizer)
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
        check_shared_run_dir(run_dir)
    runlog = RunLog(run_dir, info.is_main)
    state = C.load_checkpoint(ckpt_dir) if cfg.run.resume else None
    progress = {"phase": "sft", "step": 0, "phase_step": 0, "history": {}, "config": comparable_config(cfg, TRAIN_SWITCHES)}
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
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))  # as resolved, once resuming is allowed
    eval_names = list(cfg.eval.splits)
    traces_on = trace_split(eval_names)     # greedy traces checked on the first evaluation split
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
                engine(), tokenizer, rulebook, prompts[traces_on], labels[traces_on], 32,
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


if __name__ == "__main__":
    sys.exit(main())
