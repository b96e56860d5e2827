"""First-token scoring (paper §4.2): one prefill per pair, a 5-row head, P(0..4).

In the AFRL format the grade is the first generated token, so scoring a (query, document) pair
costs one prefill: run the decoder stack (no LM head) over the prompt, take the last hidden state
— the position from which the first answer token is generated — and multiply it by ONLY the five
rows of the LM head that belong to the label tokens "0".."4". A softmax over those five logits is
P(0..4) renormalised over the label tokens, exactly the full-vocabulary softmax restricted to them
and renormalised (the log-sum-exp over the rest of the vocabulary cancels). The head costs
5·H instead of V·H (V = 151,936 for Qwen3) and no [B, V] logits are ever materialised.

Every prompt starts with the same tokens (system prompt and chat template up to the user's text).
Their KV is computed once (`SharedPrefix`); a prompt that starts with them prefills only its own
suffix on top of a copy of that KV. Attention over the cached keys gives the same hidden states
as a full prefill, so this changes no score beyond float rounding (the scorer checks it on a
probe at start-up). The candidates of one query can share one more level: the query's part of the
prompt prefilled once on top of the system prefix, each candidate prefilling only its document's
part (`FirstTokenScorer.score_query`, the online service's rerank). The online service
(`afrl_fast.serve`) scores through this same code; held-out evaluation (afrl_fast.evaluate) too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .engines.embedded import cache_argument
from .errors import ScoringError
from .format import label_token_ids
from .prompt_encoding import PREFIX_PROBES, PromptEncoder, SharedPrefix, appendable_cache, common_prefix

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


# ----------------------------------------------------------------------------- the 5-row head

def decoder_stack(model) -> torch.nn.Module:
    """The model without its LM head (Qwen3ForCausalLM -> Qwen3Model)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    if base is None:
        base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or base is model:
        raise ScoringError(f"{type(model).__name__}: cannot find the decoder stack under the LM head")
    return base


