"""What every rollout engine returns and how it finds where a response ends.

The engine interface (see afrl_fast.engines for the conventions both engines keep):

    generate_groups(prompts, group_size, temperature, top_p, max_new_tokens, seeds) -> list[RolloutGroup]
    sync_weights(model); release_memory(); resume_memory(); shutdown()
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, Sequence


class Engine(Protocol):
    """The calls the trainer, the evaluation and the service make of a rollout engine."""

    def generate_groups(self, prompts: Sequence[Sequence[int]], group_size: int, *, temperature: float,
                        top_p: float, max_new_tokens: int, seeds: Sequence[int] | None = None,
                        **kwargs) -> list["RolloutGroup"]: ...

    def sync_weights(self, model) -> None: ...

    def release_memory(self) -> None: ...

    def resume_memory(self) -> None: ...

    def shutdown(self) -> None: ...


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
