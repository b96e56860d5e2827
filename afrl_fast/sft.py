"""SFT cold start (paper §4.1): cross-entropy on expert AFRL trajectories, the fused loss in SFT-only mode.

Each example is (prompt tokens, trace tokens + EOS); the loss is the token mean over the global
batch: every row's scale is world / (response tokens in the global batch), so after FSDP averages
gradients over ranks the sum is exactly the global token mean. The same rows, scaled by γ_t, are the
SFT anchor of Mode-Balanced RL (afrl_fast.rl).
"""
from __future__ import annotations

import math
import time

import numpy as np

from . import dist as D
from .loss import LossRows
from .observe import progress_bar
from .optim import lr_at, make_optimizer, optimizer_step, set_lr
from .policy import LossSettings, LossStats, loss_backward


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees
    exactly the batches the uninterrupted run would have seen."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def sft_batches(n_examples: int, batch_size: int, epochs: float, seed: int):
    """Global batches of example indices for the whole SFT phase, as a list."""
    if epochs <= 0 or n_examples == 0:
        return []
    per_epoch = max(1, n_examples // batch_size)
    total = max(1, int(math.ceil(per_epoch * epochs)))
    out = []
    for s in range(total):
        epoch, k = divmod(s, per_epoch)
        order = epoch_order(n_examples, seed, epoch)
        out.append(order[k * batch_size:(k + 1) * batch_size].tolist())
    return out


def sft_rows(examples, scale: float) -> LossRows:
    """SFT rows for the response tokens of `examples`, each carrying `scale`."""
    return LossRows.sft(sum(len(e[1]) for e in examples), scale)


def sft_loss_backward(policy, examples: list[tuple[list[int], list[int]]], *, pad_id: int, info,
                      micro_batch: int = 0) -> LossStats:
    """Token-mean cross-entropy over the global batch, backward included; returns summed stats."""
    n_local = sum(len(e[1]) for e in examples)
    n_global = D.all_reduce_sum([float(n_local)], info.device)[0]
    rows = sft_rows(examples, info.world / max(n_global, 1.0))
    stats, _ = loss_backward(policy, [e[0] for e in examples], [e[1] for e in examples], rows, LossSettings(),
                             pad_id=pad_id, device=info.device, micro_batch=micro_batch)
    return stats


def train_sft(policy, examples, cfg, info, *, pad_id: int, progress: dict, seed: int, write, checkpoint,
              optimizer_state=None) -> None:
    """The SFT phase from `progress["phase_step"]` on: one optimizer step per global batch, a record
    per step through `write`, `checkpoint(optimizer)` every 4·run.checkpoint_every steps."""
    sft = cfg.sft
    batches = sft_batches(len(examples), sft.batch_size, sft.epochs, seed)
    opt = make_optimizer(policy, sft.lr, sft.weight_decay)
    if optimizer_state is not None:
        D.load_full_optimizer_state(policy, opt, optimizer_state)
    # closed on an error too, so the trainer's error line starts on a line of its own
    with progress_bar(total=len(batches), initial=progress["phase_step"], desc="sft", enabled=info.is_main) as bar:
        for k in range(progress["phase_step"], len(batches)):
            t0 = time.perf_counter()
            set_lr(opt, lr_at(k, len(batches), sft.lr, sft.warmup_steps))
            local = D.rank_slice(batches[k], info)
            st = sft_loss_backward(policy, [examples[i] for i in local], pad_id=pad_id, info=info,
                                   micro_batch=sft.micro_batch_size)
            loss_sum, ent_sum, tok = D.all_reduce_sum([st.loss, st.entropy_all, float(st.n_rows)], info.device)
            gnorm = optimizer_step(policy, opt, sft.grad_clip, loss=loss_sum)
            progress["step"] += 1
            progress["phase_step"] = k + 1
            dt = time.perf_counter() - t0
            # each rank's loss is its share of the global token mean times world (FSDP averages grads)
            write({"step": progress["step"], "phase": "sft", "stage": "sft", "loss": loss_sum / info.world,
                   "policy/entropy": ent_sum / max(tok, 1), "optim/lr": opt.param_groups[0]["lr"],
                   "optim/grad_norm": gnorm, "throughput/tokens_per_s": tok / dt})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / info.world:.3f}")
            # SFT steps are short: checkpoint every 4·checkpoint_every of them
            every = cfg.run.checkpoint_every * 4
            if every and (k + 1) % every == 0 and k + 1 < len(batches):
                checkpoint(opt)
