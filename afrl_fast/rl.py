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

from .grpo import group_advantages, token_advantages
from .policy import loss_backward, micro_batches, pack_sequences
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


def prompt_seed(run_seed: int, stream: int, step: int, key: int) -> int:
    """Sampling seed of one prompt's group: fixed by (run seed, stream, step, key) — key is the prompt
    index or its position in the global batch — so samples do not depend on how prompts are split
    over ranks or on where a resumed run restarted."""
    return int(np.random.default_rng([run_seed, stream, step, key]).integers(2**62))


def rollout_and_verify(engine, tokenizer, rulebook, reward_cfg: RewardConfig, prompt_indices: list[int],
                       prompt_ids: list[list[int]], labels: list[int], *, group_size: int,
                       temperature: float, top_p: float, max_new_tokens: int, run_seed: int,
                       step: int, stream: int = STREAM_RL, seed_keys: list[int] | None = None) -> Rollouts:
    """G samples per prompt, decoded and verified. Shared by difficulty estimation and RL."""
    # each prompt's group samples from its own seed: the same samples whatever the split of prompts
    # over ranks (2 ranks reproduce 1) and wherever a resumed run restarted
    keys = prompt_indices if seed_keys is None else seed_keys
    seeds = [prompt_seed(run_seed, stream, step, k) for k in keys]
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
def forward_logprobs(policy, prompts, responses, *, pad_id: int, temperature: float, device,
                     micro_batch: int = 0) -> torch.Tensor:
    """Per-token log-probs of the responses under `policy` (forward-only vocab pass), CPU float32."""
    parts = []
    for chunk in micro_batches(len(prompts), micro_batch):
        batch = pack_sequences(prompts[chunk], responses[chunk], pad_id).to(device)
        logp, _ = policy(batch, mode="logprobs", temperature=temperature)
        parts.append(logp.float().cpu())
    return torch.cat(parts) if parts else torch.zeros(0)


def rl_loss_backward(policy, ro_slice: dict, sft_examples, *, pad_id: int, info, alpha: float,
                     gamma: float, rl_cfg, n_rl_global: float, n_sft_global: float) -> dict:
    """Loss and gradients of one mini-batch: this rank's RL rows (scale α_t·world/#RL tokens) and SFT
    rows (γ_t·world/#SFT tokens) through the fused loss; returns summed statistics."""
    n_rl = sum(len(r) for r in ro_slice["responses"])
    n_sft = sum(len(e[1]) for e in sft_examples)
    f32 = torch.float32
    rows = {
        "is_sft": torch.cat([torch.zeros(n_rl, dtype=torch.bool), torch.ones(n_sft, dtype=torch.bool)]),
        "advantages": torch.cat([torch.as_tensor(ro_slice["advantages"], dtype=f32), torch.zeros(n_sft)]),
        "old_logp": torch.cat([ro_slice["old_logp"].to(f32), torch.zeros(n_sft)]),
        "ref_logp": torch.cat([ro_slice["ref_logp"].to(f32), torch.zeros(n_sft)]),
        "scale": torch.cat([torch.full((n_rl,), alpha * info.world / max(n_rl_global, 1.0)),
                            torch.full((n_sft,), gamma * info.world / max(n_sft_global, 1.0))]),
    }
    prompts = list(ro_slice["prompts"]) + [e[0] for e in sft_examples]
    responses = list(ro_slice["responses"]) + [e[1] for e in sft_examples]
    return loss_backward(policy, prompts, responses, rows, pad_id=pad_id, device=info.device,
                         micro_batch=rl_cfg.micro_batch_size, beta=rl_cfg.beta, eps_low=rl_cfg.eps_low,
                         eps_high=rl_cfg.eps_high, temperature=rl_cfg.temperature)
