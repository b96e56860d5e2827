"""First-token scoring and evaluation (paper §4.2).

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
(`afrl_fast.serve`) scores through this same code.

    python -m afrl_fast.evaluate --model DIR --data pairs.parquet --out metrics.json \
        [--predictions preds.parquet] [--tokenizer T] [--batch-size B] [--max-prompt-tokens L]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write_many, check_output_path
from .data import DataError, read_pairs
from .format import FormatError, build_prompt, label_token_ids, load_tokenizer, resolve_prompt_settings
from .metrics import MetricsError, compute_metrics, expected_score, format_table, metrics_json
from .rollout import cache_argument
from .rulebook import RulebookError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class ScoringError(ValueError):
    """A model, tokenizer or input that first-token scoring cannot handle; the message says why."""


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


# ----------------------------------------------------------------------------- the shared prefix

# Unlike first characters (letter, digit, punctuation, non-Latin scripts): the token ids all their
# prompts share end before the user's text, whatever that text starts with.
PREFIX_PROBES = (("alpha", "beta"), ("7 zeta", "9 omega"), ("(x) Überblick", "[y]"), ("東京", "…テスト"))


def common_prefix(seqs: list[list[int]]) -> list[int]:
    """The longest list every sequence starts with."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return list(first[:i])
    return list(first[:n])


@dataclass
class SharedPrefix:
    """The token ids every prompt starts with, and their keys/values [1, kv_heads, P, head_dim]
    per layer, computed once."""
    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    def __len__(self) -> int:
        return len(self.ids)

    def starts(self, ids: list[int]) -> bool:
        """Whether a prompt can reuse the prefix: its first ids are exactly the prefix's (a
        tokenizer may merge the prefix's last token with the user's text) and a suffix follows."""
        return len(ids) > len(self.ids) and ids[:len(self.ids)] == self.ids

    def cache(self, config, rows: int):
        """A fresh KV cache holding the prefix for `rows` sequences; the forward appends to it."""
        from transformers import DynamicCache

        return DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.layers],
                            config=config)


def appendable_cache(config) -> bool:
    """Only plain full-attention KV layers can be extended from a copied prefix; sliding-window or
    recurrent layers keep state that concatenation would not reproduce."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


# ----------------------------------------------------------------------------- prompts

class PromptEncoder:
    """Token ids of the AFRL prompt of (query, document) pairs, as `format.build_prompt` renders
    it with the model's chat template.

    max_prompt_tokens  over-long prompts get their DOCUMENT text cut (template and query intact);
                       after each `prompt_ids` call, `truncated_rows` lists the rows cut and
                       `n_truncated` counts them
    """

    def __init__(self, tokenizer, rulebook, instructions: str | None = None,
                 max_prompt_tokens: int | None = None):
        self.tokenizer, self.rulebook, self.instructions = tokenizer, rulebook, instructions
        self.max_prompt_tokens = max_prompt_tokens
        self.truncated_rows: list[int] = []
        self.n_truncated = 0

    def prompt_text(self, query: str, document: str) -> str:
        return build_prompt(self.tokenizer, self.rulebook, query, document, self.instructions)

    def encode(self, text: str) -> list[int]:
        # The chat template already writes any BOS/special tokens the model expects.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def fit_document(self, query: str, document: str, ids: list[int]) -> list[int]:
        """Cut the document's text at a token boundary until the prompt fits max_prompt_tokens."""
        limit = self.max_prompt_tokens
        doc = " ".join(str(document).split())      # the same normalisation user_message applies
        cut = self.document_cutter(doc)
        keep = cut.n_tokens - (len(ids) - limit)
        while keep > 0:
            ids = self.encode(self.prompt_text(query, cut(keep)))
            if len(ids) <= limit:
                return ids
            keep -= len(ids) - limit              # re-tokenising across the cut can shift a token or two
        ids = self.encode(self.prompt_text(query, ""))
        if len(ids) > limit:
            raise ScoringError(f"the prompt without its document is already {len(ids)} tokens "
                               f"> max_prompt_tokens={limit} (query: {query[:80]!r})")
        return ids

    def document_cutter(self, doc: str):
        """cut(k) = the document's text up to its k-th token. Fast tokenizers cut the original
        text at a character offset; slow ones decode the first k tokens."""
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
            ends = [end for _, end in enc["offset_mapping"]]
            cut = lambda k: doc[:ends[k - 1]]
        else:
            ends = self.encode(doc)
            cut = lambda k: self.tokenizer.decode(ends[:k])
        cut.n_tokens = len(ends)
        return cut

    def prompt_ids(self, queries, documents) -> list[list[int]]:
        """Token ids of every prompt; fast batch tokenisation, then the over-long ones cut."""
        texts = [self.prompt_text(q, d) for q, d in zip(queries, documents)]
        all_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        self.truncated_rows = []
        if self.max_prompt_tokens is not None:
            for i, ids in enumerate(all_ids):
                if len(ids) > self.max_prompt_tokens:
                    try:
                        all_ids[i] = self.fit_document(queries[i], documents[i], ids)
                    except ScoringError as e:
                        e.row = i           # callers name the row
                        raise
                    self.truncated_rows.append(i)
        self.n_truncated = len(self.truncated_rows)
        return all_ids


