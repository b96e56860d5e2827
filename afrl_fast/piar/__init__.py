"""PIAR (paper §3.2): refine the judge's instruction text by Act → Diagnose → Evolve.

    python -m afrl_fast.piar --pairs V.parquet --actor-endpoint URL --evaluator-endpoint URL \\
        --refiner-endpoint URL --out DIR [--rounds 5] [--patience 2] [--instructions full|short|PATH|MODEL_DIR] \\
        [--rulebook R] [--actor-model NAME --evaluator-model NAME --refiner-model NAME] [--api completions|chat]

Each round:
1. Act: the actor grades every validation pair under the current instruction text. The grade is read
   from the first token: its top log-probs over "0".."4" where the endpoint returns them
   (renormalised over the labels present), else the first character of a one-token completion; a
   reply with neither, or a refused request, is counted as unparsed and scored as a uniform
   distribution. The count is printed each round. Metrics of uniform guesses say nothing: more than
   --max-unparsed (a fraction, default 0.2) of the validation pairs unparsed ends the run with one
   line when it happens to the starting text (the actor cannot be read: a wrong --actor-model,
   --api or a model that does not answer grade-first), and rejects a candidate text it happens to.
2. Diagnose: for each misgraded pair (at most --max-diagnose) the evaluator is asked which rule of
   the rulebook's decision list was misapplied; the answer must name a rule id and is parsed as the
   first rule id it mentions (none → counted as unparseable). The counts, with example pairs, are the
   round's attribution report.
3. Evolve: the refiner rewrites the instruction text from that report (prompts in configs/prompts/).
   The candidate is graded like step 1 and kept only if it improves the validation metric:
   5-ACC, ties broken by Pair-ACC. PIAR stops after --rounds rounds or --patience rounds in a row
   without a gain.

DIR/round_000/ holds the starting text and its metrics; DIR/round_NNN/ each round's attribution
report, candidate text, candidate metrics, the diff against the current text and the decision;
DIR/history.json the whole run. Every argument and the validation set (at least one pair) are
checked before DIR is made; an actor, evaluator or refiner that answers something other than a
completion, or refuses every request, ends the run with one line naming its URL.
DIR/instructions.txt is always the best text so far (written atomically on each acceptance) and is
what the rest of the pipeline takes:
`train.py data.instructions=DIR/instructions.txt`, `afrl_fast.evaluate --instructions ...`,
`afrl_fast.serve --instructions ...`, `afrl_fast.synthesize --instructions ...`.
"""
from __future__ import annotations

import asyncio
import difflib
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..resources import CONFIG_DIR

from ..files import atomic_write_many, atomic_write_text
from ..endpoint import Endpoint, RequestRefused, chat_prompt, strip_thinking
from ..format import MAX_INSTRUCTIONS_BYTES, build_messages, build_prompt
from ..metrics import compute_metrics
from ..rulebook import LABELS

PROMPTS = CONFIG_DIR / "prompts"
_FENCED = re.compile(r"<<<\s*(.*?)\s*>>>", re.DOTALL)


class PiarError(ValueError):
    """Bad arguments or an output folder that cannot be used; one line."""


# ----------------------------------------------------------------------------------------------
# Act: first-token grades of the validation pairs
# ----------------------------------------------------------------------------------------------

def first_token_probs(top_logprobs: dict | None, text: str) -> np.ndarray | None:
    """The grade distribution of one reply: label log-probs if present, else its first character."""
    if top_logprobs:
        p = np.zeros(len(LABELS))
        for token, logp in top_logprobs.items():
            key = token.strip()
            if key in {str(k) for k in LABELS} and logp is not None and math.isfinite(logp):
                p[int(key)] = max(p[int(key)], math.exp(logp))
        if p.sum() > 0:
            return p / p.sum()
    first = text.lstrip()[:1]
    if first.isdigit() and int(first) in LABELS:
        return np.eye(len(LABELS))[int(first)]
    return None


async def grade(actor: Endpoint, tokenizer, rulebook, instructions: str, pairs: list[dict]) -> tuple[np.ndarray, int]:
    """[n, 5] grade distributions under `instructions` and how many replies could not be read."""
    async def one(row):
        if actor.api == "chat":
            req = {"messages": build_messages(rulebook, row["query"], row["document"], instructions)}
        else:
            req = {"prompt": build_prompt(tokenizer, rulebook, row["query"], row["document"], instructions)}
        try:
            choice = (await actor.generate(**req, n=1, temperature=0.0, max_tokens=1, top_logprobs=5))[0]
        except RequestRefused:
            return None
        return first_token_probs(choice.first_top_logprobs, choice.text)
    found = await asyncio.gather(*(one(r) for r in pairs))
    unparsed = sum(p is None for p in found)
    return np.stack([p if p is not None else np.full(len(LABELS), 1 / len(LABELS)) for p in found]), unparsed


def too_many_unparsed(metrics: dict, max_unparsed: float) -> bool:
    return metrics["unparsed"] > max_unparsed * metrics["n"]


