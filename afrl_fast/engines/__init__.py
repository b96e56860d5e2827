"""Rollout engines: G sampled responses per prompt, with the engine's log-prob of every sampled token.

Two engines share one interface, ``generate_groups(prompts, group_size, ...) -> list[RolloutGroup]``
plus ``sync_weights(model)``, ``release_memory()``, ``resume_memory()`` and ``shutdown()``:

* ``EmbeddedEngine`` (default, any device): drives a Hugging Face causal LM directly. Each prompt is
  prefilled ONCE, its KV cache is repeated G times along the batch dimension, and all groups of the
  call decode together in one batch. Rows that stop are dropped from the batch (cache rows
  included), so late steps only pay for the rows still running.
* ``SGLangEngine`` (GPU, optional extra; ``afrl_fast.engines.sglang``): an SGLang server process
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
from .base import Engine, RolloutGroup, resolve_eos_ids
from .embedded import EmbeddedEngine
from .sglang import SGLangEngine

__all__ = ["Engine", "RolloutGroup", "EmbeddedEngine", "SGLangEngine", "make_engine", "resolve_eos_ids"]


def make_engine(kind: str = "embedded", **kwargs):
    """``make_engine("embedded", model=..., tokenizer=...)`` or ``make_engine("sglang", model_path=...,
    tokenizer=..., settings=cfg.rl.sglang, rank=..., ...)`` (see afrl_fast.engines.sglang)."""
    if kind == "embedded":
        model = kwargs.pop("model")
        tokenizer = kwargs.pop("tokenizer", None)
        return EmbeddedEngine(model, tokenizer, **kwargs)
    if kind == "sglang":
        return SGLangEngine(kwargs.pop("model_path"), kwargs.pop("tokenizer", None), **kwargs)
    raise ValueError(f"unknown rollout engine {kind!r}: use 'embedded' or 'sglang'")