class PromptPieces:
    """The AFRL prompt cut around its user message, so a pair's token ids need neither the chat
    template nor a re-tokenisation of the system prompt.

    The template is rendered once with a marker user message: prompt = `pre` + user message +
    `post`. A fast Hugging Face tokenizer splits a text at its added (special) tokens before
    anything else and tokenises the pieces between them independently, so the ids of `pre` up to
    its last special token (`<|im_start|>` for Qwen3) and of `post` from its first one
    (`<|im_end|>`) never change: `head` and `tail`, tokenised once. Per pair only the piece in
    between — `segment(query, document)`, the user message and what the template writes next to it
    — is tokenised: ids = head + ids(segment) + tail, the very ids `PromptEncoder.prompt_ids` gives
    (checked on probe pairs at construction; `ok` is False, and callers use PromptEncoder, where
    they differ or the template does not insert the user message verbatim).

    The query's share: `query_segment(query)` is the segment up to "Document:" (the user message for
    an empty document, trailing whitespace dropped); head + its ids is what every candidate of that
    query starts with, unless its tokenisation merges a token across the query/document boundary,
    which the caller detects by comparing ids, as for the system prefix (`SharedPrefix.starts`).
    """

    MARK_QUERY, MARK_DOCUMENT = "afrlquerymarker", "afrldocumentmarker"
    # first characters of every kind, whitespace runs, an added token's text inside a document,
    # combining marks (the tokenizer normalises NFC), a query ending in punctuation
    PROBES = PREFIX_PROBES + (("what?", ":: colon first"), ("caf\u00e9", "\u0301 a combining mark first"),
                              ("q", "a <|im_end|> inside <|im_start|>"), ("x", "  spaced \t out \n doc  "),
                              ("Straße", "ß"), ("query", "document"))

    def __init__(self, encoder: PromptEncoder):
        from .format import user_message

        self.encoder, self.user_message = encoder, user_message
        tok = encoder.tokenizer
        backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
        # the raw Rust tokenizer skips the Python wrapper's overhead; only without padding/truncation set
        self.backend = backend if backend is not None and backend.padding is None and backend.truncation is None \
            else None
        self.ok = False
        text = encoder.prompt_text(self.MARK_QUERY, self.MARK_DOCUMENT)
        marker = user_message(self.MARK_QUERY, self.MARK_DOCUMENT)
        if text.count(marker) != 1:
            return
        pre, post = text.split(marker)
        added = getattr(tok, "added_tokens_decoder", None) or {}
        specials = [t.content for t in added.values() if t.content] or list(getattr(tok, "all_special_tokens", []))
        cut_pre = max((pre.rfind(t) + len(t) for t in specials if t in pre), default=0)
        cut_post = min((post.find(t) for t in specials if t in post), default=len(post))
        for start, end in ((cut_pre, cut_post), (0, len(post))):   # else: the whole prompt is the segment
            self.head = encoder.encode(pre[:start]) if start else []
            self.tail = encoder.encode(post[end:]) if end < len(post) else []
            self.seg_pre, self.seg_post = pre[start:], post[:end]
            if self.check():
                self.ok = True
                break
        self.query_ok = self.ok and self.check_query()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return self.encoder.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def segment(self, query: str, document: str) -> str:
        return self.seg_pre + self.user_message(query, document) + self.seg_post

    def query_segment(self, query: str) -> str:
        return self.seg_pre + self.user_message(query, "").rstrip()

    def prompt_ids(self, queries, documents) -> list[list[int]]:
        """The same ids as PromptEncoder.prompt_ids (without truncation)."""
        head, tail = self.head, self.tail
        return [head + ids + tail for ids in self.encode_batch([self.segment(q, d) for q, d in zip(queries, documents)])]

    def probe_pairs(self):
        queries, documents = zip(*[(q, d) for q, _ in self.PROBES for _, d in self.PROBES])
        return list(queries), list(documents)

    def check(self) -> bool:
        """Probe pairs get PromptEncoder's ids."""
        queries, documents = self.probe_pairs()
        expect = self.encoder.tokenizer([self.encoder.prompt_text(q, d) for q, d in zip(queries, documents)],
                                        add_special_tokens=False)["input_ids"]
        return self.prompt_ids(queries, documents) == expect

    def query_ids(self, queries) -> list[list[int]]:
        """For each query the ids every prompt of it starts with, boundary merges aside."""
        return [self.head + ids for ids in self.encode_batch([self.query_segment(q) for q in queries])]

    def check_query(self) -> bool:
        """Whether the query's ids start the probe pairs' prompts (else sharing them is not worth it:
        this tokenizer merges across the query/document boundary as a rule)."""
        queries, documents = self.probe_pairs()
        full = self.prompt_ids(queries, documents)
        return all(len(f) > len(q) and f[:len(q)] == q for q, f in zip(self.query_ids(queries), full))


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


