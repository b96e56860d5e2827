"""The policy: a causal LM plus the fused vocabulary-pass loss, as one module FSDP2 can shard.

The LM head never runs as a module here: the decoder gives hidden states, we gather the rows that
predict response tokens (hidden at t−1 predicts token t), and `afrl_fast.loss` streams them against
the head weight chunk by chunk, so no [tokens, V] logits tensor ever exists. Wrapping
the LM in `PolicyLoss` makes the head weight part of the root FSDP2 unit, so it is unsharded
while forward runs.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields

import torch
from torch import nn

from .config import ModelConfig
from .errors import ConfigError
from .distill_loss import fused_distill_loss
from .loss import LossRows, fused_loss, token_logprobs


@dataclass
class TokenBatch:
    """Sequences (prompt + response) right-padded into [B, T], and the response tokens as rows.

    pred_index[i]: flat index (b·T + t−1) of the hidden state that predicts target i
    targets[i]:    the token id at (b, t)
    seq[i], pos[i]: which sequence, and the token's position inside its response
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pred_index: torch.Tensor
    targets: torch.Tensor
    seq: torch.Tensor
    pos: torch.Tensor

    @property
    def n_rows(self) -> int:
        return int(self.targets.numel())

    def to(self, device):
        return TokenBatch(*(getattr(self, f).to(device) for f in
                            ("input_ids", "attention_mask", "pred_index", "targets", "seq", "pos")))


def pack_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> TokenBatch:
    """Right-pad prompt+response pairs; every response token becomes a target row."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    B, T = len(prompts), max(lengths, default=1)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    pred, tgt, seq, pos = [], [], [], []
    for b, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"sequence {b}: empty prompt (the first response token needs a context)")
        ids[b, : lengths[b]] = torch.tensor(list(p) + list(r), dtype=torch.long)
        mask[b, : lengths[b]] = 1
        start = len(p)
        pred.extend(b * T + start + j - 1 for j in range(len(r)))
        tgt.extend(r)
        seq.extend([b] * len(r))
        pos.extend(range(len(r)))
    as_long = lambda x: torch.tensor(x, dtype=torch.long)
    return TokenBatch(ids, mask, as_long(pred), as_long(tgt), as_long(seq), as_long(pos))


@dataclass(frozen=True)
class LossSettings:
    """The scalar settings of the fused loss: the k3 KL coefficient (the paper's β of the KL term),
    the clip range of the ratio and the sampling temperature the log-probs are taken at."""
    kl_coef: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    temperature: float = 1.0


class PolicyLoss(nn.Module):
    """forward(batch, rows, settings) → the fused loss's output; forward(batch, mode="logprobs",
    temperature=τ) → (logp, entropy) of every target row, forward only.

    Distillation (afrl_fast/distill.py) uses two more modes, each inside forward so that FSDP2 has the
    root unit (embeddings, head) gathered while it runs: a frozen teacher's forward(batch, mode="hidden")
    → (hidden rows, a copy of its head weight), and the student's forward(batch, mode="distill",
    teacher=(hidden, weight), distill=DistillSettings-like, row_weight=..., denominator=...) → the
    fused distillation loss's output."""

    def __init__(self, lm: nn.Module, loss_backend: str = "auto", compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.lm = lm
        self.loss_backend = loss_backend
        # Mixed precision: the parameters stay fp32 (the optimizer's master weights) and the forward
        # runs in compute_dtype. Under FSDP2 its MixedPrecisionPolicy casts the unsharded parameters;
        # on one process autocast does, and the head weight is cast here, so both paths run the same
        # bf16 GEMMs and the fused loss gets matching dtypes.
        self.compute_dtype = compute_dtype

    def hidden_rows(self, batch: TokenBatch) -> torch.Tensor:
        with torch.autocast(batch.input_ids.device.type, dtype=self.compute_dtype or torch.float32,
                            enabled=self.compute_dtype is not None):
            out = self.lm.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                        use_cache=False)
        h = out.last_hidden_state
        return h.reshape(-1, h.shape[-1])[batch.pred_index]

    def forward(self, batch: TokenBatch, rows: LossRows | None = None, settings: LossSettings = LossSettings(),
                mode: str = "loss", temperature: float = 1.0, teacher=None, distill=None, row_weight=None,
                denominator=None):
        hidden = self.hidden_rows(batch)
        weight = self.lm.get_output_embeddings().weight
        if self.compute_dtype is not None:
            hidden, weight = hidden.to(self.compute_dtype), weight.to(self.compute_dtype)
        if mode == "logprobs":
            return token_logprobs(hidden, weight, batch.targets, temperature=temperature,
                                  backend=self.loss_backend)
        if mode == "hidden":
            # a copy: FSDP2 frees the gathered weight when this forward returns
            return hidden.detach(), weight.detach().clone()
        if mode == "distill":
            t_hidden, t_weight = teacher
            return fused_distill_loss(hidden, weight, t_hidden, t_weight,   # the teacher in its own dtype
                                      batch.targets, kind=distill.kind, jsd_beta=distill.jsd_beta,
                                      temperature=distill.temperature, row_weight=row_weight,
                                      hard_label_weight=distill.hard_label_weight, denominator=denominator,
                                      backend=self.loss_backend)
        return fused_loss(hidden, weight, batch.targets, is_sft=rows.is_sft, advantages=rows.advantages,
                          old_logp=rows.old_logp, ref_logp=rows.ref_logp, scale=rows.scale,
                          beta=settings.kl_coef, eps_low=settings.eps_low, eps_high=settings.eps_high,
                          temperature=settings.temperature, backend=self.loss_backend)