def label_head(model, label_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The five label rows of the LM head weight [5, H] and bias [5] (or None), in float32:
    the head is tiny, and fp32 keeps five logits exact even for a bf16 model."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ScoringError(f"{type(model).__name__} has no output embedding (LM head)")
    ids = torch.as_tensor(label_ids, device=head.weight.device)
    weight = head.weight.detach()[ids].float()
    bias = getattr(head, "bias", None)
    return weight, (bias.detach()[ids].float() if bias is not None else None)


def logit_transform(config):
    """The architecture's post-head logit changes, in the order their forward applies them:
    Cohere multiplies by logit_scale, Granite divides by logits_scaling, some models multiply by
    output_multiplier, Gemma 2/3 soft-cap with tanh. Qwen3 has none. The scorer's startup check
    catches any architecture that does something else."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:
        scale /= float(cfg.logits_scaling)
    if getattr(cfg, "output_multiplier", None) is not None:
        scale *= float(cfg.output_multiplier)
    cap = getattr(cfg, "final_logit_softcapping", None)

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if scale != 1.0:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return apply


# ----------------------------------------------------------------------------- the scorer

class FirstTokenScorer(PromptEncoder):
    """P(0..4) of the first answer token for (query, document) pairs, one prefill each.

    model        a Hugging Face causal LM (moved to `device` if given, put in eval mode)
    tokenizer    its tokenizer; "0".."4" must be single tokens (format.label_token_ids)
    rulebook     gives the expert instructions of the prompt (format.build_prompt)
    max_prompt_tokens  over-long prompts get their DOCUMENT text cut (template and query intact);
                 `n_truncated` counts them after each call
    check_head   on construction, compare the 5-row head with the model's own full-vocab logits on
                 a short probe; a mismatch means an architecture with an unknown logit transform
    share_prefix compute the KV of the prompts' common prefix once and prefill only each prompt's
                 suffix (module docstring); `n_full_prefill` counts prompts that could not use it
    """

    def __init__(self, model, tokenizer, rulebook, *, batch_size: int = 8, device=None,
                 instructions: str | None = None, max_prompt_tokens: int | None = None,
                 progress: bool = True, check_head: bool = True, share_prefix: bool = True):
        if batch_size < 1:
            raise ScoringError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.to(device) if device is not None else model
        self.model.eval()
        self.device = next(self.model.parameters()).device
        super().__init__(tokenizer, rulebook, instructions, max_prompt_tokens)
        self.batch_size, self.progress = batch_size, progress
        self.label_ids = label_token_ids(tokenizer)
        self.base = decoder_stack(self.model)
        self.head_weight, self.head_bias = label_head(self.model, self.label_ids)
        self.transform = logit_transform(self.model.config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.n_full_prefill = 0
        self.prefix: SharedPrefix | None = None
        if check_head:
            self.check_head()
        self.prefix = self.build_prefix() if share_prefix else None

    # --- the forward ---------------------------------------------------------------------------

    def left_pad(self, batch: list[list[int]]):
        """input_ids, attention_mask and position_ids for a left-padded batch. Positions count
        real tokens only, so a padded row sees the same RoPE positions as it would alone."""
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.as_tensor(ids)
            mask[row, width - len(ids):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return input_ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, H] last hidden states -> [B, 5] label logits, float32."""
        logits = hidden.float() @ self.head_weight.T
        if self.head_bias is not None:
            logits = logits + self.head_bias
        return self.transform(logits)

    @torch.inference_mode()
    def label_logits(self, batch: list[list[int]]) -> torch.Tensor:
        """[B, 5] logits of the label tokens at the first answer position, float32. Prompts that
        start with the shared prefix prefill only their suffix; the others the whole prompt."""
        if self.prefix is None:
            return self.full_label_logits(batch)
        reuse = [self.prefix.starts(ids) for ids in batch]
        if all(reuse):
            return self.suffix_label_logits([ids[len(self.prefix):] for ids in batch])
        self.n_full_prefill += len(batch) - sum(reuse)
        logits = torch.empty((len(batch), 5), device=self.device)
        for rows, fn in ((np.flatnonzero(reuse), self.suffix_label_logits),
                         (np.flatnonzero(np.logical_not(reuse)), self.full_label_logits)):
            if len(rows):
                cut = len(self.prefix) if fn == self.suffix_label_logits else 0
                logits[torch.as_tensor(rows, device=self.device)] = fn([batch[i][cut:] for i in rows])
        return logits

    @torch.inference_mode()
    def full_label_logits(self, batch: list[list[int]]) -> torch.Tensor:
        """Label logits after a full prefill of left-padded prompts."""
        input_ids, mask, positions = self.left_pad(batch)
        out = self.base(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False)
        return self.head_logits(out.last_hidden_state[:, -1])   # left padding: the last column is real

    @torch.inference_mode()
    def suffix_label_logits(self, suffixes: list[list[int]], prefix: SharedPrefix | None = None) -> torch.Tensor:
        """Label logits of prompts = shared prefix + suffix, prefilling only the suffixes.
        `prefix`: the system prefix (default) or one extended by a query (`extend_prefix`).

        Suffixes are right-padded after the prefix: a pad only ever follows its row's real tokens,
        so causal attention alone keeps it out of every real position and no mask is needed.
        Positions continue from the prefix length; each row's last real position is gathered."""
        prefix = self.prefix if prefix is None else prefix
        lengths = torch.as_tensor([len(s) for s in suffixes], device=self.device)
        width, start = int(lengths.max()), len(prefix)
        input_ids = torch.full((len(suffixes), width), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(suffixes):
            input_ids[row, :len(ids)] = torch.as_tensor(ids)
        positions = torch.arange(start, start + width, device=self.device).expand(len(suffixes), -1)
        out = self.base(input_ids=input_ids.to(self.device), position_ids=positions, use_cache=True,
                        **{cache_argument(self.base): prefix.cache(self.model.config, len(suffixes))})
        last = out.last_hidden_state[torch.arange(len(suffixes), device=self.device), lengths - 1]
        return self.head_logits(last)

    # --- two-level sharing: the system prefix, then one query's part ------------------------------

    @torch.inference_mode()
    def extend_prefix(self, ids: list[int]) -> SharedPrefix:
        """The shared prefix extended to `ids` (which start with it: the system prefix plus a
        query's part of the prompt): one forward over the extra tokens on top of the cached KV."""
        start = len(self.prefix)
        cache = self.prefix.cache(self.model.config, 1)
        self.base(input_ids=torch.as_tensor([ids[start:]], device=self.device),
                  position_ids=torch.arange(start, len(ids), device=self.device)[None], use_cache=True,
                  **{cache_argument(self.base): cache})
        return SharedPrefix(list(ids), [(layer.keys, layer.values) for layer in cache.layers])

    def score_query(self, query_ids: list[int], candidates: list[list[int]]) -> tuple[np.ndarray, int]:
        """[n, 5] P(0..4) of the prompts of one query's candidates, and how many of them were scored
        on the query's own prefix.

        `query_ids` are the ids every candidate's prompt starts with, system prefix included
        (`PromptPieces.query_ids`). They are prefilled once on top of the system prefix's KV
        (`extend_prefix`) and each candidate prefills only its document's part, candidates batched
        together, longest first. A candidate whose ids do not start with `query_ids` (its
        tokenisation merged a token across the query/document boundary), or all of them where
        fewer than two could share it or there is no system prefix, is scored like any prompt
        (`score_token_ids`: the system prefix, else a full prefill). Same scores as
        `score_token_ids` up to float rounding."""
        n_query = len(query_ids)
        probs = np.zeros((len(candidates), 5), dtype=np.float64)
        shared = []
        if self.prefix is not None and self.prefix.starts(query_ids):
            shared = [i for i, ids in enumerate(candidates) if len(ids) > n_query and ids[:n_query] == query_ids]
        if len(shared) < 2:
            shared = []
        if shared:
            prefix = self.extend_prefix(query_ids)
            shared.sort(key=lambda i: -len(candidates[i]))
            with torch.inference_mode():
                for start in range(0, len(shared), self.batch_size):
                    rows = shared[start:start + self.batch_size]
                    logits = self.suffix_label_logits([candidates[i][n_query:] for i in rows], prefix)
                    probs[rows] = torch.softmax(logits.double(), dim=-1).cpu().numpy()
        rest = sorted(set(range(len(candidates))).difference(shared))
        if rest:
            probs[rest] = self.score_token_ids([candidates[i] for i in rest])
        return probs, len(shared)

    @torch.inference_mode()
    def build_prefix(self) -> SharedPrefix | None:
        """The shared prefix and its KV, or None where it cannot be reused (cache layout, no
        common tokens). A probe prompt scored both ways must agree, else the model's attention
        does something the cache copy does not reproduce."""
        if not appendable_cache(self.model.config):
            return None
        probes = self.tokenizer([self.prompt_text(q, d) for q, d in PREFIX_PROBES], add_special_tokens=False)
        ids = common_prefix(probes["input_ids"])
        if not ids:
            return None
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self.base(input_ids=torch.as_tensor([ids], device=self.device), use_cache=True,
                  **{cache_argument(self.base): cache})
        prefix = SharedPrefix(ids, [(layer.keys, layer.values) for layer in cache.layers])
        probe = probes["input_ids"][0]
        full = self.full_label_logits([probe])
        self.prefix = prefix
        reused = self.suffix_label_logits([probe[len(ids):]])
        exact = next(self.model.parameters()).dtype == torch.float32
        tol = 1e-3 if exact else 5e-2 * max(1.0, float(full.abs().max()))
        if not torch.allclose(reused, full, atol=tol, rtol=1e-3 if exact else 2e-2):
            raise ScoringError(f"{type(self.model).__name__}: scoring after the cached prompt prefix gives "
                               f"{reused.tolist()} but a full prefill {full.tolist()}; use share_prefix=False")
        return prefix

    def score_token_ids(self, all_ids: list[list[int]]) -> np.ndarray:
        """[n, 5] probabilities, in input order. Batches are formed longest-first over prompts
        sorted by length, so padding is small and the biggest batch (peak memory) comes first."""
        from tqdm.auto import tqdm

        order = np.argsort([-len(ids) for ids in all_ids], kind="stable")
        probs = np.zeros((len(all_ids), 5), dtype=np.float64)
        with tqdm(total=len(all_ids), unit="pair", desc="first-token scoring", disable=not self.progress) as bar:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                logits = self.label_logits([all_ids[i] for i in rows])
                probs[rows] = torch.softmax(logits.double(), dim=-1).cpu().numpy()
                bar.update(len(rows))
        return probs

    def score(self, queries, documents) -> np.ndarray:
        """[n, 5] P(0..4) for parallel lists of queries and documents."""
        queries, documents = list(queries), list(documents)
        if len(queries) != len(documents):
            raise ScoringError(f"{len(queries)} queries but {len(documents)} documents")
        if not queries:
            return np.zeros((0, 5))
        return self.score_token_ids(self.prompt_ids(queries, documents))

    def score_pairs(self, table) -> np.ndarray:
        """[n, 5] P(0..4) for a pairs table (pyarrow Table with `query` and `document` columns)."""
        for col in ("query", "document"):
            if col not in table.column_names:
                raise ScoringError(f"pairs table has no column {col!r} (have {table.column_names})")
        return self.score(table.column("query").to_pylist(), table.column("document").to_pylist())

    @torch.inference_mode()
    def check_head(self) -> None:
        """The 5-row head must reproduce the model's own logits at the label ids on a probe."""
        probe = self.encode(self.prompt_text("probe query", "probe document"))[-32:]
        full = self.model(input_ids=torch.as_tensor([probe], device=self.device), use_cache=False).logits
        expect = full[0, -1, self.label_ids].float()
        got = self.label_logits([probe])[0]
        tol = 1e-3 if full.dtype == torch.float32 else 5e-2 * max(1.0, float(expect.abs().max()))
        if not torch.allclose(got, expect, atol=tol, rtol=1e-3 if full.dtype == torch.float32 else 2e-2):
            raise ScoringError(f"{type(self.model).__name__}: the 5-row head gives {got.tolist()} but the "
                               f"model's logits are {expect.tolist()}; its logit transform is not supported")


# ----------------------------------------------------------------------------- evaluation in a training run

class EngineFirstTokenScorer(PromptEncoder):
    """First-token scoring delegated to a rollout engine that computes it (`score_first_token`):
    the SGLang server scores held-out splits during RL so no rank keeps a replica of the policy."""

    def __init__(self, engine, tokenizer, rulebook, *, instructions: str | None = None,
                 max_prompt_tokens: int | None = None, batch_size: int = 64):
        super().__init__(tokenizer, rulebook, instructions, max_prompt_tokens)
        self.engine, self.batch_size = engine, batch_size
        self.label_ids = label_token_ids(tokenizer)

    def score_pairs(self, table) -> np.ndarray:
        ids = self.prompt_ids(table.column("query").to_pylist(), table.column("document").to_pylist())
        if not ids:
            return np.zeros((0, 5))
        return np.concatenate([self.engine.score_first_token(ids[i:i + self.batch_size], self.label_ids)
                               for i in range(0, len(ids), self.batch_size)])


def has_tokenizer(directory: str) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_model(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise ScoringError(f"{path}: no config.json, so not a Hugging Face model folder (save_pretrained output)")
    kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:   # no config/weights, an unknown model_type, …
        raise ScoringError(f"{path}: cannot load the model: {' '.join(str(e).split())[:300]}") from None
