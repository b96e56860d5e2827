"""First-token scoring vs generating the reasoning first: the answer is the first token, so a score costs one prefill.

Run: ``pytest benchmarks/bench_scoring.py --benchmark -s``.

Setup (CPU, fp32): a small random Qwen3 (hidden 256, 4 layers, real vocabulary 151,936, tied
embeddings), the real Qwen3 tokenizer, PAIRS real NovelEval (query, passage) pairs rendered with the
AFRL prompt (≈ 450–900 tokens each), batch BATCH, left padding, prompts sorted by length.

Rows (median and min wall time of RUNS runs, after one warm-up, the two prefill methods taking
turns so that load from other processes on a shared machine hits both alike):
* ``first token, 5-row head``: FirstTokenScorer — one prefill through the decoder stack, the last
  hidden state times the five label rows of the LM head.
* ``first token, full-vocab head``: the same prefill through the whole causal LM with
  ``logits_to_keep=1``, i.e. a [B, V] head GEMM and softmax, then the five label probabilities.
* ``reason first, 150 tokens``: greedy ``generate`` of REASON_TOKENS new tokens (EOS suppressed via
  min_new_tokens, since a random model's traces have no natural length) before the grade could be
  read — the cost a reason-then-answer judge pays per pair. Run once (it is the slow one).

The 5-row head saves the [B, V] head GEMM and softmax, which at this toy size (H = 256, one
position per prompt) is a small part of a ~600-token prefill; its point is memory (no [B, V]
logits) and the exactness shown in tests/test_evaluate.py; the last line of the table times the
head alone. The order-of-magnitude gap is to reasoning first.

Quick mode (AFRL_BENCH_QUICK=1, see benchmarks/_quick.py): 4 pairs in batches of 2, a 1-layer model,
4 reasoning tokens, one timed run of each method, the head alone 3 times.
"""
import csv
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from afrl_fast.scoring import FirstTokenScorer
from afrl_fast.format import load_tokenizer
from afrl_fast.rulebook import load_rulebook

from _quick import choose, quick_note

NOVELEVAL = Path(__file__).resolve().parents[1] / "data" / "noveleval" / "noveleval_graded.tsv"
PAIRS = choose(16, 4)
BATCH = choose(8, 2)
REASON_TOKENS = choose(150, 4)
RUNS = choose(3, 1)
LAYERS = choose(4, 1)
HEAD_REPEATS = choose(20, 3)


def bench_model():
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=151936, hidden_size=256, intermediate_size=768,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, tie_word_embeddings=True, max_position_embeddings=4096)
    return Qwen3ForCausalLM(config).eval()


def noveleval_pairs(n):
    with open(NOVELEVAL, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    step = max(len(rows) // n, 1)           # spread over queries and passage lengths
    picked = rows[::step][:n]
    return [r["query"] for r in picked], [r["passage"] for r in picked]


def interleaved_seconds(fns: dict, runs=RUNS) -> dict:
    """{name: [seconds per run]}, the methods taking turns within each round, so load from
    other processes on a shared machine hits them alike. One warm-up call each first."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def batches(all_ids):
    """(row indices, prompts) per batch, longest first, as the scorer forms them."""
    order = np.argsort([-len(ids) for ids in all_ids], kind="stable")
    return [(order[s:s + BATCH], [all_ids[i] for i in order[s:s + BATCH]])
            for s in range(0, len(order), BATCH)]


def head_alone_seconds(model, scorer, repeats=HEAD_REPEATS):
    """Median seconds of the head by itself on BATCH hidden states: the part the two first-token
    rows differ in, measured apart from the prefill that dominates (and is noisy) at this size."""
    hidden = torch.randn(BATCH, model.config.hidden_size)
    weight = model.get_output_embeddings().weight.detach()
    five = lambda: hidden @ scorer.head_weight.T
    full = lambda: torch.softmax(hidden @ weight.T, -1)[:, scorer.label_ids]
    times = interleaved_seconds({"five": five, "full": full}, runs=repeats)
    return statistics.median(times["five"]), statistics.median(times["full"])


@pytest.mark.benchmark
def test_bench_first_token_vs_reason_first(capsys):
    torch.manual_seed(0)
    model, tokenizer = bench_model(), load_tokenizer()
    scorer = FirstTokenScorer(model, tokenizer, load_rulebook(), batch_size=BATCH, progress=False)
    queries, documents = noveleval_pairs(PAIRS)
    all_ids = scorer.prompt_ids(queries, documents)
    lengths = [len(ids) for ids in all_ids]

    def five_row():
        return scorer.score_token_ids(all_ids)

    def full_vocab():
        probs = np.zeros((len(all_ids), 5))
        with torch.inference_mode():
            for rows, batch in batches(all_ids):
                ids, mask, pos = scorer.left_pad(batch)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                               use_cache=False, logits_to_keep=1).logits[:, -1]
                p = torch.softmax(logits.double(), -1)[:, scorer.label_ids]
                probs[rows] = (p / p.sum(-1, keepdim=True)).numpy()
        return probs

    def reason_first():
        with torch.inference_mode():
            for _, batch in batches(all_ids):
                ids, mask, _ = scorer.left_pad(batch)
                model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                               max_new_tokens=REASON_TOKENS, min_new_tokens=REASON_TOKENS,
                               pad_token_id=scorer.pad_id)

    times = interleaved_seconds({"first token, 5-row head": five_row, "first token, full-vocab head": full_vocab})
    start = time.perf_counter()
    reason_first()                  # once, no warm-up: the prefill runs above warmed the model
    times[f"reason first, {REASON_TOKENS} tokens"] = [time.perf_counter() - start]
    slowest = statistics.median(times[f"reason first, {REASON_TOKENS} tokens"])
    lines = [f"scoring {PAIRS} NovelEval pairs, prompt tokens {min(lengths)}-{max(lengths)} "
             f"(mean {np.mean(lengths):.0f}), batch {BATCH}, Qwen3 h256 x{LAYERS} layers V=151936, CPU fp32, "
             f"{torch.get_num_threads()} threads; median (min) of {RUNS} interleaved runs{quick_note()}",
             f"{'method':<30} {'seconds (min)':>18} {'pairs/s':>8} {'ms/pair':>8} {'speed-up':>9}"]
    for name, runs in times.items():
        sec = statistics.median(runs)
        lines.append(f"{name:<30} {sec:>8.3f} ({min(runs):>7.3f}) {PAIRS / sec:>8.2f} "
                     f"{1000 * sec / PAIRS:>8.1f} {slowest / sec:>8.1f}x")
    head5, headv = head_alone_seconds(model, scorer)
    lines.append(f"head alone on {BATCH} last hidden states: 5 rows {1000 * head5:.3f} ms, full vocab + softmax "
                 f"{1000 * headv:.3f} ms ([{BATCH}, V] fp32 logits = {BATCH * model.config.vocab_size * 4 / 2**20:.1f} MiB)")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    # Not a timing assert: the two first-token paths must agree on what they compute.
    np.testing.assert_allclose(five_row(), full_vocab(), atol=1e-5)