def micro_batches(n_seqs: int, size: int = 0) -> list[slice]:
    """Consecutive slices of at most `size` sequences (0 = one slice with everything)."""
    size = size if size > 0 else max(n_seqs, 1)
    return [slice(i, min(i + size, n_seqs)) for i in range(0, n_seqs, size)]


@dataclass
class LossStats:
    """Sums over the rows of one backward: loss, entropy (RL rows / all rows / the critical rows
    asked for), clipped RL rows, k3."""
    loss: float = 0.0
    entropy_rl: float = 0.0
    entropy_all: float = 0.0
    entropy_critical: float = 0.0
    n_critical: int = 0
    clipped: float = 0.0
    kl_sum: float = 0.0
    n_rl: int = 0
    n_rows: int = 0

    def __iadd__(self, other: "LossStats") -> "LossStats":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


def loss_backward(policy, prompts, responses, rows: LossRows, settings: LossSettings, *, pad_id: int, device,
                  micro_batch: int = 0, critical: torch.Tensor | None = None) -> tuple[LossStats, torch.Tensor]:
    """Fused loss + backward over sequences in micro-batches (gradients accumulate); `rows` are laid
    out in sequence order. The scales already hold the global token-mean factors, so accumulation
    needs no rescaling. Returns the summed statistics and every row's log-prob from the pass (CPU
    float32; on-policy RL rows need no other forward for them). `critical` (bool, one per row) marks
    the rows whose entropy is also summed apart: the decisions, diluted ~18x in the all-token mean."""
    policy.train()
    starts = [0]
    for r in responses:
        starts.append(starts[-1] + len(r))
    stats = LossStats(n_rows=starts[-1])
    logps = []
    for chunk in micro_batches(len(prompts), micro_batch):
        lo, hi = starts[chunk.start], starts[chunk.stop]
        if hi == lo:
            continue
        batch = pack_sequences(prompts[chunk], responses[chunk], pad_id).to(device)
        part = rows.slice(lo, hi).to(device)
        out = policy(batch, part, settings)
        out.loss.backward()
        rl = ~part.is_sft
        n_rl = int(rl.sum())
        ent = out.entropy.detach().float()
        stats.loss += float(out.loss.detach())
        stats.entropy_rl += float(ent[rl].sum())
        stats.entropy_all += float(ent.sum())
        if critical is not None:
            c = critical[lo:hi].to(ent.device)
            stats.entropy_critical += float(ent[c].sum())
            stats.n_critical += int(c.sum())
        stats.clipped += float(out.clip_frac) * n_rl      # clip_frac and kl are means over RL rows
        stats.kl_sum += float(out.kl) * n_rl
        stats.n_rl += n_rl
        logps.append(out.logp.detach().float().cpu())
    return stats, (torch.cat(logps) if logps else torch.zeros(0))


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


@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no random init)
    while their buffers stay real: a model's non-persistent buffers (HF rotary `inv_freq`) are
    computed in __init__ and are in no state dict, so they could not be loaded afterwards."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        # a parameter already on meta is registered as is: that keeps tied weights one object
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_lm(cfg: ModelConfig, vocab_size: int, dtype=torch.float32, empty: bool = False) -> nn.Module:
    """A Hugging Face causal LM: loaded from cfg.path, or a fresh Qwen3 of the configured size.
    empty=True: the same architecture with its parameters on the meta device and its buffers real
    (cfg.path's config is read, not its weights), for FSDP2 to shard before anything is allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    try:
        if cfg.path and empty:
            with parameters_on_meta():
                return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.path), dtype=dtype,
                                                        attn_implementation=cfg.attn_implementation)
        if cfg.path:
            return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype,
                                                        attn_implementation=cfg.attn_implementation)
    except (OSError, ValueError, KeyError) as e:     # no config or weights, an unknown model_type, ...
        raise ConfigError(f"{cfg.path}: cannot load the model: {' '.join(str(e).split())[:300]}") from None
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, tie_word_embeddings=True,
        max_position_embeddings=8192, rope_theta=10000.0, attn_implementation=cfg.attn_implementation,
    )
    with parameters_on_meta() if empty else nullcontext():
        return Qwen3ForCausalLM(config).to(dtype)
