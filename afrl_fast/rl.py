"""One Mode-Balanced RL step (paper Algorithm 1, DESIGN §1.3).

    1. sample B_RL prompts (this rank's share) and B_SFT expert trajectories
    2. G rollouts per prompt from the engine (prefix shared across the group)
    3. verify every response: gates, ŷ, reward, spans of the critical values
    4. group-normalised advantages; stepwise token weights at the critical positions
    5. old log-probs from the trainer's own forward, reference log-probs from the frozen SFT model
    6. L = α_t·L_GRPO + γ_t·L_SFT through the fused loss over RL rows and SFT rows together;
       AdamW with gradient clipping (one update per mini-batch)
    7. push the new weights to the rollout engine

Token-mean aggregation across the global batch: RL rows carry scale α_t·world/#RL tokens and SFT rows
γ_t·world/#SFT tokens, where the counts are summed over ranks (FSDP averages gradients over ranks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import dist as D
from .grpo import group_advantages, token_advantages
from .policy import TokenBatch, pack_sequences
from .verify import RewardConfig, response_token_offsets, token_weights, verify_batch


@dataclass
class Rollouts:
    prompt_index: list[int]          # per response: index of its prompt in the RL table
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    engine_logp: list[list[float]]
    texts: list[str]
    labels: np.ndarray
    result: object                   # VerifyResult


STREAM_RL, STREAM_DIFFICULTY, STREAM_EVAL = 0, 1, 2


def prompt_seed(run_seed: int, stream: int, step: int, prompt_index: int) -> int:
    """Sampling seed of one prompt's group: fixed by (run seed, stream, step, prompt), so samples do
    not depend on how prompts are split over ranks or on where a resumed run restarted."""
    return int(np.random.default_rng([run_seed, stream, step, prompt_index]).integers(2**62))


def rollout_and_verify(engine, tokenizer, rulebook, reward_cfg: RewardConfig, prompt_indices: list[int],
                       prompt_ids: list[list[int]], labels: list[int], *, group_size: int,
                       temperature: float, top_p: float, max_new_tokens: int, run_seed: int,
                       step: int, stream: int = STREAM_RL) -> Rollouts:
    """G samples per prompt, decoded and verified. Shared by difficulty estimation and RL."""
    # each prompt's group samples from its own seed: the same samples whatever the split of prompts
    # over ranks (2 ranks reproduce 1) and wherever a resumed run restarted
    seeds = [prompt_seed(run_seed, stream, step, i) for i in prompt_indices]
    groups = engine.generate_groups(prompt_ids, group_size=group_size, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, seeds=seeds) if prompt_ids else []
    out = Rollouts([], [], [], [], [], None, None)
    flat_labels = []
    for idx, g, label in zip(prompt_indices, groups, labels):
        for ids, lps in zip(g.token_ids, g.logprobs):
            out.prompt_index.append(idx)
            out.prompt_ids.append(list(g.prompt_ids))
            out.response_ids.append(list(ids))
            out.engine_logp.append(list(lps))
            out.texts.append(tokenizer.decode(ids, skip_special_tokens=True))
            flat_labels.append(label)
    out.labels = np.asarray(flat_labels, dtype=np.int64)
    out.result = verify_batch(out.texts, out.labels, rulebook, reward_cfg)
    return out


def rl_token_advantages(ro: Rollouts, tokenizer, group_size: int, std_norm: bool,
                        weights: tuple[float, float, float] | None) -> np.ndarray:
    """Per-token advantages of all responses; weights None = plain GRPO (w_t = 1)."""
    adv = group_advantages(ro.result.reward, group_size, std_norm)
    per_token = []
    for i, ids in enumerate(ro.response_ids):
        if weights is None or not ids:
            per_token.append(np.ones(len(ids), dtype=np.float32))
        else:
            offsets = response_token_offsets(tokenizer, ids)
            per_token.append(token_weights(ro.result.spans[i], offsets, weights))
    return token_advantages(adv, per_token)


@torch.no_grad()
def forward_logprobs(policy, batch: TokenBatch, temperature: float) -> torch.Tensor:
    logp, _ = policy(batch, mode="logprobs", temperature=temperature)
    return logp.float()


def combined_batch(rl_prompts, rl_responses, sft_examples, pad_id) -> tuple[TokenBatch, int]:
    """RL sequences first, then SFT sequences, in one padded batch; returns it and #RL rows."""
    prompts = list(rl_prompts) + [e[0] for e in sft_examples]
    responses = list(rl_responses) + [e[1] for e in sft_examples]
    batch = pack_sequences(prompts, responses, pad_id)
    n_rl = sum(len(r) for r in rl_responses)
    return batch, n_rl


def rl_loss_backward(policy, ro_slice: dict, sft_examples, *, pad_id: int, info, alpha: float,
                     gamma: float, rl_cfg, ref_policy, n_rl_global: float, n_sft_global: float) -> dict:
    """Loss and gradients of one mini-batch of RL rows + SFT rows; returns loss statistics."""
    dev = info.device
    batch, n_rl = combined_batch(ro_slice["prompts"], ro_slice["responses"], sft_examples, pad_id)
    batch = batch.to(dev)
    n = batch.n_rows
    is_sft = torch.zeros(n, dtype=torch.bool, device=dev)
    is_sft[n_rl:] = True
    adv = torch.zeros(n, dtype=torch.float32, device=dev)
    adv[:n_rl] = torch.as_tensor(ro_slice["advantages"], device=dev)
    old = torch.zeros(n, dtype=torch.float32, device=dev)
    old[:n_rl] = ro_slice["old_logp"].to(dev)
    ref = torch.zeros(n, dtype=torch.float32, device=dev)
    ref[:n_rl] = ro_slice["ref_logp"].to(dev)
    scale = torch.empty(n, dtype=torch.float32, device=dev)
    scale[:n_rl] = alpha * info.world / max(n_rl_global, 1.0)
    scale[n_rl:] = gamma * info.world / max(n_sft_global, 1.0)
    out = policy(batch, is_sft=is_sft, advantages=adv, old_logp=old, ref_logp=ref, scale=scale,
                 beta=rl_cfg.beta, eps_low=rl_cfg.eps_low, eps_high=rl_cfg.eps_high,
                 temperature=rl_cfg.temperature)
    out.loss.backward()
    ent = out.entropy.detach()
    return {"loss": float(out.loss.detach()),
            "entropy_sum": float(ent[:n_rl].sum()), "n_rl": n_rl,
            "clip_frac": float(out.clip_frac), "kl": float(out.kl)}
