"""First-token scoring: the 5-row head against the full-vocabulary softmax, batching, truncation,
and the evaluate CLI end to end on real NovelEval passages with a tiny Qwen3 and the real tokenizer."""
import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from afrl_fast.errors import ScoringError
from afrl_fast.evaluate.__main__ import main as evaluate_main
from afrl_fast.scoring import FirstTokenScorer
from afrl_fast.format import build_prompt, label_token_ids, load_tokenizer
from afrl_fast.metrics.__main__ import main as metrics_main
from afrl_fast.metrics import compute_metrics
from afrl_fast.rulebook import load_rulebook

NOVELEVAL = Path(__file__).resolve().parents[1] / "data" / "noveleval" / "noveleval_graded.tsv"
GRADE_0_2_TO_0_4 = {0: 0, 1: 2, 2: 4}
VOCAB = 151936
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def rulebook():
    return load_rulebook()


def tiny_qwen3(seed=0):
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, tie_word_embeddings=True))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3()


PAIRS = [("who won the 2023 palme d'or", "Anatomy of a Fall by Justine Triet won the Palme d'Or."),
         ("spider-verse cast", "A film. " * 40),
         ("q", "short"),
         ("how tall is the tower", "The tower is 330 metres tall, built in 1889 for the World's Fair. " * 3)]


def reference_probs(model, tokenizer, rulebook, pairs):
    """Full-vocabulary softmax at the last prompt position, one unpadded pair at a time,
    restricted to the label tokens and renormalised."""
    ids = label_token_ids(tokenizer)
    out = []
    with torch.no_grad():
        for query, document in pairs:
            text = build_prompt(tokenizer, rulebook, query, document)
            input_ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
            full = torch.softmax(model(input_ids=input_ids).logits[0, -1].double(), -1)
            out.append((full[ids] / full[ids].sum()).numpy())
    return np.stack(out)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_five_row_head_equals_full_vocab_softmax(model, tokenizer, rulebook, batch_size):
    # batch 3 over prompts of different lengths: left padding + sorting must not change anything
    scorer = FirstTokenScorer(model, tokenizer, rulebook, batch_size=batch_size, progress=False)
    probs = scorer.score([q for q, _ in PAIRS], [d for _, d in PAIRS])
    expect = reference_probs(model, tokenizer, rulebook, PAIRS)
    assert probs.shape == (len(PAIRS), 5)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(probs, expect, atol=1e-5, rtol=1e-4)
    # the pairs differ, so a permutation of rows would be caught
    assert np.abs(np.diff(probs, axis=0)).max() > 1e-4


def test_head_bias_is_used(tokenizer, rulebook):
    model = tiny_qwen3(seed=1)
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(TINY["hidden_size"], VOCAB, bias=True)
    with torch.no_grad():
        head.bias.normal_(0, 2.0)
    model.lm_head = head
    scorer = FirstTokenScorer(model, tokenizer, rulebook, batch_size=2, progress=False)
    probs = scorer.score([q for q, _ in PAIRS], [d for _, d in PAIRS])
    np.testing.assert_allclose(probs, reference_probs(model, tokenizer, rulebook, PAIRS), atol=1e-5)


def small(config_cls, **extra):
    torch.manual_seed(2)
    cfg = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, **extra)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


LOGIT_TRANSFORMS = [
    ("gemma2 soft-cap", lambda: small(transformers.Gemma2Config, final_logit_softcapping=0.5)),
    ("cohere logit_scale", lambda: small(transformers.CohereConfig, logit_scale=7.0)),
    ("granite logits_scaling", lambda: small(transformers.GraniteConfig, logits_scaling=0.1)),
]


