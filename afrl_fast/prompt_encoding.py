"""Token ids of AFRL prompts for first-token scoring, and the KV of the prefix every prompt shares.

Every prompt starts with the same tokens (system prompt and chat template up to the user's text).
Their KV is computed once (`SharedPrefix`); a prompt that starts with them prefills only its own
suffix on top of a copy of that KV. `PromptPieces` splits one step further, so the candidates of one
query share the query's part too (the online service's rerank).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ScoringError
from .format import build_prompt, user_message


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
