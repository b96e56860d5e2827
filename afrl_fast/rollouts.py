"""The trainer's side of rollouts: seeds per prompt, the flat response batch and its group layout,
and the engine the trainer drives with the way it receives the trainer's weights."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import dist as D
from .checkpoint import export_model, replica_of
from .engines import RolloutGroup, make_engine
from .scoring import EngineFirstTokenScorer, FirstTokenScorer


# Seed streams: the same prompt sampled by RL, by difficulty estimation or by evaluation must not
# reuse one random stream.
STREAM_RL, STREAM_DIFFICULTY, STREAM_EVAL = 0, 1, 2


def prompt_seed(run_seed: int, stream: int, step: int, key: int) -> int:
    """Sampling seed of one prompt's group: fixed by (run seed, stream, step, key) — key is the prompt
    index or its position in the global batch — so samples do not depend on how prompts are split
    over ranks or on where a resumed run restarted."""
    return int(np.random.default_rng([run_seed, stream, step, key]).integers(2**62))


@dataclass
class Rollouts:
    """The responses of a batch of prompts, flat and group-major: a group's G rows are consecutive.

    `texts` are decoded with special tokens kept, except the EOS that ended a response: the verifier
    then reads y_dec from the very first generated token, as first-token evaluation does (a special
    token in first position is a format failure, never silently skipped)."""
    prompt_index: list[int]          # per response: index of its prompt in the prompt table
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    engine_logp: list[list[float]]
    texts: list[str]
    labels: np.ndarray               # int64 [n], the prompt's grade, repeated per response
    finished: list[bool]
    result: "VerifyResult | None" = None   # filled by verification
    group_size: int = 1              # G responses per prompt

    @property
    def n_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)

    # The group layout lives here alone: the trainer asks for rows and groups, never computes them.

    @property
    def n_groups(self) -> int:
        return len(self.response_ids) // self.group_size

    def rows_of(self, groups) -> list[int]:
        """The rows of the given prompt groups, group by group."""
        return [p * self.group_size + g for p in groups for g in range(self.group_size)]

    def by_group(self, values) -> np.ndarray:
        """Per-row values [n] as [groups, G]."""
        values = np.asarray(values)
        if len(values) % self.group_size:
            raise ValueError(f"{len(values)} rows is not a whole number of groups of {self.group_size}")
        return values.reshape(-1, self.group_size, *values.shape[1:])

    @staticmethod
    def flat(grouped: np.ndarray) -> np.ndarray:
        """[groups, G] back to per-row values [n] (the inverse of by_group)."""
        return np.asarray(grouped).reshape(-1, *np.shape(grouped)[2:])

    def group_prompts(self) -> list[int]:
        """The prompt index of each group."""
        return [self.prompt_index[row] for row in self.rows_of(range(self.n_groups))[::self.group_size]]


def generate_rollouts(engine, tokenizer, prompt_indices: list[int], prompt_ids: list[list[int]],
                      labels: list[int], *, group_size: int, temperature: float, top_p: float,
                      max_new_tokens: int, seeds: list[int]) -> Rollouts:
    """G samples per prompt from the engine, decoded to text (no verification)."""
    groups = engine.generate_groups(prompt_ids, group_size=group_size, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, seeds=seeds) if prompt_ids else []
    ro = Rollouts([], [], [], [], [], np.zeros(0, dtype=np.int64), [], group_size=group_size)
    flat_labels = []
    for idx, group, label in zip(prompt_indices, groups, labels):
        for ids, lps, done in zip(group.token_ids, group.logprobs, group.finished):
            ro.prompt_index.append(idx)
            ro.prompt_ids.append(list(group.prompt_ids))
            ro.response_ids.append(list(ids))
            ro.engine_logp.append(list(lps))
            ro.finished.append(bool(done))
            body = ids[:-1] if done and ids else ids     # a finished response ends with its EOS
            ro.texts.append(tokenizer.decode(body, skip_special_tokens=False))
            flat_labels.append(label)
    ro.labels = np.asarray(flat_labels, dtype=np.int64)
    return ro


class TrainerEngine:
    """The rollout engine plus how it gets the trainer's weights.

    With one process the embedded engine decodes with the policy's own LM; with FSDP each rank
    holds an unsharded replica, refreshed parameter by parameter after every optimizer step. With
    SGLang no rank keeps a replica: the server decodes and scores, and receives the weights streamed
    from the shards. The
    trainer calls, on every rank: `generate_groups` for a step's rollouts, `release_memory()` right
    after them (a colocated SGLang frees its KV pool while training runs), `sync()` after the
    optimizer step(s) (pushes the new weights, resumes memory), `shutdown()` at the end."""

    def __init__(self, kind: str, policy, tokenizer, info, export_dir, sglang=None, seed: int = 0):

        self.policy, self.info, self.kind = policy, info, kind
        lm = policy.lm
        if D.is_distributed() and kind == "embedded":
            lm = replica_of(policy.lm, info.device)
            D.copy_full_params(policy, lm)
        self.lm = lm  # embedded: the full policy on this rank, which decodes and scores
        if kind == "sglang":
            # SGLang loads from disk once, then receives every update in memory (sync below)
            export_model(policy, tokenizer, export_dir, info)
            self.engine = make_engine("sglang", model_path=str(export_dir), tokenizer=tokenizer, settings=sglang,
                                      seed=seed, rank=info.rank, local_rank=info.local_rank,
                                      local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                                      log_dir=str(export_dir.parent), barrier=D.barrier)
        else:
            self.engine = make_engine("embedded", model=lm, tokenizer=tokenizer, device=info.device)

    def generate_groups(self, prompts, **kwargs) -> list[RolloutGroup]:
        return self.engine.generate_groups(prompts, **kwargs)

    def release_memory(self) -> None:
        self.engine.release_memory()

    def sync(self) -> None:

        if D.is_distributed() and self.kind == "embedded":
            D.copy_full_params(self.policy, self.lm)
        # SGLang streams from the sharded policy itself (every rank gathers, the group leader sends)
        self.engine.sync_weights(self.lm if self.kind == "embedded" else self.policy.lm)

    def first_token_scorer(self, tokenizer, rulebook, *, instructions: str, batch_size: int,
                           max_prompt_tokens: int | None):
        """What held-out evaluation scores with: the rank's full policy (embedded) or the server."""

        if self.kind == "sglang":
            return EngineFirstTokenScorer(self.engine, tokenizer, rulebook, instructions=instructions,
                                          max_prompt_tokens=max_prompt_tokens, batch_size=batch_size)
        return FirstTokenScorer(self.lm, tokenizer, rulebook, batch_size=batch_size, device=self.info.device,
                                instructions=instructions, max_prompt_tokens=max_prompt_tokens, progress=False)

    def shutdown(self) -> None:
        self.engine.shutdown()
