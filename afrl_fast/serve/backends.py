"""Where the online service's model runs: the scoring and generation backends of `afrl_fast.serve`.

* ``EmbeddedBackend`` (default, any device): the Hugging Face model in the service's process.
  Scores go through `afrl_fast.scoring.FirstTokenScorer` — the KV of the prompt prefix every pair
  shares is computed once at start-up, each batch prefills only the pairs' suffixes, and only the
  five label rows of the LM head are applied; a rerank request's candidates also share their
  query's part of the prompt (`score_query`: prefilled once per query, two-level prefix). Generation (explain traces, /v1/completions) goes
  through `afrl_fast.engines.EmbeddedEngine`, which prefills a prompt once and expands its KV for
  the n samples.
* ``SGLangBackend`` (GPU, `--backend sglang`): SGLang's offline ``sglang.Engine`` in the same
  process. A score is one ``generate`` call with ``max_new_tokens=1`` asking, through
  ``token_ids_logprob``, for the log-probs of the five label tokens at the first output position;
  SGLang's radix cache keeps the shared prefix's KV, so only the suffixes are prefilled. Generation
  sends n single-sample requests with seeds of their own (see `SGLangBackend.generate`). Written
  against SGLang 0.5.x's ``Engine.generate`` (``return_logprob``, ``logprob_start_len``,
  ``top_logprobs_num``, ``token_ids_logprob``); it has not run here (no GPU). It has no
  `score_query`: the service sends a rerank's candidates as plain pairs, whose common query prefix
  SGLang's radix cache shares by itself.

Both backends take token ids, never text: prompts are built and tokenised by the service with
`afrl_fast.prompt_encoding.PromptEncoder`, the same code the offline evaluator uses. Every method of a
backend (its constructor included) runs in the service's single inference thread.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from ..cli import resolve_device
from ..scoring import FirstTokenScorer, has_tokenizer, load_model
from ..format import PromptSettings, label_token_ids, load_tokenizer
from ..engines import EmbeddedEngine, RolloutGroup, resolve_eos_ids
from ..engines.sglang import SEED_LIMIT, label_probs_from_sglang, sample_seeds
from ..engines.sglang_server import SGLangError, check_sglang_version
from .errors import ServeError

log = logging.getLogger("afrl_fast.serve")

BACKENDS = ("embedded", "sglang")
SGLANG_MISSING = ("--backend sglang needs SGLang, which is not installed (pip install 'afrl-fast[sglang]' on a GPU "
                  "machine); the default embedded backend runs everywhere")


def model_tokenizer(model_dir: str):
    """The tokenizer saved with the model, else the real Qwen3 tokenizer; ServeError (one line) for
    one that does not load (a broken tokenizer.json raises from deep in the tokenizers library)."""
    try:
        return load_tokenizer(model_dir if has_tokenizer(model_dir) else "qwen3")
    except Exception as e:  # tokenizers and transformers raise many types; start-up ends in one line
        raise ServeError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]})") from None


def check_vocabulary(model_dir: str, model_rows: int, tokenizer) -> None:
    """A token id the model has no embedding row for would fail at the first request that uses it
    (or read another row on some devices): refuse a tokenizer larger than the model's vocabulary."""
    if model_rows and model_rows < len(tokenizer):
        raise ServeError(f"{model_dir}: the model's vocabulary has {model_rows} tokens, fewer than its tokenizer's "
                         f"{len(tokenizer)}; the tokenizer does not belong to this model")


def check_device(device: str) -> str:
    """The torch device `device` names on this machine (auto: cuda if present, else cpu); ServeError
    otherwise. The rule of every tool's --device (afrl_fast.cli.resolve_device)."""
    return resolve_device(device, ServeError)


def check_model_dir(model_dir: str) -> None:
    path = Path(model_dir)
    if not path.is_dir():
        raise ServeError(f"{model_dir}: model folder not found")
    if not (path / "config.json").is_file():
        raise ServeError(f"{model_dir}: not a model folder (no config.json; expected a save_pretrained export)")


CPU_FORWARD_ROWS = 8


def forward_rows_default(device: str, max_batch: int) -> int:
    """Rows per forward pass within a batch. On a CPU, small forwards over length-sorted rows are
    cheaper per pair: less right padding, and the copied prefix KV and attention mask stay in
    cache (the demo model: 1.28 ms per pair in forwards of 8 rows, 1.66 ms in one of 64); a GPU
    wants the whole batch in one forward."""
    return min(max_batch, CPU_FORWARD_ROWS) if str(device).startswith("cpu") else max_batch