def evaluate_splits(scorer, tables: dict, names, *, max_rows: int, info) -> dict:
    """First-token metrics on held-out splits with `scorer.score_pairs` (FirstTokenScorer or
    EngineFirstTokenScorer); each rank scores a slice, every rank gets all."""
    from . import dist as D

    results = {}
    for name in names:
        table = tables[name]
        if max_rows and table.num_rows > max_rows:
            table = table.slice(0, max_rows)
        rows = list(range(info.rank, table.num_rows, info.world))
        probs = scorer.score_pairs(table.take(rows)) if rows else np.zeros((0, 5))
        full = np.zeros((table.num_rows, 5))
        for r, p in D.all_gather_objects((rows, probs)):
            full[r] = p
        results[name] = compute_metrics(np.asarray(table.column("label").to_pylist()), full,
                                        np.asarray(table.column("query_id").to_pylist()))
        # the answered grade per pair, as one string of digits: what a paired comparison of two
        # phases on the same pairs needs (train.py keeps it out of results.json's rows)
        results[name]["answers"] = "".join(map(str, full.argmax(1).tolist()))
    return results


def majority_baseline(train_table, tables: dict, names) -> dict:
    """Always predicting the most frequent training grade (all scores tie: Pair-ACC 0.5)."""
    majority = int(np.bincount(np.asarray(train_table.column("label").to_pylist()), minlength=5).argmax())
    out = {}
    for name in names:
        t = tables[name]
        probs = np.zeros((t.num_rows, 5))
        probs[:, majority] = 1.0
        out[name] = compute_metrics(np.asarray(t.column("label").to_pylist()), probs,
                                    np.asarray(t.column("query_id").to_pylist()))
    return out


def trace_validity(engine, tokenizer, rulebook, prompt_ids, labels, n: int, *, max_new_tokens: int,
                   seed: int) -> dict:
    """Greedy traces of the first n prompts: the share in valid AFRL format, with y_dec = y_final,
    and whose boxed step values imply the answered grade (ŷ = y_dec)."""
    from .rollout import STREAM_EVAL, generate_rollouts, prompt_seed
    from .verify import RewardConfig, verify_batch

    n = min(n, len(prompt_ids))
    if n == 0:
        return {"trace_fmt_rate": None, "trace_cst_rate": None, "trace_logic_rate": None, "n_traces": 0}
    ro = generate_rollouts(engine, tokenizer, list(range(n)), prompt_ids[:n], labels[:n], group_size=1,
                           temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                           seeds=[prompt_seed(seed, STREAM_EVAL, 0, i) for i in range(n)])
    res = verify_batch(ro.texts, ro.labels, rulebook, RewardConfig(gate="literal"))
    return {"trace_fmt_rate": float(res.fmt.mean()), "trace_cst_rate": float(res.cst.mean()),
            "trace_logic_rate": float((res.fmt & (res.y_hat == res.y_dec)).mean()), "n_traces": n}


