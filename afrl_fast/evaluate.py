"""First-token scoring and evaluation (DESIGN §1.4 and §1.6, paper §4.2).

In the AFRL format the grade is the first generated token, so scoring a (query, document) pair
costs one prefill: run the decoder stack (no LM head) over the prompt, take the last hidden state
— the position from which the first answer token is generated — and multiply it by ONLY the five
rows of the LM head that belong to the label tokens "0".."4". A softmax over those five logits is
P(0..4) renormalised over the label tokens, exactly the full-vocabulary softmax restricted to them
and renormalised (the log-sum-exp over the rest of the vocabulary cancels). The head costs
5·H instead of V·H (V = 151,936 for Qwen3) and no [B, V] logits are ever materialised.

    python -m afrl_fast.evaluate --model DIR --data pairs.parquet --out metrics.json \
        [--predictions preds.parquet] [--tokenizer T] [--batch-size B] [--max-prompt-tokens L]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write_many, check_output_path
from .data import DataError, read_pairs
from .format import FormatError, build_prompt, label_token_ids, load_tokenizer, resolve_prompt_settings
from .metrics import MetricsError, compute_metrics, expected_score, format_table, metrics_json
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


# ----------------------------------------------------------------------------- the scorer

class FirstTokenScorer:
    """P(0..4) of the first answer token for (query, document) pairs, one prefill each.

    model        a Hugging Face causal LM (moved to `device` if given, put in eval mode)
    tokenizer    its tokenizer; "0".."4" must be single tokens (format.label_token_ids)
    rulebook     gives the expert instructions of the prompt (format.build_prompt)
    max_prompt_tokens  over-long prompts get their DOCUMENT text cut (template and query intact);
                 `n_truncated` counts them after each call
    check_head   on construction, compare the 5-row head with the model's own full-vocab logits on
                 a short probe; a mismatch means an architecture with an unknown logit transform
    """

    def __init__(self, model, tokenizer, rulebook, *, batch_size: int = 8, device=None,
                 instructions: str | None = None, max_prompt_tokens: int | None = None,
                 progress: bool = True, check_head: bool = True):
        if batch_size < 1:
            raise ScoringError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.to(device) if device is not None else model
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self.tokenizer, self.rulebook, self.instructions = tokenizer, rulebook, instructions
        self.batch_size, self.max_prompt_tokens, self.progress = batch_size, max_prompt_tokens, progress
        self.label_ids = label_token_ids(tokenizer)
        self.base = decoder_stack(self.model)
        self.head_weight, self.head_bias = label_head(self.model, self.label_ids)
        self.transform = logit_transform(self.model.config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.n_truncated = 0
        if check_head:
            self.check_head()

    # --- prompts -------------------------------------------------------------------------------

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
        self.n_truncated = 0
        if self.max_prompt_tokens is not None:
            for i, ids in enumerate(all_ids):
                if len(ids) > self.max_prompt_tokens:
                    all_ids[i] = self.fit_document(queries[i], documents[i], ids)
                    self.n_truncated += 1
        return all_ids

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

    @torch.inference_mode()
    def label_logits(self, batch: list[list[int]]) -> torch.Tensor:
        """[B, 5] logits of the label tokens at the first answer position, float32."""
        input_ids, mask, positions = self.left_pad(batch)
        out = self.base(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False)
        last = out.last_hidden_state[:, -1].float()          # left padding: the last column is real
        logits = last @ self.head_weight.T
        if self.head_bias is not None:
            logits = logits + self.head_bias
        return self.transform(logits)

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