def unparsed_text(metrics: dict) -> str:
    return f"unparsed {metrics['unparsed']} of {metrics['n']}"


def validation_metrics(pairs: list[dict], probs: np.ndarray, unparsed: int) -> dict:
    m = compute_metrics(np.array([r["label"] for r in pairs]), probs, np.array([r["query_id"] for r in pairs],
                                                                                 dtype=object))
    keep = ("acc5", "acc2", "pair_acc", "ndcg3", "macro_f1", "weighted_f1", "n")
    return {**{k: m[k] for k in keep}, "unparsed": unparsed}


def shown(value) -> str:
    """A metric for the console: four decimals, or n/a where the split has none (Pair-ACC of a
    validation set without a comparable pair: compute_metrics gives None)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def improves(candidate: dict, best: dict) -> bool:
    """PIAR's acceptance rule: a higher 5-ACC, or the same 5-ACC and a higher Pair-ACC (a split
    without a comparable pair has no Pair-ACC; it then decides nothing)."""
    def key(m):
        pair = m["pair_acc"]
        return m["acc5"], pair if pair is not None and math.isfinite(pair) else -1.0
    return key(candidate) > key(best)


# ----------------------------------------------------------------------------------------------
# Diagnose: which rule each mistake misapplied
# ----------------------------------------------------------------------------------------------

def rule_lines(rulebook) -> str:
    out = []
    for r in rulebook.rules:
        cond = " and ".join(f"{k} is {'/'.join(v)}" for k, v in r.when.items()) or "otherwise"
        out.append(f"{r.name}: {cond} -> {r.label}")
    return "\n".join(out)


def parse_rule_id(reply: str, rule_names: list[str]) -> str | None:
    """The first rule id the reply mentions (whole words, case-insensitive)."""
    best = None
    for name in rule_names:
        m = re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", reply, re.IGNORECASE)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), name)
    return best[1] if best else None


async def diagnose(evaluator: Endpoint, tokenizer, rulebook, pairs: list[dict], preds: np.ndarray,
                   limit: int) -> dict:
    template = (PROMPTS / "piar_diagnose.txt").read_text(encoding="utf-8")
    names = [r.name for r in rulebook.rules]
    wrong = [i for i, r in enumerate(pairs) if preds[i] != r["label"]]
    asked = wrong[:limit]

    async def one(i):
        row = pairs[i]
        content = template.format(rules=rule_lines(rulebook), query=row["query"], document=row["document"],
                                  label=row["label"], pred=int(preds[i]), rule_ids=", ".join(names))
        messages = [{"role": "user", "content": content}]
        req = {"messages": messages} if evaluator.api == "chat" else {"prompt": chat_prompt(tokenizer, messages)}
        try:
            reply = (await evaluator.generate(**req, n=1, temperature=0.0, max_tokens=32))[0].text
        except RequestRefused:
            return None
        return parse_rule_id(strip_thinking(reply), names)
    found = await asyncio.gather(*(one(i) for i in asked))
    rules: dict[str, dict] = {}
    for i, name in zip(asked, found):
        if name is not None:
            entry = rules.setdefault(name, {"count": 0, "examples": []})
            entry["count"] += 1
            if len(entry["examples"]) < 3:
                row = pairs[i]
                entry["examples"].append({"query_id": row["query_id"], "doc_id": row["doc_id"], "query": row["query"],
                                          "document": row["document"][:300], "label": row["label"],
                                          "pred": int(preds[i])})
    ordered = dict(sorted(rules.items(), key=lambda kv: (-kv[1]["count"], kv[0])))
    return {"misgraded": len(wrong), "diagnosed": len(asked), "unparseable": sum(f is None for f in found),
            "rules": ordered}


def report_text(report: dict) -> str:
    lines = []
    for name, entry in report["rules"].items():
        ex = entry["examples"][0]
        lines.append(f"- {name}: {entry['count']} mistakes; e.g. query {ex['query']!r}, document "
                     f"{ex['document'][:160]!r}: correct {ex['label']}, judged {ex['pred']}")
    return "\n".join(lines) or "- (no mistake could be attributed to a rule)"


# ----------------------------------------------------------------------------------------------
# Evolve: a candidate instruction text
# ----------------------------------------------------------------------------------------------

def extract_instructions(reply: str) -> str | None:
    """The text between <<< and >>> (or the whole reply without code fences); None if empty or huge."""
    reply = strip_thinking(reply)
    m = _FENCED.search(reply)
    text = m.group(1) if m else re.sub(r"^```\w*\n|```$", "", reply.strip()).strip()
    if not text or len(text.encode("utf-8")) > MAX_INSTRUCTIONS_BYTES:
        return None
    return text


async def refine(refiner: Endpoint, tokenizer, rulebook, instructions: str, report: dict, max_tokens: int) -> str | None:
    template = (PROMPTS / "piar_refine.txt").read_text(encoding="utf-8")
    content = template.format(rules=rule_lines(rulebook), report=report_text(report), instructions=instructions)
    messages = [{"role": "user", "content": content}]
    req = {"messages": messages} if refiner.api == "chat" else {"prompt": chat_prompt(tokenizer, messages)}
    try:
        reply = (await refiner.generate(**req, n=1, temperature=0.0, max_tokens=max_tokens))[0].text
    except RequestRefused:
        return None
    return extract_instructions(reply)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def write_round(folder: Path, files: dict) -> None:
    """{name: text or JSON-able} written together (all or none)."""
    writes = {}
    for name, value in files.items():
        data = value if isinstance(value, str) else json.dumps(value, indent=2)
        writes[folder / name] = (lambda d: lambda f: f.write(d.encode("utf-8")))(data)
    atomic_write_many(writes)


def write_predictions(folder: Path, pairs: list[dict], probs: np.ndarray) -> None:
    table = pa.table({"query_id": [r["query_id"] for r in pairs], "doc_id": [r["doc_id"] for r in pairs],
                      "label": pa.array([r["label"] for r in pairs], pa.int8()),
                      **{f"p{k}": probs[:, k] for k in LABELS}})
    atomic_write_many({folder / "predictions.parquet": lambda f: pq.write_table(table, f)})


async def run_piar(args, out: Path, pairs: list[dict], tokenizer, rulebook, start: str, actor: Endpoint,
                   evaluator: Endpoint, refiner: Endpoint) -> dict:
    current = start
    probs, unparsed = await grade(actor, tokenizer, rulebook, current, pairs)
    actor.check_answered()
    best = validation_metrics(pairs, probs, unparsed)
    if too_many_unparsed(best, args.max_unparsed):     # before anything is written
        raise PiarError(f"the actor ({actor.url}, model {actor.model!r}) gave no readable grade for {unparsed} of "
                        f"{len(pairs)} validation pairs under the starting text (refused, or a first token that is "
                        f"not 0-4 without label log-probs), more than --max-unparsed {args.max_unparsed:g}; check "
                        "--actor-model, --api and that the actor answers with the grade first")
    write_round(out / "round_000", {"instructions.txt": current, "metrics.json": best})
    write_predictions(out / "round_000", pairs, probs)
    atomic_write_text(out / "instructions.txt", current)
    history = {"start": best, "rounds": []}
    print(f"round 0: 5-ACC {shown(best['acc5'])} Pair-ACC {shown(best['pair_acc'])} ({unparsed_text(best)})")
    stale = 0
    for k in range(1, args.rounds + 1):
        folder = out / f"round_{k:03d}"
        report = await diagnose(evaluator, tokenizer, rulebook, pairs, probs.argmax(1), args.max_diagnose)
        if report["diagnosed"]:
            evaluator.check_answered()
        candidate = await refine(refiner, tokenizer, rulebook, current, report, args.refiner_max_tokens)
        refiner.check_answered()
        files = {"attribution.json": report}
        decision = {"round": k, "before": best}
        if candidate is None:
            decision.update(accepted=False, reason="the refiner returned no usable text")
        else:
            c_probs, c_unparsed = await grade(actor, tokenizer, rulebook, candidate, pairs)
            metrics = validation_metrics(pairs, c_probs, c_unparsed)
            if too_many_unparsed(metrics, args.max_unparsed):   # uniform guesses must not win a round
                accepted, reason = False, (f"the actor gave no readable grade for {c_unparsed} of {len(pairs)} pairs "
                                           f"under the candidate (more than --max-unparsed {args.max_unparsed:g})")
            else:
                accepted = improves(metrics, best)
                reason = "improves 5-ACC (ties: Pair-ACC)" if accepted else "no gain in 5-ACC / Pair-ACC"
            decision.update(accepted=accepted, candidate=metrics, reason=reason)
            files["candidate.txt"] = candidate
            files["candidate_metrics.json"] = metrics
            files["diff.patch"] = "".join(difflib.unified_diff(current.splitlines(True), candidate.splitlines(True),
                                                              "current", "candidate"))
            if accepted:
                current, best, probs = candidate, metrics, c_probs
                write_predictions(folder, pairs, c_probs)
        files["decision.json"] = decision
        write_round(folder, files)
        if decision["accepted"]:
            atomic_write_text(out / "instructions.txt", current)
        history["rounds"].append({k2: v for k2, v in decision.items() if k2 != "before"} | {"attribution": report})
        atomic_write_text(out / "history.json", json.dumps({**history, "best": best}, indent=2))
        stale = 0 if decision["accepted"] else stale + 1
        seen = f", candidate {unparsed_text(decision['candidate'])}" if "candidate" in decision else ""
        print(f"round {k}: {'accepted' if decision['accepted'] else 'rejected'} ({decision['reason']}{seen}); "
              f"best 5-ACC {shown(best['acc5'])} Pair-ACC {shown(best['pair_acc'])}")
        if stale >= args.patience:
            break
    history["best"] = best
    atomic_write_text(out / "history.json", json.dumps(history, indent=2))
    return history