class EmbeddedBackend:
    """The model in this process (see the module docstring)."""

    kind = "embedded"

    def __init__(self, model_dir: str, prompt: PromptSettings, *, device: str = "auto", dtype: str = "auto",
                 max_batch: int = 64, share_prefix: bool = True, forward_rows: int | None = None):
        check_model_dir(model_dir)
        device = check_device(device)
        self.tokenizer = model_tokenizer(model_dir)
        try:
            model = load_model(model_dir, dtype)
        except Exception as e:  # from_pretrained raises many types; start-up must end in one line
            raise ServeError(f"{model_dir}: cannot load the model ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        check_vocabulary(model_dir, model.get_input_embeddings().num_embeddings, self.tokenizer)
        self.forward_rows = forward_rows or forward_rows_default(device, max_batch)
        self.scorer = FirstTokenScorer(model, self.tokenizer, prompt.rulebook, batch_size=self.forward_rows,
                                       device=device, instructions=prompt.instructions,
                                       progress=False, share_prefix=share_prefix)
        self.model = self.scorer.model
        self.engine = EmbeddedEngine(self.model, self.tokenizer)
        self.eos_ids = self.engine.eos_ids
        self.label_ids = self.scorer.label_ids
        self.device = str(self.scorer.device)
        self.context_tokens = int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 0) or 0)
        self.prefix_tokens = len(self.scorer.prefix) if self.scorer.prefix is not None else 0

    @property
    def full_prefill_pairs(self) -> int:
        """Pairs so far whose tokens did not start with the cached prefix (scored by a full prefill)."""
        return self.scorer.n_full_prefill

    def score(self, batch: list[list[int]]) -> np.ndarray:
        """[B, 5] P(0..4) renormalised over the label tokens, float64."""
        return self.scorer.score_token_ids(batch)

    def score_query(self, query: list[int], candidates: list[list[int]]) -> tuple[np.ndarray, int]:
        """[n, 5] for one query's candidates, its prefix prefilled once on top of the system prefix,
        and how many candidates used it (FirstTokenScorer.score_query)."""
        return self.scorer.score_query(query, candidates)

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_tokens: int, seeds: list[int], top_logprobs: int = 0) -> list[RolloutGroup]:
        """n samples per prompt; prompt p draws from its own generator seeded with seeds[p], so its
        samples do not depend on the prompts batched with it."""
        return self.engine.generate_groups(prompts, group_size=n, temperature=temperature, top_p=top_p,
                                           max_new_tokens=max_tokens, seeds=seeds, top_logprobs=top_logprobs)

    def close(self) -> None:
        """Nothing to release: the model goes with the process."""


# ----------------------------------------------------------------------------------------------
# SGLang
# ----------------------------------------------------------------------------------------------

def import_sglang():
    """SGLang, imported only when asked for: installing it would replace the CPU build of torch."""
    try:
        import sglang
    except ImportError:
        raise ServeError(SGLANG_MISSING) from None
    try:
        # looked up on the module at call time (tests stand in for the version check)
        check_sglang_version()
    except SGLangError as e:
        raise ServeError(str(e)) from None
    return sglang


def group_from_sglang(prompt: list[int], outputs: Sequence[Mapping], top_logprobs: int) -> RolloutGroup:
    """The n SGLang responses of one prompt as a RolloutGroup (the embedded engine's shape).
    ``output_token_logprobs`` is ``(logprob, token_id, text)`` per generated token, the matched
    stop token included; ``finish_reason["type"]`` is "stop" or "length"."""
    token_ids, logprobs, finished, tops = [], [], [], []
    for out in outputs:
        meta = out["meta_info"]
        triples = meta["output_token_logprobs"]
        token_ids.append([int(t[1]) for t in triples])
        logprobs.append([float(t[0]) for t in triples])
        reason = meta.get("finish_reason") or {}
        finished.append(isinstance(reason, Mapping) and reason.get("type") == "stop")
        if top_logprobs:
            tops.append([[(int(t[1]), float(t[0])) for t in (step or [])]
                         for step in meta.get("output_top_logprobs") or []])
    return RolloutGroup(prompt_ids=list(prompt), token_ids=token_ids, logprobs=logprobs, finished=finished,
                        top_logprobs=tops if top_logprobs else None)


