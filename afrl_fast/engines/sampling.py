"""Token sampling shared by the engines that decode in this process: temperature, top-p, and draws
from explicit uniforms so that a row's samples depend on its own seed only, not on its batch."""
from __future__ import annotations

import torch

from ..errors import NonFiniteError


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
