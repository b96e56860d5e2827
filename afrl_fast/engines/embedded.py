"""The embedded engine: a Hugging Face causal LM driven in this process, on any device.

Each prompt is prefilled ONCE, its KV cache is repeated G times along the batch dimension, and all
groups of the call decode together in one batch. Rows that stop are dropped from the batch (cache rows
included), so late steps only pay for the rows still running.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterable, Mapping, Sequence

import torch

from .base import RolloutGroup, resolve_eos_ids
from .sampling import make_generator, sample_next_tokens, scaled_logprobs


@functools.cache
def _cache_argument_of(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_argument(module: torch.nn.Module) -> str:
    """The name under which this module's forward takes a KV cache: transformers 5.x renamed
    `past_key_values` to `cache` (the old name warns, and goes away in a later release), while
    older 5.x releases only know the old one."""
    return _cache_argument_of(type(module).forward)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts into (input_ids [P, L], attention_mask [P, L]).

    Left padding puts every prompt's last token in the last column, so the prefill's last logits
    row is each prompt's next-token distribution and all rows decode in lock-step.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError("empty prompt: every prompt needs at least one token")
        ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode for the duration of generation, then the caller's mode back.

    The engine shares the policy module with the trainer, which keeps it in train mode; HF turns
    the KV cache off in train mode when gradient checkpointing is on, so decoding needs eval.
    """
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class EmbeddedEngine:
    """Group rollouts from a Hugging Face causal LM, sharing each prompt's prefill across its group.

    Args:
        model: a causal LM whose forward takes ``input_ids, attention_mask, position_ids,
            cache (or past_key_values), use_cache, logits_to_keep`` (transformers ≥ 4.51 decoders). Shared
            with the trainer, not copied.
        tokenizer: used only to find the EOS ids (and the pad id).
        eos_ids / pad_id: explicit ids; override the tokenizer's. The pad value never reaches the
            model's output (masked), any valid id works.
        device: where inputs are placed; defaults to the model's parameters' device.
        max_prompts_per_batch: prompts prefilled and decoded together (× G rows in decode);
            ``None`` takes the whole call as one batch.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        *,
        eos_ids: Iterable[int] | None = None,
        pad_id: int | None = None,
        device: torch.device | str | None = None,
        max_prompts_per_batch: int | None = None,
    ):
        self.model = model
        self.eos_ids = resolve_eos_ids(tokenizer, model, eos_ids)
        if pad_id is None and tokenizer is not None:
            pad_id = tokenizer.pad_token_id
        self.pad_id = int(pad_id) if pad_id is not None else self.eos_ids[0]
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_prompts_per_batch = max_prompts_per_batch

    # -- the interface shared with SGLangEngine ------------------------------------------------

    def generate_groups(
        self,
        prompts: Sequence[Sequence[int]],
        group_size: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 1024,
        seed: int | torch.Generator | None = None,
        seeds: Sequence[int] | None = None,
        top_logprobs: int = 0,
    ) -> list[RolloutGroup]:
        """Sample ``group_size`` responses for each prompt (token ids). Deterministic given ``seed``;
        with ``seeds`` (one per prompt) each group draws from its own RNG, so a prompt's samples are
        the same whichever prompts share its batch (data-parallel ranks, resumed runs).
        ``top_logprobs = k > 0`` also records the k most likely tokens at every step."""
        if group_size < 1 or max_new_tokens < 1:
            raise ValueError("group_size and max_new_tokens must be ≥ 1")
        if top_logprobs < 0:
            raise ValueError("top_logprobs must be ≥ 0")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError("need temperature ≥ 0 and 0 < top_p ≤ 1")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        generator = make_generator(seed, self.device)
        step = self.max_prompts_per_batch or max(len(prompts), 1)
        groups: list[RolloutGroup] = []
        with torch.inference_mode(), eval_mode(self.model):
            for start in range(0, len(prompts), step):
                chunk = [list(p) for p in prompts[start:start + step]]
                gen = generator if seeds is None else \
                    [make_generator(int(s), self.device) for s in seeds[start:start + step]]
                groups += self._generate_batch(chunk, group_size, temperature, top_p,
                                               max_new_tokens, gen, top_logprobs)
        return groups

    def sync_weights(self, model_or_state_dict=None) -> None:
        """Make the engine sample from the trainer's current weights.

        The embedded engine holds the policy module itself, so after an optimizer step there is
        nothing to do: pass the same module (or nothing) and this is a no-op. A different module
        or a state dict is copied in (an engine built on its own copy of the policy).
        """
        if model_or_state_dict is None or model_or_state_dict is self.model:
            return
        state = model_or_state_dict
        if isinstance(state, torch.nn.Module):
            state = state.state_dict()
        if not isinstance(state, Mapping):
            raise TypeError("sync_weights takes a module or a state dict")
        with torch.no_grad():
            self.model.load_state_dict(state, strict=True)

    update_weights = sync_weights

    def release_memory(self) -> None:
        """Colocation hook (SGLang frees its KV pool); the embedded engine keeps no pool."""

    def resume_memory(self) -> None:
        """Colocation hook, see ``release_memory``."""

    def shutdown(self) -> None:
        """Nothing to stop: the engine runs in the caller's process on the caller's module."""

    # -- the algorithm ---------------------------------------------------------------------------

    def _forward(self, input_ids, attention_mask, position_ids, cache, logits_to_keep=0):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{cache_argument(self.model): cache},
        )
        return out.logits[:, -1, :]

    def _prefill(self, prompts: list[list[int]]):
        """One forward over the left-padded prompts: (next-token logits [P, V], cache, mask)."""
        from transformers import DynamicCache

        ids, mask = left_pad(prompts, self.pad_id, self.device)
        # Positions count real tokens only, so a left-padded prompt sees the same rotary
        # positions as when it runs alone.
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        # logits_to_keep=1: the full [P, L, V] logits would be the largest tensor of the call.
        logits = self._forward(ids, mask, positions, cache, logits_to_keep=1)
        return logits, cache, mask

    def _generate_batch(self, prompts, group_size, temperature, top_p, max_new_tokens, generator,
                        top_k=0):
        logits, cache, mask = self._prefill(prompts)

        # Prefix sharing: the prompt KV is computed once and repeated G times; the G rows of a
        # prompt are consecutive (row = prompt * G + g).
        cache.batch_repeat_interleave(group_size)
        logits = logits.repeat_interleave(group_size, dim=0)
        mask = mask.repeat_interleave(group_size, dim=0)
        positions = torch.tensor([len(p) for p in prompts], device=self.device)
        positions = positions.repeat_interleave(group_size)

        n_rows = len(prompts) * group_size
        rows = torch.arange(n_rows, device=self.device)  # which output row each batch row is
        token_buf = torch.zeros((n_rows, max_new_tokens), dtype=torch.long, device=self.device)
        logp_buf = torch.zeros((n_rows, max_new_tokens), dtype=torch.float32, device=self.device)
        lengths = torch.zeros(n_rows, dtype=torch.long, device=self.device)
        stopped = torch.zeros(n_rows, dtype=torch.bool, device=self.device)
        eos = torch.tensor(self.eos_ids, device=self.device)
        top_k = min(top_k, logits.shape[-1])
        top_buf = (torch.zeros((n_rows, max_new_tokens, top_k), device=self.device),
                   torch.zeros((n_rows, max_new_tokens, top_k), dtype=torch.long, device=self.device)) \
            if top_k else None

        for step in range(max_new_tokens):
            row_gen = generator if not isinstance(generator, list) else \
                [generator[r // group_size] for r in rows.tolist()]
            tokens, logps = sample_next_tokens(logits, temperature, top_p, row_gen)
            token_buf[rows, step] = tokens
            logp_buf[rows, step] = logps
            if top_k:
                top_buf[0][rows, step], top_buf[1][rows, step] = \
                    scaled_logprobs(logits, temperature).topk(top_k, dim=-1)
            lengths[rows] = step + 1
            hit_eos = torch.isin(tokens, eos)
            stopped[rows] = hit_eos
            if step == max_new_tokens - 1:
                break
            running = ~hit_eos
            n_running = int(running.sum())
            if n_running == 0:
                break
            if n_running < len(rows):
                # Drop stopped rows everywhere (cache too) instead of padding them: the remaining
                # steps then cost only what the running rows need.
                keep = running.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, tokens, mask, positions = rows[keep], tokens[keep], mask[keep], positions[keep]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            logits = self._forward(tokens[:, None], mask, positions[:, None], cache)
            positions = positions + 1

        return self._collect_groups(prompts, group_size, token_buf, logp_buf, lengths, stopped, top_buf)

    @staticmethod
    def _collect_groups(prompts, group_size, token_buf, logp_buf, lengths, stopped, top_buf=None):
        """Device buffers → one RolloutGroup per prompt (a single device→host copy per buffer)."""
        token_buf, logp_buf = token_buf.cpu().tolist(), logp_buf.cpu().tolist()
        lengths, stopped = lengths.cpu().tolist(), stopped.cpu().tolist()
        if top_buf is not None:
            top_val, top_idx = top_buf[0].cpu().tolist(), top_buf[1].cpu().tolist()
            top = lambda r: [list(zip(top_idx[r][t], top_val[r][t])) for t in range(lengths[r])]
        groups = []
        for p, prompt in enumerate(prompts):
            rows = range(p * group_size, (p + 1) * group_size)
            groups.append(RolloutGroup(
                prompt_ids=list(prompt),
                token_ids=[token_buf[r][:lengths[r]] for r in rows],
                logprobs=[logp_buf[r][:lengths[r]] for r in rows],
                finished=[bool(stopped[r]) for r in rows],
                top_logprobs=[top(r) for r in rows] if top_buf is not None else None,
            ))
        return groups