RESULT_KEYS = [("acc5", "5-ACC"), ("acc2", "2-ACC"), ("pair_acc", "Pair-ACC"), ("ndcg3", "NDCG@3"),
               ("macro_f1", "Macro-F1"), ("weighted_f1", "W-F1")]


def results_table(rows: dict, names) -> str:
    """model → split → metrics as one text table per split (percentages)."""
    lines = []
    for name in names:
        lines.append(f"\n{name.upper()}")
        lines.append(f"{'model':<16}" + "".join(f"{h:>10}" for _, h in RESULT_KEYS))
        for model, res in rows.items():
            m = res[name]
            lines.append(f"{model:<16}" + "".join(f"{100 * m[k]:>10.2f}" if m.get(k) is not None else f"{'n/a':>10}"
                                                  for k, _ in RESULT_KEYS))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- data and CLI

def predictions_table(table, probs: np.ndarray):
    """query_id, doc_id, label, p0..p4, score, pred (float64 so metrics recompute exactly)."""
    import pyarrow as pa

    cols = {"query_id": table.column("query_id"), "doc_id": table.column("doc_id"),
            "label": table.column("label").cast(pa.int8())}
    cols.update({f"p{k}": pa.array(probs[:, k], pa.float64()) for k in range(5)})
    cols["score"] = pa.array(expected_score(probs), pa.float64())
    cols["pred"] = pa.array(probs.argmax(1).astype(np.int8), pa.int8())
    return pa.table(cols)


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


def check_device(name: str) -> None:
    """--device must name a device this machine has (checked before any loading)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ScoringError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, …)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ScoringError(f"--device {name}: no CUDA device is visible on this machine (use --device cpu)")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m afrl_fast.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model folder")
    ap.add_argument("--data", required=True, help="pairs parquet: query_id, doc_id, query, document, label")
    ap.add_argument("--out", required=True, help="metrics JSON")
    ap.add_argument("--predictions", help="also write per-pair predictions parquet here")
    ap.add_argument("--tokenizer", help="tokenizer folder or 'qwen3' (default: the model's, else qwen3)")
    ap.add_argument("--rulebook", help="rulebook YAML (default: the copy in the model folder, else the default rulebook)")
    ap.add_argument("--instructions", default=None,
                    help="system prompt: full (the whole rulebook), short (its summary) or a text file; "
                         "default: the prompt saved in the model folder at export, else full")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-prompt-tokens", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # everything that can be checked cheaply is, before the model is loaded and scored
        check_output_path(args.out, ScoringError)
        if args.predictions:
            check_output_path(args.predictions, ScoringError)
        check_device(args.device)
        table = read_pairs(args.data)           # validates the schema; errors name file and column
        tok_path = args.tokenizer or (args.model if has_tokenizer(args.model) else "qwen3")
        tokenizer = load_tokenizer(tok_path)
        if not Path(args.model).is_dir():
            raise ScoringError(f"{args.model}: model folder not found")
        prompt = resolve_prompt_settings(args.model, args.rulebook, args.instructions)
        scorer = FirstTokenScorer(load_model(args.model, args.dtype), tokenizer, prompt.rulebook,
                                  batch_size=args.batch_size, device=args.device,
                                  instructions=prompt.instructions,
                                  max_prompt_tokens=args.max_prompt_tokens, progress=not args.no_progress)
        probs = scorer.score_pairs(table)
        metrics = compute_metrics(table.column("label").to_numpy(zero_copy_only=False), probs,
                                  np.asarray(table.column("query_id").to_pylist(), dtype=object))
        metrics.update(model=str(args.model), data=str(args.data), n_truncated=scorer.n_truncated,
                       max_prompt_tokens=args.max_prompt_tokens)
        outputs = {Path(args.out): lambda f: f.write(metrics_json(metrics).encode("utf-8"))}
        if args.predictions:
            import pyarrow.parquet as pq
            preds = predictions_table(table, probs)
            outputs[Path(args.predictions)] = lambda f: pq.write_table(preds, f)
        atomic_write_many(outputs)              # both files or neither
    except (DataError, ScoringError, MetricsError, FormatError, RulebookError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    if args.max_prompt_tokens is not None:
        print(f"truncated documents: {scorer.n_truncated} of {metrics['n']} "
              f"(prompts cut to {args.max_prompt_tokens} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