class SGLangBackend:
    """SGLang's offline engine in this process (GPU). Built and called in the inference thread:
    ``Engine.generate`` drives the event loop the engine made when it was constructed, which is
    that thread's own.

    Seeds. SGLang uses a request's ``sampling_seed`` only when the engine runs with deterministic
    inference (without it the sampler draws from the GPU's global generator and the seed is ignored).
    This backend does not turn that on by default, because it slows scoring as well as generation:
    SGLang then forces its pytorch sampler instead of the fused sampling kernels, runs batch-invariant
    kernels, and accepts only its deterministic attention backends (with none set it picks fa3 on
    Hopper and older GPUs, flashinfer on Blackwell). So by default seeded completions do NOT reproduce
    on this backend: the same request with the same seed may return other tokens (scores are
    unaffected: they are log-probs, not samples). ``--sglang-arg enable_deterministic_inference=true``
    makes them reproduce, at that cost. ``seeds_reproduce`` says which; start-up logs it."""

    kind = "sglang"
    DETERMINISTIC = "enable_deterministic_inference"

    def __init__(self, model_dir: str, prompt: PromptSettings, *, engine_kwargs: dict | None = None):
        check_model_dir(model_dir)
        sglang = import_sglang()
        self.tokenizer = model_tokenizer(model_dir)
        self.label_ids = label_token_ids(self.tokenizer)
        self.eos_ids = resolve_eos_ids(self.tokenizer)
        engine_kwargs = dict(engine_kwargs or {})
        self.seeds_reproduce = engine_kwargs.get(self.DETERMINISTIC) is True
        if not self.seeds_reproduce:
            log.warning(
                "SGLang backend without deterministic inference: seeded completions do not reproduce "
                "(--sglang-arg %s=true makes them reproduce; it slows scoring and generation)", self.DETERMINISTIC)
        config = AutoConfig.from_pretrained(model_dir)
        check_vocabulary(model_dir, int(getattr(config.get_text_config(), "vocab_size", 0) or 0), self.tokenizer)
        # The radix cache (on by default) keeps the shared prompt prefix's KV across requests.
        self.engine = sglang.Engine(model_path=str(model_dir), **engine_kwargs)
        self.context_tokens = int(getattr(config.get_text_config(), "max_position_embeddings", 0) or 0)
        self.device, self.prefix_tokens, self.full_prefill_pairs = "cuda (SGLang)", 0, 0

    def score(self, batch: list[list[int]]) -> np.ndarray:
        # temperature 1: the reported log-probs are then those of the model's own distribution
        # (SGLang scales them by the sampling temperature); the one sampled token is discarded.
        outputs = self.engine.generate(input_ids=[list(ids) for ids in batch],
                                       sampling_params={"max_new_tokens": 1, "temperature": 1.0},
                                       return_logprob=True, logprob_start_len=-1,
                                       token_ids_logprob=list(self.label_ids))
        if isinstance(outputs, Mapping):
            outputs = [outputs]
        return np.stack([label_probs_from_sglang(o, self.label_ids) for o in outputs])

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_tokens: int, seeds: list[int], top_logprobs: int = 0) -> list[RolloutGroup]:
        """n samples per prompt as n single-sample requests, prompt-major, each with its own seed.
        As in the rollout engine (engines/sglang.py): under deterministic inference SGLang honours
        `sampling_seed` and the n copies of one request share it, so `n=n` would return n identical
        completions. The sample seeds come from the prompt's seed (seeds[p]) and the sample index
        (below 2^31); without deterministic inference SGLang ignores them (see the class docstring)."""
        per_sample = [x for p_seed in seeds for x in sample_seeds(int(p_seed) % SEED_LIMIT, n)]
        params = [{"n": 1, "temperature": float(temperature), "top_p": float(top_p),
                   "max_new_tokens": int(max_tokens), "stop_token_ids": list(self.eos_ids), "sampling_seed": s}
                  for s in per_sample]
        outputs = self.engine.generate(input_ids=[list(p) for p in prompts for _ in range(n)], sampling_params=params,
                                       return_logprob=True, logprob_start_len=-1,
                                       top_logprobs_num=top_logprobs or None)
        if isinstance(outputs, Mapping):
            outputs = [outputs]
        if len(outputs) != len(prompts) * n:
            raise RuntimeError(f"SGLang returned {len(outputs)} responses for {len(prompts)} prompts x n={n}")
        return [group_from_sglang(p, outputs[i * n:(i + 1) * n], top_logprobs) for i, p in enumerate(prompts)]

    def close(self) -> None:
        self.engine.shutdown()


def load_backend(kind: str, model_dir: str, prompt: PromptSettings, *, device: str = "auto",
                 dtype: str = "auto", max_batch: int = 64, share_prefix: bool = True,
                 sglang_kwargs: dict | None = None, forward_rows: int | None = None):
    if kind == "embedded":
        return EmbeddedBackend(model_dir, prompt, device=device, dtype=dtype, max_batch=max_batch,
                               share_prefix=share_prefix, forward_rows=forward_rows)
    if kind == "sglang":
        return SGLangBackend(model_dir, prompt, engine_kwargs=sglang_kwargs)
    raise ServeError(f"--backend must be one of {BACKENDS}, got {kind!r}")
