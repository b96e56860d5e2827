"""Distil an AFRL teacher into a smaller student (paper §4.6, Table 6).

One device (the demo: the demo run's RL model teaches a half-width student on CPU):
    torchrun --nproc_per_node=1 afrl_fast/distill.py --config configs/distill_demo.yaml
N devices / nodes (FSDP2 for student and teacher; NCCL on GPU, gloo on CPU):
    torchrun --nproc_per_node=N afrl_fast/distill.py --config C teacher.path=/models/teacher data.dir=/data/afrl
Options: --resume, --overwrite and dotted overrides (distill.kind=jsd student.hidden_size=64 ...).

The job, top to bottom (each stage in its module: distill_models, distill_traces, distill_step; the
run folder in run_dir, shared with train.py):
  1. teacher: an exported model folder (frozen, sharded like the RL reference model); student: a
     folder (student.path) or a fresh Qwen3 of the configured size. They must share the tokenizer and
     the vocabulary. The student is prompted exactly as the teacher was trained (the folder's rulebook
     and system prompt) unless data.rulebook / data.instructions say otherwise.
  2. sequence level — what the student learns to write: `distill.traces=teacher` lets the teacher
     write traces for the training pairs through the embedded engine and keeps those that pass the
     consistency filter of trace synthesis (format and consistency gates, the boxed steps implying
     the label, the final grade being the label; `distill.keep=valid` drops the two label checks);
     `data` takes the train split's `trace` column (e.g. afrl_fast.synthesize output);
     `first_token` keeps the teacher's grade token alone (a standard-scoring student).
  3. logit level — at every position of those traces the student's next-token distribution is pulled
     to the teacher's with the fused distillation loss (afrl_fast.distill_loss.fused_distill_loss: forward KL,
     reverse KL or JSD at temperature τ, no [tokens, V] logits of either model), the grade position
     weighted `distill.first_token_weight` (its logits "condense the global reasoning"), the whole
     term × `distill.logit_weight`, plus `distill.hard_label_weight` × the student's cross-entropy on
     the trace tokens (logit_weight=0 hard_label_weight=1: sequence-level distillation alone).
  4. the usual run folder: config.yaml, metrics.jsonl, tensorboard/, teacher_traces.parquet,
     checkpoints/ (a killed run continues with --resume), student_model/ (save_pretrained with the
     prompt settings: evaluate, serve and a later RL run take it as is), results.json (student vs
     teacher, first-token metrics on the eval splits) and plots/.
"""
from __future__ import annotations

import copy
import json
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
from afrl_fast.config import ConfigError, check_same_config, comparable_config, load_distill_config, to_yaml
from afrl_fast.distill_models import (build_student, check_same_vocabulary, evaluate_lm, full_replica, load_teacher,
                                      student_tokenizer_matches)
from afrl_fast.distill_step import distill_loss_backward
from afrl_fast.distill_traces import TRACES_FILE, data_examples, training_examples
from afrl_fast.evaluate import results_table
from afrl_fast.files import atomic_write_text
from afrl_fast.format import FormatError, load_tokenizer, resolve_prompt_settings
from afrl_fast.observe import RunLog, log, progress_bar, setup_logging
from afrl_fast.optim import NonFiniteError, lr_at, make_optimizer, optimizer_step, set_lr
from afrl_fast.pairs import DataError
from afrl_fast.report import draw_report
from afrl_fast.rulebook import RulebookError
from afrl_fast.run_data import instructions_path, read_splits, tokenize_prompts
from afrl_fast.run_dir import check_model_folder, check_run_dir, open_run_dir
from afrl_fast.sft import sft_batches

DESCRIPTION = ("Distil an AFRL teacher into a smaller student (paper §4.6, Table 6). Run as `torchrun "
               "--nproc_per_node=N afrl_fast/distill.py --config C [flags] [key=value ...]`, or on one process as "
               "`python -m afrl_fast.distill --config C [flags] [key=value ...]`.")
STUDENT_DIR = "student_model"
ARTIFACTS = ("checkpoints", TRACES_FILE, STUDENT_DIR, "tensorboard", "plots", "metrics.jsonl", "results.json")


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = Parser(prog="afrl_fast/distill.py", description=DESCRIPTION)
    p.add_argument("--config", default=None,
                   help="YAML config, e.g. configs/distill_demo.yaml (default: none, every key from the defaults "
                        "and the overrides)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run that run.out_dir already holds")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (section.key=value), e.g. distill.kind=jsd")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Bad inputs end the run with one line (exit 2); a non-finite loss with one line (exit 3)."""
    try:
        return distill(argv)
    except (ConfigError, DataError, RulebookError, FormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}; the last checkpoint is intact: lower distill.lr, then continue with --resume",
              file=sys.stderr)
        return 3


def distill_inputs(cfg) -> dict:
    """Every path the run reads (config key -> path), for check_run_dir."""
    inputs = {"teacher.path": cfg.teacher.path, "student.path": cfg.student.path, "data.dir": cfg.data.dir,
              "data.rulebook": cfg.data.rulebook, "data.instructions": instructions_path(cfg.data.instructions)}
    return {k: v for k, v in inputs.items() if v}


