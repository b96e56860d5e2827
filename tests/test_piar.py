"""PIAR (afrl_fast.piar): Act → Diagnose → Evolve against served models, and its accept rule.

The end-to-end test runs two rounds with the memorizing judge behind a real `python -m
afrl_fast.serve` as actor, evaluator and refiner, checks every saved artefact against an
independent computation (the model's own top-5 first-token log-probs through transformers; 5-ACC
by hand), and trains one SFT step with the text PIAR settled on. A scripted server drives the
accept, reject and patience paths deterministically.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from afrl_fast.data import synthesize
from afrl_fast.pairs import PAIR_COLUMNS, write_table
from afrl_fast.evaluate.__main__ import main as evaluate_main
from afrl_fast.format import build_prompt, load_tokenizer, resolve_prompt_settings
from afrl_fast.piar.__main__ import main as piar_main
from afrl_fast.piar import first_token_probs, improves, parse_rule_id
from afrl_fast.rulebook import load_rulebook

sys.path.insert(0, str(Path(__file__).parent))
from serving import Scripted, Server  # noqa: E402

RULEBOOK = load_rulebook()


@pytest.fixture(scope="module")
def val(tmp_path_factory, memorized_pair):
    rows = synthesize(6, seed=21, split="longtail").select(list(PAIR_COLUMNS)).to_pylist()
    rows.append({k: memorized_pair[k] for k in PAIR_COLUMNS} | {"query_id": rows[0]["query_id"], "doc_id": "mem"})
    path = tmp_path_factory.mktemp("val") / "val.parquet"
    write_table(pa.Table.from_pylist(rows), path)
    return path, rows


def reference_probs(model_dir, rows, instructions) -> np.ndarray:
    """The actor's rule restated on transformers: top-5 first-token log-probs over the whole
    vocabulary, labels among them renormalised, else the greedy token's first character."""
    tok = load_tokenizer()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for r in rows:
        ids = tok.encode(build_prompt(tok, RULEBOOK, r["query"], r["document"], instructions), add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        top = torch.topk(logp, 5)
        p = np.zeros(5)
        for lp, t in zip(top.values.tolist(), top.indices.tolist()):
            key = tok.decode([t]).strip()
            if key in {"0", "1", "2", "3", "4"}:
                p[int(key)] = max(p[int(key)], math.exp(lp))
        if p.sum() == 0:
            first = tok.decode([int(top.indices[0])]).lstrip()[:1]
            p = np.eye(5)[int(first)] if first in "01234" and first else np.full(5, 0.2)
        out.append(p / p.sum())
    return np.array(out)


@pytest.mark.slow
def test_two_rounds_against_served_models(memorizing_judge, val, tmp_path, capsys):
    path, rows = val
    srv = Server(memorizing_judge, tmp_path / "serve.log")
    try:
        code = piar_main(["--pairs", str(path), "--actor-endpoint", srv.url, "--evaluator-endpoint", srv.url,
                          "--refiner-endpoint", srv.url,
                          "--out", str(tmp_path / "piar"), "--rounds", "2", "--patience", "5",
                          "--instructions", "short", "--refiner-max-tokens", "64", "--concurrency", "4"])
    finally:
        srv.stop()
    cap = capsys.readouterr()
    assert code == 0, cap.err
    out = tmp_path / "piar"
    start = resolve_prompt_settings(None, None, "short").instructions
    assert (out / "round_000" / "instructions.txt").read_text() == start
    preds = pq.read_table(out / "round_000" / "predictions.parquet").to_pylist()
    probs = np.array([[p[f"p{k}"] for k in range(5)] for p in preds])
    np.testing.assert_allclose(probs, reference_probs(memorizing_judge, rows, start), atol=2e-4)
    metrics = json.loads((out / "round_000" / "metrics.json").read_text())
    labels = np.array([r["label"] for r in rows])
    assert metrics["acc5"] == pytest.approx(float(np.mean(probs.argmax(1) == labels)))
    best, text = metrics, start
    for k in (1, 2):
        folder = out / f"round_{k:03d}"
        decision = json.loads((folder / "decision.json").read_text())
        report = json.loads((folder / "attribution.json").read_text())
        assert report["diagnosed"] == min(report["misgraded"], 64)
        assert report["unparseable"] + sum(e["count"] for e in report["rules"].values()) == report["diagnosed"]
        assert decision["before"] == best
        # the served refiner always writes some text (greedy, 64 tokens), so every round grades a
        # candidate under the served actor, and the accept rule is checked on real metrics each run
        cand = json.loads((folder / "candidate_metrics.json").read_text())
        assert decision["candidate"] == cand and cand["n"] == len(rows)
        assert decision["accepted"] == improves(cand, best)
        assert (folder / "diff.patch").exists()
        if decision["accepted"]:
            best, text = cand, (folder / "candidate.txt").read_text()
    # the final text is the best one, and the rest of the pipeline takes it as it is
    final = out / "instructions.txt"
    assert final.read_text() == text
    assert resolve_prompt_settings(None, None, str(final)).instructions == text
    history = json.loads((out / "history.json").read_text())
    assert history["best"] == best and len(history["rounds"]) == 2
    code = evaluate_main(["--model", str(memorizing_judge), "--pairs", str(path), "--out", str(tmp_path / "m.json"),
                          "--instructions", str(final), "--no-progress"])
    assert code == 0
    # ... and trains with it: one SFT step whose exported model carries PIAR's text as its prompt
    from test_train import torchrun
    run = tmp_path / "run"
    torchrun(run, extra=[f"data.instructions={final}", "run.stop_after=sft", "sft.epochs=0.1"])
    saved = json.loads((run / "sft_model" / "afrl_prompt.json").read_text())
    assert saved["instructions"] == text


def test_accept_reject_and_patience(val, tmp_path, capsys):
    path, rows = val
    rule = RULEBOOK.rules[2].name

    def actor(n, body):
        # answers the pair's label when the instructions say BETTER, else 0
        label = next(r["label"] for r in rows if r["query"] in body["prompt"] and r["document"] in body["prompt"])
        return 200, [str(label if "BETTER" in body["prompt"] else 0)], ["length"]

    def evaluator(n, body):
        return 200, [f"The misapplied rule is {rule}." if n % 2 == 0 else "unclear"], ["stop"]

    def refiner(n, body):
        return 200, ["<<<BETTER instructions>>>" if n == 0 else "<<<Some other text>>>"], ["stop"]

    a, e, r = Scripted(actor), Scripted(evaluator), Scripted(refiner)
    try:
        code = piar_main(["--pairs", str(path), "--actor-endpoint", a.url, "--evaluator-endpoint", e.url,
                          "--refiner-endpoint", r.url,
                          "--out", str(tmp_path / "p"), "--rounds", "6", "--patience", "2", "--retries", "0"])
    finally:
        a.stop(), e.stop(), r.stop()
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "p"
    decisions = [json.loads((out / f"round_{k:03d}" / "decision.json").read_text()) for k in (1, 2, 3)]
    assert [d["accepted"] for d in decisions] == [True, False, False]
    assert not (out / "round_004").exists()                  # two rounds without a gain: stop
    assert (out / "instructions.txt").read_text() == "BETTER instructions"
    assert decisions[0]["candidate"]["acc5"] == 1.0
    first = json.loads((out / "round_001" / "attribution.json").read_text())
    n_wrong = sum(r["label"] != 0 for r in rows)
    assert first["misgraded"] == first["diagnosed"] == n_wrong
    assert first["rules"].get(rule, {"count": 0})["count"] + first["unparseable"] == n_wrong


def test_a_validation_set_without_comparable_pairs_has_no_pair_acc_and_5acc_decides(tmp_path, capsys):
    """One document per query: no pair can be compared, Pair-ACC is None (printed n/a) and the
    accept rule decides on 5-ACC alone."""
    rows = synthesize(6, seed=5, split="longtail").select(list(PAIR_COLUMNS)).to_pylist()
    rows = [r | {"query_id": f"q{i}"} for i, r in enumerate(rows)]
    assert any(r["label"] != 0 for r in rows)
    path = tmp_path / "val.parquet"
    write_table(pa.Table.from_pylist(rows), path)

    def actor(n, body):            # the label under the refined text, else 0
        label = next(r["label"] for r in rows if r["query"] in body["prompt"] and r["document"] in body["prompt"])
        return 200, [str(label if "BETTER" in body["prompt"] else 0)], ["length"]

    a = Scripted(actor)
    e = Scripted(lambda n, body: (200, ["unclear"], ["stop"]))
    r = Scripted(lambda n, body: (200, ["<<<BETTER instructions>>>"], ["stop"]))
    try:
        code = piar_main(["--pairs", str(path), "--actor-endpoint", a.url, "--evaluator-endpoint", e.url,
                          "--refiner-endpoint", r.url,
                          "--out", str(tmp_path / "p"), "--rounds", "1", "--retries", "0"])
    finally:
        a.stop(), e.stop(), r.stop()
    cap = capsys.readouterr()
    assert code == 0, cap.err
    lines = cap.out.splitlines()
    assert lines[0].startswith("round 0: 5-ACC ") and "Pair-ACC n/a (unparsed 0 of 6)" in lines[0], lines
    assert "Pair-ACC n/a" in lines[1] and "Pair-ACC n/a" in lines[-1], lines
    history = json.loads((tmp_path / "p" / "history.json").read_text())
    assert history["start"]["pair_acc"] is None and history["best"]["pair_acc"] is None
    assert history["rounds"][0]["accepted"] and history["best"]["acc5"] == 1.0


def test_a_candidate_the_actor_cannot_be_read_under_is_rejected(val, tmp_path, capsys):
    """Under the candidate text the actor answers no grade: its metrics would be those of uniform
    guesses (which here beat the starting text's wrong grades on 5-ACC), so the candidate is
    rejected for it, and every round prints how many answers were unparsed."""
    path, rows = val
    assert any(r["label"] == 0 for r in rows)

    def actor(n, body):           # a wrong grade under the starting text, no grade under the candidate
        label = next(r["label"] for r in rows if r["query"] in body["prompt"] and r["document"] in body["prompt"])
        return 200, ["I cannot grade this" if "CANDIDATE" in body["prompt"] else str((label + 1) % 5)], ["length"]

    a = Scripted(actor)
    e = Scripted(lambda n, body: (200, ["unclear"], ["stop"]))
    r = Scripted(lambda n, body: (200, ["<<<CANDIDATE text>>>"], ["stop"]))
    try:
        code = piar_main(["--pairs", str(path), "--actor-endpoint", a.url, "--evaluator-endpoint", e.url,
                          "--refiner-endpoint", r.url,
                          "--out", str(tmp_path / "p"), "--rounds", "1", "--retries", "0"])
    finally:
        a.stop(), e.stop(), r.stop()
    cap = capsys.readouterr()
    assert code == 0, cap.err
    decision = json.loads((tmp_path / "p" / "round_001" / "decision.json").read_text())
    assert not decision["accepted"] and "no readable grade for 7 of 7" in decision["reason"]
    assert decision["candidate"]["unparsed"] == 7 and decision["candidate"]["acc5"] > decision["before"]["acc5"] == 0
    lines = cap.out.splitlines()
    assert "(unparsed 0 of 7)" in lines[0] and "candidate unparsed 7 of 7" in lines[1], lines
    assert (tmp_path / "p" / "instructions.txt").read_text() != "CANDIDATE text"


def test_bad_input_is_one_line(val, tmp_path, capsys):
    path, _ = val
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    for args, needle in [(["--out", str(tmp_path / "used")], "not empty"),
                         (["--out", str(tmp_path / "o"), "--rounds", "0"], "--rounds"),
                         (["--out", str(tmp_path / "o"), "--max-unparsed", "1.5"], "--max-unparsed"),
                         (["--out", str(tmp_path / "o"), "--timeout", "nan"], "--timeout"),
                         (["--out", str(tmp_path / "o2"), "--actor-endpoint", "http://127.0.0.1:9", "--retries", "0",
                           "--timeout", "2"], "http://127.0.0.1:9")]:
        base = ["--pairs", str(path), "--actor-endpoint", "http://127.0.0.1:9",
                "--evaluator-endpoint", "http://127.0.0.1:9", "--refiner-endpoint", "http://127.0.0.1:9"]
        code = piar_main(base + args)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(err) == 1 and needle in err[0]


def test_pure_parts():
    assert first_token_probs({"3": math.log(0.6), " 1": math.log(0.2), "x": -0.1}, "3").tolist() == \
        pytest.approx([0, 0.25, 0, 0.75, 0])
    assert first_token_probs(None, " 2 because").tolist() == [0, 0, 1, 0, 0]
    assert first_token_probs({"x": -0.1}, "x") is None
    names = [r.name for r in RULEBOOK.rules]
    assert parse_rule_id(f"I'd say {names[3]}, maybe {names[1]}", names) == names[3]
    assert parse_rule_id("none of them", names) is None
    assert improves({"acc5": 0.5, "pair_acc": 0.1}, {"acc5": 0.4, "pair_acc": 0.9})
    assert improves({"acc5": 0.5, "pair_acc": 0.6}, {"acc5": 0.5, "pair_acc": 0.5})
    assert not improves({"acc5": 0.5, "pair_acc": 0.5}, {"acc5": 0.5, "pair_acc": 0.5})
    assert not improves({"acc5": 0.4, "pair_acc": 1.0}, {"acc5": 0.5, "pair_acc": 0.0})