@pytest.mark.parametrize("name, build", LOGIT_TRANSFORMS, ids=[n for n, _ in LOGIT_TRANSFORMS])
def test_logit_transforms_are_respected(name, build, tokenizer, rulebook):
    model = build()
    scorer = FirstTokenScorer(model, tokenizer, rulebook, batch_size=2, progress=False)
    probs = scorer.score([q for q, _ in PAIRS[:3]], [d for _, d in PAIRS[:3]])
    np.testing.assert_allclose(probs, reference_probs(model, tokenizer, rulebook, PAIRS[:3]), atol=1e-5)


def test_startup_check_rejects_an_unknown_logit_transform(tokenizer, rulebook, monkeypatch):
    import afrl_fast.scoring as ev

    monkeypatch.setattr(ev, "logit_transform", lambda config: (lambda logits: logits))
    with pytest.raises(ScoringError, match="logit transform"):
        FirstTokenScorer(small(transformers.Gemma2Config, final_logit_softcapping=0.5), tokenizer, rulebook)


def test_left_pad_positions_count_real_tokens(model, tokenizer, rulebook):
    scorer = FirstTokenScorer(model, tokenizer, rulebook, progress=False, check_head=False)
    ids, mask, pos = scorer.left_pad([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [scorer.pad_id, scorer.pad_id, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos[0].tolist() == [0, 1, 2] and pos[1, -1].item() == 0


def test_long_documents_are_cut_to_fit_with_template_intact(model, tokenizer, rulebook):
    base = len(tokenizer.encode(build_prompt(tokenizer, rulebook, "tower height", ""), add_special_tokens=False))
    limit = base + 25
    long_doc = "The tower is 330 metres tall and was finished in 1889 for the fair. " * 30
    scorer = FirstTokenScorer(model, tokenizer, rulebook, max_prompt_tokens=limit, progress=False)
    ids = scorer.prompt_ids(["tower height", "tower height"], [long_doc, "short text"])
    assert scorer.n_truncated == 1
    assert limit - 5 <= len(ids[0]) <= limit
    text = tokenizer.decode(ids[0])
    assert text.endswith(build_prompt(tokenizer, rulebook, "q", "d").split("Document: d")[1])
    document = text.split("Document: ")[1].split("<|im_end|>")[0]
    assert 20 < len(document) and long_doc.startswith(document)
    assert ids[1] == tokenizer.encode(build_prompt(tokenizer, rulebook, "tower height", "short text"),
                                      add_special_tokens=False)
    # scoring a cut prompt equals scoring the cut text directly
    probs = scorer.score_token_ids(ids)
    np.testing.assert_allclose(probs[:1], reference_probs(model, tokenizer, rulebook,
                                                          [("tower height", document)]), atol=1e-5)


def test_prompt_that_cannot_fit_is_an_error(model, tokenizer, rulebook):
    scorer = FirstTokenScorer(model, tokenizer, rulebook, max_prompt_tokens=50, progress=False)
    with pytest.raises(ScoringError, match="without its document"):
        scorer.score(["q"], ["a document " * 20])


def test_scorer_input_errors(model, tokenizer, rulebook):
    scorer = FirstTokenScorer(model, tokenizer, rulebook, progress=False, check_head=False)
    with pytest.raises(ScoringError, match="'document'"):
        scorer.score_pairs(pa.table({"query": ["q"], "doc": ["d"]}))
    with pytest.raises(ScoringError, match="2 queries but 1 documents"):
        scorer.score(["a", "b"], ["d"])
    assert scorer.score([], []).shape == (0, 5)
    with pytest.raises(ScoringError, match="batch_size"):
        FirstTokenScorer(model, tokenizer, rulebook, batch_size=0)


# ----------------------------------------------------------------------------- NovelEval, CLI

def noveleval_pairs(n_queries=5, docs_per_query=8) -> pa.Table:
    """The first n_queries NovelEval queries, grades 0/1/2 mapped to 0/2/4 on our scale."""
    assert NOVELEVAL.is_file(), f"NovelEval data missing at {NOVELEVAL}"
    rows, per_query = [], {}
    with open(NOVELEVAL, encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if r["qid"] not in per_query and len(per_query) == n_queries:
                continue
            per_query.setdefault(r["qid"], 0)
            if per_query[r["qid"]] < docs_per_query:
                per_query[r["qid"]] += 1
                rows.append(r)
    return pa.table({"query_id": [r["qid"] for r in rows], "doc_id": [r["docid"] for r in rows],
                     "query": [r["query"] for r in rows], "document": [r["passage"] for r in rows],
                     "label": pa.array([GRADE_0_2_TO_0_4[int(r["grade_0_2"])] for r in rows], pa.int8())})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer):
    path = tmp_path_factory.mktemp("tiny_qwen3")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_noveleval_is_real_graded_data():
    table = noveleval_pairs()
    assert table.num_rows == 40 and len(set(table.column("query_id").to_pylist())) == 5
    assert set(table.column("label").to_pylist()) <= {0, 2, 4}
    assert len(set(table.column("label").to_pylist())) >= 2


def test_evaluate_cli_end_to_end_on_noveleval(tmp_path, model_dir, model, tokenizer, rulebook, capsys):
    table = noveleval_pairs()
    pq.write_table(table, tmp_path / "pairs.parquet")
    out, preds = tmp_path / "m.json", tmp_path / "p.parquet"
    limit = 560
    rc = evaluate_main(["--model", str(model_dir), "--pairs", str(tmp_path / "pairs.parquet"),
                        "--out", str(out), "--predictions", str(preds), "--batch-size", "4",
                        "--max-prompt-tokens", str(limit), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    metrics = json.loads(out.read_text())
    for key in ("acc5", "acc2", "pair_acc", "ndcg3", "macro_f1", "weighted_f1", "per_class", "confusion"):
        assert key in metrics
    assert metrics["n"] == 40 and metrics["n_queries"] == 5 and metrics["n_pairs"] > 0
    assert metrics["label_counts"] == np.bincount(table.column("label").to_numpy(), minlength=5).tolist()
    assert 0 < metrics["n_truncated"] < 40
    assert f"truncated documents: {metrics['n_truncated']} of 40" in printed and "Pair-ACC" in printed

    # predictions file: input order kept, same probabilities as the scorer in-process
    p = pq.read_table(preds)
    assert p.column_names == ["query_id", "doc_id", "label", "p0", "p1", "p2", "p3", "p4", "score", "pred"]
    assert p.column("doc_id").to_pylist() == table.column("doc_id").to_pylist()
    probs = np.stack([p.column(f"p{k}").to_numpy() for k in range(5)], 1)
    scorer = FirstTokenScorer(model, tokenizer, rulebook, batch_size=1, max_prompt_tokens=limit, progress=False)
    np.testing.assert_allclose(probs, scorer.score_pairs(table), atol=1e-6)
    np.testing.assert_allclose(p.column("score").to_numpy(), probs @ np.arange(5), atol=1e-12)
    assert (p.column("pred").to_numpy() == probs.argmax(1)).all()

    # the metrics CLI on the predictions file reproduces the evaluate metrics
    again = tmp_path / "again.json"
    assert metrics_main(["--predictions", str(preds), "--out", str(again)]) == 0
    recomputed = json.loads(again.read_text())
    for key, value in recomputed.items():
        assert metrics[key] == value, key
    assert recomputed == json.loads(json.dumps(compute_metrics(table.column("label").to_numpy(), probs,
                                                               table.column("query_id").to_pylist())))


def test_evaluate_cli_reports_bad_input_with_exit_2(tmp_path, model_dir, capsys):
    pq.write_table(pa.table({"query_id": ["a"], "query": ["q"], "document": ["d"], "label": [1]}),
                   tmp_path / "bad.parquet")
    rc = evaluate_main(["--model", str(model_dir), "--pairs", str(tmp_path / "bad.parquet"),
                        "--out", str(tmp_path / "m.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.parquet" in err and "doc_id" in err
    assert not (tmp_path / "m.json").exists()
