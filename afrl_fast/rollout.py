"""Rollout engines: G sampled responses per prompt, with the engine's log-prob of every sampled token.

Two engines share one interface, ``generate_groups(prompts, group_size, ...) -> list[RolloutGroup]``
plus ``sync_weights(model)``, ``release_memory()``, ``resume_memory()`` and ``shutdown()``:

* ``EmbeddedEngine`` (default, any device): drives a Hugging Face causal LM directly. Each prompt is
  prefilled ONCE, its KV cache is repeated G times along the batch dimension, and all groups of the
  call decode together in one batch. Rows that stop are dropped from the batch (cache rows
  included), so late steps only pay for the rows still running.
* ``SGLangEngine`` (GPU, optional extra; ``afrl_fast.rollout_sglang``): an SGLang server process
  per engine group, driven over HTTP; the prompts are prefilled into its radix cache once and the G
  samples of a prompt, each with its own seed, share that KV.

Conventions, identical for both engines (the trainer relies on them):

* ``token_ids[g]`` are the generated tokens only (no prompt). If the row stopped on an EOS id, that
  EOS token IS included as the last token: the policy has to learn to stop, so the trainer trains on
  it. A row that hit ``max_new_tokens`` has ``finished[g] = False`` and no EOS at the end.
* ``logprobs[g][t]`` is ``log_softmax(logits / T)[token]`` for the sampled token, where T is the
  sampling temperature: the temperature-scaled distribution BEFORE top-p truncation (the same
  quantity SGLang returns by default). With ``temperature == 0`` (greedy) it is
  ``log_softmax(logits)[token]``, i.e. T = 1. Training recomputes its own old log-probs; these are
  for the engine-vs-trainer |Δ log p| health metric.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import NonFiniteError

__all__ = ["RolloutGroup", "EmbeddedEngine", "make_engine", "sample_next_tokens", "Rollouts",
           "generate_rollouts", "prompt_seed", "TrainerEngine", "cache_argument"]

# End-of-turn / end-of-text tokens of chat tokenizers (Qwen, and many others that reuse the
# ChatML names). Generation for the AFRL format ends at the end of the assistant turn.
_NAMED_END_TOKENS = ("<|im_end|>", "<|endoftext|>")

@dataclass
class RolloutGroup:
    """The G responses sampled for one prompt (see the module docstring for the conventions)."""

    prompt_ids: list[int]
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]
    # Only when asked for (generate_groups(top_logprobs=k)): per response, per token, the k most
    # likely (token id, log-prob) pairs under the same distribution as `logprobs`, best first.
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None

    @property
    def group_size(self) -> int:
        return len(self.token_ids)


# ----------------------------------------------------------------------------------------------
# End-of-sequence ids
# ----------------------------------------------------------------------------------------------

def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def resolve_eos_ids(tokenizer=None, model=None, eos_ids: Iterable[int] | None = None) -> list[int]:
    """The token ids that end a response.

    Explicit ``eos_ids`` win. Otherwise the union of the tokenizer's eos token, the chat end tokens
    it knows (``<|im_end|>``, ``<|endoftext|>``) and the model's generation-config eos ids: a
    response must stop at whichever of them the policy emits.
    """
    if eos_ids is not None:
        ids = _as_id_list(eos_ids)
    else:
        ids = []
        if tokenizer is not None:
            ids += _as_id_list(tokenizer.eos_token_id)
            vocab = tokenizer.get_vocab()
            ids += [vocab[name] for name in _NAMED_END_TOKENS if name in vocab]
        gen_cfg = getattr(model, "generation_config", None)
        if gen_cfg is not None:
            ids += _as_id_list(gen_cfg.eos_token_id)
    ids = sorted(set(ids))
    if not ids:
        raise ValueError("no end-of-sequence id: pass eos_ids=[...] or a tokenizer with an eos token")
    return ids


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

def top_p_mask(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask [B, V] of the nucleus: the smallest set of most-likely tokens whose mass ≥ top_p.

    A token is dropped when the mass of the tokens ranked strictly above it already reaches top_p,
    so the most likely token is always kept (top_p → 0 is greedy).
    """
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(dim=-1) - sorted_lp.exp()
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample_next_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | list[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from ``logits`` [B, V]; return (tokens [B], logprobs [B]).
    ``generator`` is one RNG for all rows, or one per row (see ``row_uniforms``).

    The log-prob is taken under the temperature-scaled, untruncated distribution (module docstring).
    Math in fp32 whatever the model dtype, so bf16 policies sample from the same distribution.
    Without top-p no [B, V] log-softmax is formed: the sampled token's log-prob is its shifted logit
    minus the log of the row's exponential sum, which the draw needs anyway (see inverse_cdf_sample).
    """
    logits = logits.float()
    if temperature == 0:
        peak, tokens = logits.max(dim=-1)
        total = torch.exp(logits - peak[:, None]).sum(dim=-1)
        return tokens, -torch.log(require_finite(total))
    if top_p < 1.0:
        logprobs = scaled_logprobs(logits, temperature)
        probs = logprobs.exp().masked_fill(~top_p_mask(logprobs, top_p), 0.0)
        tokens, total = draw_from_weights(probs, generator)
        require_finite(total)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    # e = exp((x − max x)/T): the unnormalised distribution, in one buffer, the input left untouched
    peak = logits.amax(dim=-1, keepdim=True)
    weights = torch.sub(logits, peak)
    if temperature != 1.0:
        weights.mul_(1.0 / temperature)
    weights.exp_()
    tokens, total = draw_from_weights(weights, generator)
    require_finite(total)
    picked = (logits.gather(-1, tokens[:, None]).squeeze(-1) - peak.squeeze(-1)) / temperature
    return tokens, picked - torch.log(total).float()


def require_finite(row_totals: torch.Tensor) -> torch.Tensor:
    """A row's exponential sum is NaN or inf only when its logits are (the weights diverged): stop
    the run with NonFiniteError rather than draw a meaningless token."""
    if not bool(torch.isfinite(row_totals).all()):
        raise NonFiniteError("non-finite logits while sampling a rollout (the weights have diverged)")
    return row_totals


def scaled_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) in fp32, T = 1 for greedy: the distribution every reported log-prob
    refers to (module docstring)."""
    logits = logits.float()
    if temperature not in (0, 1.0):
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


# Vocabulary entries per block of the two-level inverse CDF (151,936 = 1187 × 128)
CDF_BLOCK = 128


def inverse_cdf_sample(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from unnormalised non-negative ``weights`` [B, V] (see draw_from_weights)."""
    return draw_from_weights(weights, generator)[0]


def draw_from_weights(weights: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(one token per row drawn from unnormalised non-negative ``weights`` [B, V], each row's total
    weight in float64).

    Inverse CDF with one uniform per row, in two levels: the cumulative sum of the block sums (V/128
    entries) finds the block, the cumulative sum inside that one block finds the token. A full
    float64 cumsum over V = 151,936 is sequential per row and cost more than the decode step's
    lm_head GEMM on CPU (and a float64 reduction over V ~25× a float32 one); ``torch.multinomial``
    would cost one exponential random number per entry. The block sums are float32 sums of 128
    terms (relative error ~1e-7 of the block's own mass); the cumulative sums over blocks and inside
    the chosen block are float64, since in fp32 a cdf near 1 has a 6e-8 step, which would distort
    every token rarer than that. Zero-weight tokens are never drawn (their cdf entry equals their
    predecessor's).
    """
    n_rows, vocab = weights.shape
    pad = (-vocab) % CDF_BLOCK
    w = torch.nn.functional.pad(weights, (0, pad)) if pad else weights
    blocks = w.reshape(n_rows, -1, CDF_BLOCK)
    cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)                      # [B, V/128]
    total = cdf[:, -1:]
    u = row_uniforms(n_rows, generator, weights.device)
    # u * total < total keeps the search inside the vocabulary even when the product rounds up.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    block = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[1] - 1)   # [B, 1]
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    inner = blocks[torch.arange(n_rows, device=weights.device), block.squeeze(1)]      # [B, 128]
    offset = torch.searchsorted(inner.double().cumsum(dim=-1), target - before, right=True)
    # The block's own cumsum may end a rounding error below its block sum: never step past its last
    # positive entry (never onto a zero-weight one).
    positions = torch.arange(CDF_BLOCK, device=weights.device)
    last_positive = torch.where(inner > 0, positions, torch.full_like(positions, -1)).amax(dim=-1, keepdim=True)
    offset = torch.minimum(offset, last_positive.clamp(min=0))
    return (block * CDF_BLOCK + offset).squeeze(-1), total.squeeze(-1)


def row_uniforms(n: int, generator, device) -> torch.Tensor:
    """[n, 1] uniforms in float64: from one generator, or one draw from each row's own generator.
    Per-row generators make a prompt's samples independent of which prompts share its batch."""
    if isinstance(generator, (list, tuple)):
        draws = [torch.rand(1, dtype=torch.float64, device=device, generator=g) for g in generator]
        return torch.stack(draws) if draws else torch.zeros((0, 1), dtype=torch.float64, device=device)
    return torch.rand((n, 1), dtype=torch.float64, device=device, generator=generator)


def make_generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator:
    """A private RNG for sampling, so rollouts never advance the trainer's global RNG."""
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # non-deterministic, drawn from the OS, not from torch's global generator
    else:
        gen.manual_seed(int(seed))
    return gen


# ----------------------------------------------------------------------------------------------
# Embedded engine
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------

def make_engine(kind: str = "embedded", **kwargs):
    """``make_engine("embedded", model=..., tokenizer=...)`` or ``make_engine("sglang", model_path=...,
    tokenizer=..., settings=cfg.rl.sglang, rank=..., ...)`` (see afrl_fast.rollout_sglang)."""
    if kind == "embedded":
        model = kwargs.pop("model")
        tokenizer = kwargs.pop("tokenizer", None)
        return EmbeddedEngine(model, tokenizer, **kwargs)
    if kind == "sglang":
        from .rollout_sglang import SGLangEngine

        return SGLangEngine(kwargs.pop("model_path"), kwargs.pop("tokenizer", None), **kwargs)
    raise ValueError(f"unknown rollout engine {kind!r}: use 'embedded' or 'sglang'")


# ----------------------------------------------------------------------------------------------
# Rollouts for the trainer: seeds, the flat response batch, the engine and its weights
# ----------------------------------------------------------------------------------------------

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
    """The responses of a batch of prompts, flat and group-major (row = prompt · G + g).

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

    @property
    def n_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)


def generate_rollouts(engine, tokenizer, prompt_indices: list[int], prompt_ids: list[list[int]],
                      labels: list[int], *, group_size: int, temperature: float, top_p: float,
                      max_new_tokens: int, seeds: list[int]) -> Rollouts:
    """G samples per prompt from the engine, decoded to text (no verification)."""
    groups = engine.generate_groups(prompt_ids, group_size=group_size, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, seeds=seeds) if prompt_ids else []
    ro = Rollouts([], [], [], [], [], np.zeros(0, dtype=np.int64), [])
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
        import os

        from . import dist as D
        from .checkpoint import export_model, replica_of

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
        from . import dist as D

        if D.is_distributed() and self.kind == "embedded":
            D.copy_full_params(self.policy, self.lm)
        # SGLang streams from the sharded policy itself (every rank gathers, the group leader sends)
        self.engine.sync_weights(self.lm if self.kind == "embedded" else self.policy.lm)

    def first_token_scorer(self, tokenizer, rulebook, *, instructions: str, batch_size: int,
                           max_prompt_tokens: int | None):
        """What held-out evaluation scores with: the rank's full policy (embedded) or the server."""
        from .evaluate import EngineFirstTokenScorer, FirstTokenScorer

        if self.kind == "sglang":
            return EngineFirstTokenScorer(self.engine, tokenizer, rulebook, instructions=instructions,
                                          max_prompt_tokens=max_prompt_tokens, batch_size=batch_size)
        return FirstTokenScorer(self.lm, tokenizer, rulebook, batch_size=batch_size, device=self.info.device,
                                instructions=instructions, max_prompt_tokens=max_prompt_tokens, progress=False)

    def shutdown(self) -> None:
        self.engine.shutdown()
