"""Distillation's two models: the frozen teacher (an exported model folder) and the student (a folder or
a fresh Qwen3), which must share one tokenizer and one vocabulary, and their first-token evaluation."""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as C
from . import dist as D
from .errors import ConfigError, ScoringError
from .evaluate import evaluate_splits
from .format import load_tokenizer
from .policy import PolicyLoss, build_lm
from .scoring import FirstTokenScorer, load_model


def load_teacher(cfg, info):
    """The frozen teacher as a PolicyLoss (sharded with FSDP2 on several ranks)."""
    path = Path(cfg.teacher.path)
    if not path.is_dir():
        raise ConfigError(f"teacher.path={path}: model folder not found")
    try:
        lm = load_model(str(path), cfg.teacher.dtype)
    except ScoringError as e:
        raise ConfigError(f"teacher.path: {e}") from None
    lm.to(info.device).eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    teacher = PolicyLoss(lm, cfg.run.loss_backend)
    D.shard_model(teacher, lm.get_decoder().layers, info)
    return teacher


def build_student(cfg, vocab_size: int, info) -> PolicyLoss:
    """The student: fp32 master weights, computing in student.dtype (as the RL policy does)."""
    compute = torch.bfloat16 if cfg.student.dtype == "bfloat16" else None
    lm = build_lm(cfg.student, vocab_size, torch.float32)
    if cfg.student.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    lm.to(info.device)
    student = PolicyLoss(lm, cfg.run.loss_backend, compute_dtype=compute)
    D.shard_model(student, lm.get_decoder().layers, info, param_dtype=compute)
    return student


def check_same_vocabulary(teacher_lm, student_lm, teacher_path: str, student_desc: str, tokenizer) -> None:
    """Distillation compares distributions token by token: both models must index one vocabulary."""
    vt = teacher_lm.get_output_embeddings().weight.shape[0]
    vs = student_lm.get_output_embeddings().weight.shape[0]
    if vt != vs:
        raise ConfigError(f"teacher {teacher_path} has a {vt}-row vocabulary, student {student_desc} has {vs}: "
                          "they must share the tokenizer and the vocabulary")
    if len(tokenizer) > vs:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens, more than the models' {vs} vocabulary rows")


def student_tokenizer_matches(cfg, tokenizer) -> None:
    if not cfg.student.path:
        return
    other = load_tokenizer(cfg.student.path) if (Path(cfg.student.path) / "tokenizer_config.json").is_file() else None
    if other is not None and other.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"student.path={cfg.student.path} and teacher.path={cfg.teacher.path} have different "
                          "tokenizers; distillation needs one tokenizer for both")


def full_replica(policy, info):
    """An unsharded copy of a (possibly sharded) policy's LM for first-token scoring."""
    if not D.is_distributed():
        return policy.lm
    lm = C.replica_of(policy.lm, info.device)
    D.copy_full_params(policy, lm)
    return lm


def evaluate_lm(lm, tokenizer, prompt, tables, cfg, info) -> dict:
    scorer = FirstTokenScorer(lm, tokenizer, prompt.rulebook, batch_size=cfg.eval.batch_size, device=info.device,
                              instructions=prompt.instructions, max_prompt_tokens=cfg.data.max_prompt_tokens,
                              progress=False)
    return evaluate_splits(scorer, tables, list(cfg.eval.splits), max_rows=cfg.eval.max_rows, info=info)