def distill(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_distill_config(args.config, args.overrides)
    info = D.init_distributed(cfg.run.device)
    setup_logging(info.is_main)
    run_dir, ckpt_dir = Path(cfg.run.out_dir), Path(cfg.run.out_dir) / "checkpoints"
    inputs = distill_inputs(cfg)
    if info.is_main:     # the run folder and every input path, before anything is read, made or removed
        check_run_dir(run_dir, args.resume, args.overwrite, ARTIFACTS, inputs)
    check_model_folder("teacher.path", cfg.teacher.path)
    check_model_folder("student.path", cfg.student.path)
    torch.manual_seed(cfg.run.seed)
    t_start = time.time()

    # 1. Prompt settings, tokenizer, data and models — all checked and loaded before the run folder
    #    is made or anything of an earlier run is touched.
    prompt = resolve_prompt_settings(cfg.teacher.path, cfg.data.rulebook, cfg.data.instructions)
    tok_path = cfg.teacher.path if (Path(cfg.teacher.path) / "tokenizer_config.json").is_file() else "qwen3"
    tokenizer = load_tokenizer(tok_path)
    student_tokenizer_matches(cfg, tokenizer)
    data_dir = Path(cfg.data.dir)
    tables = read_splits(data_dir, cfg.eval.splits, need_trace=cfg.distill.traces == "data")
    prompts = tokenize_prompts(tokenizer, prompt.rulebook, tables["train"], prompt.instructions,
                               cfg.data.max_prompt_tokens, data_dir / "train.parquet")
    from_data = data_examples(cfg, tables, tokenizer, prompts) if cfg.distill.traces == "data" else None
    teacher = load_teacher(cfg, info)
    vocab = teacher.lm.get_output_embeddings().weight.shape[0]
    student = build_student(cfg, vocab, info)
    check_same_vocabulary(teacher.lm, student.lm, cfg.teacher.path, cfg.student.path or "(fresh)", tokenizer)
    state = C.load_checkpoint(ckpt_dir) if args.resume else None
    progress = {"phase": "distill", "step": 0, "history": {}, "config": comparable_config(cfg)}
    if state is not None:
        check_same_config(state["progress"].get("config", {}), progress["config"], ckpt_dir)
    if info.is_main:
        lock = open_run_dir(run_dir, args.resume, args.overwrite, ARTIFACTS, inputs)  # noqa: F841 (held to the end)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    D.barrier()
    runlog = RunLog(run_dir, info.is_main)
    if state is not None:
        progress = copy.deepcopy(state["progress"])
        C.restore(state, student, None)
        runlog.truncate_after(progress["step"])
        log.info("resumed at step %d", progress["step"])

    # 2. The traces the student learns to write.
    teacher_lm = full_replica(teacher, info)
    examples, kept = training_examples(cfg, tables, tokenizer, prompt.rulebook, prompts, teacher_lm, run_dir, info,
                                       from_data)
    progress["history"]["traces"] = kept
    log.info("training examples: %s", {k: v for k, v in kept.items() if k != "per_grade"})
    if "teacher" not in progress["history"]:
        progress["history"]["teacher"] = evaluate_lm(teacher_lm, tokenizer, prompt, tables, cfg, info)
    del teacher_lm

    # 3. Distillation steps: global batches of examples, one optimizer step each.
    d = cfg.distill
    batches = sft_batches(len(examples), d.batch_size, d.epochs, cfg.run.seed)
    opt = make_optimizer(student, d.lr, d.weight_decay)
    if state is not None and state.get("optimizer") is not None:
        D.load_full_optimizer_state(student, opt, state["optimizer"])
    del state
    bar = progress_bar(total=len(batches), initial=progress["step"], desc="distill", enabled=info.is_main)
    for k in range(progress["step"], len(batches)):
        t0 = time.perf_counter()
        set_lr(opt, lr_at(k, len(batches), d.lr, d.warmup_steps))
        local = D.rank_slice(batches[k], info)
        sums = distill_loss_backward(student, teacher, [examples[i] for i in local], cfg, info, tokenizer.pad_token_id)
        try:
            gnorm = optimizer_step(student, opt, d.grad_clip)
        except NonFiniteError as e:
            raise NonFiniteError(f"distill step {k + 1}: {e}") from None
        keys = ("loss", "divergence", "divergence_first", "ce", "rows", "first_rows")
        total = dict(zip(keys, D.all_reduce_sum([float(sums[x]) for x in keys], info.device)))
        progress["step"] = k + 1
        runlog.write({"step": k + 1, "phase": "distill", "loss": total["loss"] / info.world,
                      "distill/divergence": total["divergence"] / max(total["rows"], 1),
                      "distill/divergence_first_token": total["divergence_first"] / max(total["first_rows"], 1),
                      "distill/ce": total["ce"] / max(total["rows"], 1), "optim/lr": opt.param_groups[0]["lr"],
                      "optim/grad_norm": gnorm, "throughput/tokens_per_s": total["rows"] / (time.perf_counter() - t0)})
        bar.update(1)
        bar.set_postfix(loss=f"{total['loss'] / info.world:.4f}")
        if cfg.run.checkpoint_every and (k + 1) % cfg.run.checkpoint_every == 0 and k + 1 < len(batches):
            C.save_checkpoint(ckpt_dir, student, opt, progress, info)
    bar.close()

    # 4. Export, evaluate, report.
    C.export_model(student, tokenizer, run_dir / STUDENT_DIR, info, prompt=(prompt.rulebook, prompt.instructions))
    if "student" not in progress["history"]:
        progress["history"]["student"] = evaluate_lm(full_replica(student, info), tokenizer, prompt, tables, cfg, info)
    C.save_checkpoint(ckpt_dir, student, None, progress, info)
    log.info("total time %.1f s", time.time() - t_start)
    if info.is_main:
        rows = {"teacher": progress["history"]["teacher"], "student": progress["history"]["student"]}
        print(results_table(rows, list(cfg.eval.splits)))
        atomic_write_text(run_dir / "results.json", json.dumps({"results": rows, "traces": kept}, indent=2,
                                                                 default=float))
        runlog.close()
        try:
            draw_report(run_dir)
        except Exception as e:  # plots are a convenience; a plotting problem must not fail a finished run
            log.warning("report failed: %s", e)
    D.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
