"""The policy a training run trains and the frozen reference it is held to: built (and sharded with
FSDP2 on several ranks) with fp32 master weights, or started from an earlier run's SFT model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import dist as D
from .config import load_config
from .errors import ConfigError
from .policy import PolicyLoss, build_lm


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
