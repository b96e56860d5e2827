"""Trace synthesis (paper §3.3): human-labelled pairs in, one verified expert AFRL trace per pair out.

    python -m afrl_fast.synthesize --pairs P.parquet --teacher-endpoint URL [--teacher-model NAME] --out DIR \\
        [--n 10] [--temperature 1.0] [--max-tokens 1024] [--concurrency 32] \\
        [--judge-endpoint URL --judge-model NAME] [--instructions full|short|PATH|MODEL_DIR] [--rulebook R] \\
        [--eval industry=I.parquet --eval longtail=L.parquet] [--resume]
    torchrun --nproc_per_node=1 afrl_fast/train.py data.dir=DIR data.instructions=DIR/instructions.txt

1. Diversity sampling: N responses per pair from any OpenAI-compatible server (SGLang, vLLM,
   `python -m afrl_fast.serve`), prompted with exactly the trainer's system prompt
   (`afrl_fast.format.resolve_prompt_settings`, the same flags as the trainer's data section).
2. Consistency filtering with the compiled verifier against the human label. A sample is kept only
   if it is complete (not cut at --max-tokens), well formed, its decision token, step 9's verdict
   and its final grade agree, the grade the rulebook derives from its boxed steps 4–8 (ŷ) is the
   label, and its final grade is the label. Each rejected sample records the first reason it failed
   in that order. A sample the server ended for another reason than a stop or the token limit
   (finish_reason `abort`, `content_filter`, ...) is `aborted`, never taken as complete.
3. Best-of-N: with a judge endpoint every survivor of a pair with more than one is scored 0–10 for logical soundness and rule
   adherence (rubric: configs/prompts/judge_rubric.txt; an unparseable reply is asked again twice,
   then ranked last); the highest score wins. Ties, and runs without a judge, keep the shortest
   trace (the most concise of equally verified arguments), then the lowest sample index — fully
   deterministic.
4. Output (DIR): train.parquet (the pair schema + rule, tail, the step columns, trace — what the
   synthetic generator writes, so `read_pairs(require_trace=True)` and the trainer accept it);
   rejected.parquet (every rejected sample with its reason); hard.parquet (pairs no sample
   survived: the hard samples, listed, never dropped silently); report.json (yield per grade and per
   rule, rejection reasons, requests and tokens, wall time); instructions.txt (the system prompt the
   samples were asked under, verbatim; the command prints the trainer overrides that use it, so the
   student learns under exactly the teacher's prompt); the --eval splits copied beside them (their
   names must not be those of the outputs: train, rejected, hard, report).

Results land in DIR/shards/ as each shard of pairs finishes (atomic files): a killed run loses at most
the shard in flight, and `--resume` skips every finished pair, so no pair is asked twice and none is
written twice. A pair the endpoint refused, or whose samples it aborted, without a verified trace is
not finished: `--resume` asks for it again (its newer rows replace the old). Every argument is
checked before DIR is made, and DIR is made only when the first shard is written, so a refused run
leaves nothing behind. An unreachable endpoint, one that answers nothing within --timeout, one that
answers something that is not a completion of n choices, or one that refuses
`endpoint.MAX_REFUSALS` requests in a row (or every request of a run that has none answered) fails
with one line naming the URL.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..resources import CONFIG_DIR

from ..files import atomic_write_many, atomic_write_text, check_output_path
from ..pairs import PAIR_COLUMNS
from ..endpoint import Endpoint, RequestRefused, Usage, chat_prompt, strip_thinking
from ..format import build_messages, build_prompt
from ..observe import progress_bar
from ..rulebook import LABELS
from ..trace_selection import REASONS, RETRY_REASONS, choose, parse_judge_score, rejection_reasons, trace_columns

JUDGE_RUBRIC = CONFIG_DIR / "prompts" / "judge_rubric.txt"
SHARD_SCHEMA = pa.schema([
    ("pair", pa.int64()), ("sample", pa.int32()), ("text", pa.string()), ("finish_reason", pa.string()),
    ("reason", pa.string()), ("judge_score", pa.float64()), ("chosen", pa.bool_()), ("requests", pa.int64()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])
SHARD_COLUMNS = SHARD_SCHEMA.names
# names of the outputs: an --eval split of one of these names would replace it
RESERVED_SPLITS = ("train", "rejected", "hard", "report")
JUDGE_TRIES = 3
SEED_MOD = 2 ** 31 - 1       # servers that keep the seed in an int32 must not overflow


class SynthesisError(ValueError):
    """Bad arguments or a run folder that cannot be used; one line."""


# ----------------------------------------------------------------------------------------------
# Sampling one pair
# ----------------------------------------------------------------------------------------------

class Synthesizer:
    def __init__(self, endpoint: Endpoint, judge: Endpoint | None, tokenizer, prompt, n: int, temperature: float,
                 max_tokens: int, seed: int):
        self.endpoint, self.judge, self.tokenizer, self.prompt = endpoint, judge, tokenizer, prompt
        self.n, self.temperature, self.max_tokens, self.seed = n, temperature, max_tokens, seed
        self.rubric = JUDGE_RUBRIC.read_text(encoding="utf-8") if judge is not None else None

    def request(self, endpoint: Endpoint, messages: list[dict]) -> dict:
        """Plain chat messages in the form the endpoint's API takes."""
        if endpoint.api == "chat":
            return {"messages": messages}
        return {"prompt": chat_prompt(self.tokenizer, messages)}

    async def sample_pair(self, index: int, row: dict) -> list[dict]:
        """Every sample of one pair as shard rows (reason None = kept; the chosen one flagged)."""
        rb = self.prompt.rulebook
        messages = build_messages(rb, row["query"], row["document"], self.prompt.instructions)
        req = ({"messages": messages} if self.endpoint.api == "chat" else
               {"prompt": build_prompt(self.tokenizer, rb, row["query"], row["document"], self.prompt.instructions)})
        used = Usage()
        try:
            choices = await self.endpoint.generate(**req, n=self.n, temperature=self.temperature,
                                                   max_tokens=self.max_tokens, seed=pair_seed(self.seed, index),
                                                   usage=used)
            texts = [strip_thinking(c.text) for c in choices]
            reasons = rejection_reasons(texts, [c.finish_reason for c in choices], row["label"], rb)
            finishes = [c.finish_reason for c in choices]
        except RequestRefused as e:
            texts, finishes, reasons = [f"<refused: {e}>"], ["error"], ["request_refused"]
        kept = [j for j, r in enumerate(reasons) if r is None]
        scores = (await self.judge_scores(index, row, texts, kept, used)
                  if self.judge is not None and len(kept) > 1 else {})
        best = choose(texts, kept, scores)
        rows = []
        for j, (text, finish, reason) in enumerate(zip(texts, finishes, reasons)):
            first = j == 0
            rows.append({"pair": index, "sample": j, "text": text, "finish_reason": finish, "reason": reason,
                         "judge_score": scores.get(j), "chosen": j == best,
                         "requests": used.requests if first else 0,
                         "prompt_tokens": used.prompt_tokens if first else 0,
                         "completion_tokens": used.completion_tokens if first else 0})
        return rows

    async def judge_scores(self, index: int, row: dict, texts: list[str], kept: list[int],
                           used: Usage) -> dict[int, float | None]:
        async def one(j):
            content = self.rubric.format(rules=self.prompt.rulebook.describe(), query=row["query"],
                                         document=row["document"], label=row["label"], trace=texts[j])
            messages = [{"role": "user", "content": content}]
            for attempt in range(JUDGE_TRIES):
                try:
                    reply = await self.judge.generate(**self.request(self.judge, messages), n=1, temperature=0.0,
                                                      max_tokens=256, seed=pair_seed(self.seed, index) + attempt,
                                                      usage=used)
                except RequestRefused:
                    return None
                score = parse_judge_score(strip_thinking(reply[0].text))
                if score is not None:
                    return score
            return None
        found = await asyncio.gather(*(one(j) for j in kept))
        return dict(zip(kept, found))


def pair_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % SEED_MOD


# ----------------------------------------------------------------------------------------------
# The run folder: settings, shards, resume
# ----------------------------------------------------------------------------------------------

def run_settings(args, pairs_path: Path, n_pairs: int, instructions: str) -> dict:
    """What a resumed run must share with the run it continues (else its shards would mix two runs)."""
    digest = hashlib.sha256(Path(pairs_path).read_bytes()).hexdigest()
    judge_model = (args.judge_model or "default") if args.judge_endpoint else None
    # the keys keep their names ("model" is the teacher's) so that a run begun before a rename resumes
    return {"pairs_sha256": digest, "n_pairs": n_pairs, "model": args.teacher_model, "n": args.n,
            "temperature": args.temperature, "max_tokens": args.max_tokens, "seed": args.seed,
            "instructions_sha256": hashlib.sha256(instructions.encode("utf-8")).hexdigest(),
            "judge_model": judge_model, "api": args.api}


def check_out_dir(out: Path, settings: dict, resume: bool) -> None:
    """--out can take this run (nothing is created here: see start_out_dir)."""
    check_output_path(out, SynthesisError, kind="dir")
    state = out / "synthesis.json"
    if resume:
        if not state.exists():
            raise SynthesisError(f"{out}: nothing to resume (no synthesis.json); run without --resume")
        hint = ("--resume cannot tell which run the shards belong to: restore it, or start over with a new "
                "--out")
        try:
            saved = json.loads(state.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:     # ValueError: JSONDecodeError, UnicodeDecodeError
            raise SynthesisError(f"{state}: unreadable ({type(e).__name__}: {first_line(e)}); {hint}") from None
        if not isinstance(saved, dict):
            raise SynthesisError(f"{state}: not the settings of a synthesis run (a JSON {type(saved).__name__}); "
                                 f"{hint}")
        diff = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k))
        if diff:
            raise SynthesisError(f"{out}: cannot resume, this run differs from the saved one in {', '.join(diff)}")
        return
    if out.exists() and any(out.iterdir()):
        raise SynthesisError(f"{out}: folder is not empty; use --resume to continue it or a new --out")


def start_out_dir(out: Path, settings: dict) -> None:
    """Make --out and record the run's settings: done when the first shard is about to be written."""
    state = out / "synthesis.json"
    if not state.exists():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state, json.dumps(settings, indent=2))


def first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def read_shards(out: Path, n_pairs: int) -> list[pa.Table]:
    """The result shards in write order, each checked: a file that is not a readable shard of this
    tool, or names a pair the pairs file does not have, is one line naming it (and is left alone)."""
    folder = out / "shards"
    if not folder.is_dir():
        return []
    tables = []
    hint = f"move it out of {folder}: --resume then asks for its pairs again"
    for path in sorted(folder.glob("*.parquet")):
        if not re.fullmatch(r"\d{6,}", path.stem):
            raise SynthesisError(f"{path}: not a result shard of this tool (they are named 000000.parquet, "
                                 f"000001.parquet, ...); {hint}")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise SynthesisError(f"{path}: unreadable result shard ({first_line(e)}); {hint}") from None
        for f in SHARD_SCHEMA:
            if f.name not in table.column_names or not table.schema.field(f.name).type.equals(f.type):
                raise SynthesisError(f"{path}: not a result shard of this tool (column {f.name!r} is missing or "
                                     f"not {f.type}); {hint}")
        pair = table.column("pair")
        if pair.null_count or (len(pair) and not 0 <= pc.min(pair).as_py() <= pc.max(pair).as_py() < n_pairs):
            raise SynthesisError(f"{path}: names pairs outside 0..{n_pairs - 1} of the pairs file; {hint}")
        tables.append(table.select(SHARD_COLUMNS))
    return tables


def latest_rows(shards: list[pa.Table]) -> dict[int, list[dict]]:
    """pair -> its rows in the latest shard that holds it (a pair asked again on --resume)."""
    by_pair: dict[int, list[dict]] = {}
    for table in shards:
        fresh: dict[int, list[dict]] = {}
        for r in table.to_pylist():
            fresh.setdefault(r["pair"], []).append(r)
        by_pair.update(fresh)
    return by_pair


def needs_retry(rows: list[dict]) -> bool:
    """No verified trace, and a sample the endpoint refused or aborted: not the pair's fault."""
    return not any(r["chosen"] for r in rows) and any(r["reason"] in RETRY_REASONS for r in rows)


def finished_pairs(shards: list[pa.Table]) -> set[int]:
    """Pairs that --resume does not ask for again."""
    return {i for i, rows in latest_rows(shards).items() if not needs_retry(rows)}


def write_shard(out: Path, number: int, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    atomic_write_many({out / "shards" / f"{number:06d}.parquet": lambda f: pq.write_table(table, f)})


async def sample_all(synth: Synthesizer, pairs: list[dict], todo: list[int], out: Path, first_shard: int,
                     shard_size: int, n_done: int, start_out=lambda: None, answered_before: bool = False) -> None:
    """Sample the `todo` pairs shard by shard; `start_out()` runs before the first shard is
    written. `answered_before`: earlier invocations of this run got answers. Until the endpoint has
    answered once, shards (of refusals only) are held back: an endpoint that refuses everything
    leaves nothing behind, and one that refuses a few pairs first loses none of them."""
    bar = progress_bar(len(pairs), "synthesize", initial=n_done, unit="pair")
    kept, number, held = 0, first_shard, []
    try:
        for start in range(0, len(todo), shard_size):
            batch = todo[start:start + shard_size]
            results = await asyncio.gather(*(_with_progress(synth.sample_pair(i, pairs[i]), bar) for i in batch))
            held.append([r for pair_rows in results for r in pair_rows])
            if answered_before or synth.endpoint.answered:
                start_out()
                for rows in held:
                    write_shard(out, number, rows)
                    number += 1
                held = []
            kept += sum(any(r["reason"] is None for r in pair_rows) for pair_rows in results)
            bar.set_postfix(yield_this_run=f"{kept / (start + len(batch)):.0%}")
        if not answered_before:        # (a judge refusing everything is caught by its refusals in a row)
            synth.endpoint.check_answered()
    finally:
        bar.close()
        await synth.endpoint.close()
        if synth.judge is not None:
            await synth.judge.close()


async def _with_progress(coro, bar):
    result = await coro
    bar.update(1)
    return result


# ----------------------------------------------------------------------------------------------
# Assembly: shards -> train / rejected / hard / report
# ----------------------------------------------------------------------------------------------

INSTRUCTIONS_FILE = "instructions.txt"


def assemble(out: Path, pairs_table: pa.Table, rulebook, eval_splits: dict[str, pa.Table], wall_s: float,
             settings: dict, instructions: str) -> dict:
    shards = read_shards(out, pairs_table.num_rows)
    spent = pa.concat_tables(shards).to_pylist() if shards else []     # every request made, retried ones too
    pairs = pairs_table.select(list(PAIR_COLUMNS)).to_pylist()
    by_pair = latest_rows(shards)
    samples = [r for rows in by_pair.values() for r in rows]
    train, rejected, hard = [], [], []
    reasons, per_rule, per_rule_samples = Counter(), Counter(), Counter()
    grade_pairs, grade_kept = Counter(), Counter()
    for i, pair in enumerate(pairs):
        rows = sorted(by_pair.get(i, []), key=lambda r: r["sample"])
        grade_pairs[pair["label"]] += 1
        for r in rows:
            if r["reason"] is not None:
                reasons[r["reason"]] += 1
                rejected.append({**pair, "sample": r["sample"], "reason": r["reason"], "finish_reason": r["finish_reason"],
                                 "text": r["text"]})
            else:
                per_rule_samples[trace_columns(r["text"], rulebook)["rule"]] += 1
        chosen = [r for r in rows if r["chosen"]]
        if chosen:
            cols = trace_columns(chosen[0]["text"], rulebook)
            per_rule[cols["rule"]] += 1
            grade_kept[pair["label"]] += 1
            train.append({**pair, **cols, "trace": chosen[0]["text"], "judge_score": chosen[0]["judge_score"],
                          "n_kept": sum(r["reason"] is None for r in rows)})
        else:
            hard.append({**pair, "n_samples": len(rows),
                         "reasons": json.dumps(dict(Counter(r["reason"] for r in rows)), sort_keys=True)})
    n_samples = len(samples)
    report = {
        "pairs": len(pairs), "pairs_with_trace": len(train), "hard_pairs": len(hard),
        "yield": len(train) / max(len(pairs), 1),
        "samples": n_samples, "samples_kept": n_samples - sum(reasons.values()),
        "sample_yield": (n_samples - sum(reasons.values())) / max(n_samples, 1),
        "yield_per_grade": {str(k): {"pairs": grade_pairs[k], "with_trace": grade_kept[k],
                                     "yield": grade_kept[k] / grade_pairs[k] if grade_pairs[k] else None}
                            for k in LABELS},
        "traces_per_rule": dict(sorted(per_rule.items())),
        "kept_samples_per_rule": dict(sorted(per_rule_samples.items())),
        "rejections": {k: reasons[k] for k in REASONS},
        "pairs_to_retry": sum(needs_retry(by_pair[i]) for i in by_pair),
        "requests": sum(r["requests"] for r in spent),
        "prompt_tokens": sum(r["prompt_tokens"] for r in spent),
        "completion_tokens": sum(r["completion_tokens"] for r in spent),
        "wall_s_this_invocation": round(wall_s, 2), "settings": settings,
        "eval_splits": sorted(eval_splits),
    }
    step_fields = [pa.field(k, pa.string()) for k in rulebook.keys]
    base = list(pairs_table.select(list(PAIR_COLUMNS)).schema)
    train_schema = pa.schema(base + [pa.field("rule", pa.string()), pa.field("tail", pa.bool_())] + step_fields
                             + [pa.field("trace", pa.string()), pa.field("judge_score", pa.float64()),
                                pa.field("n_kept", pa.int32())])
    rejected_schema = pa.schema(base + [pa.field("sample", pa.int32()), pa.field("reason", pa.string()),
                                        pa.field("finish_reason", pa.string()), pa.field("text", pa.string())])
    hard_schema = pa.schema(base + [pa.field("n_samples", pa.int32()), pa.field("reasons", pa.string())])
    tables = {"train.parquet": pa.Table.from_pylist(train, schema=train_schema),
              "rejected.parquet": pa.Table.from_pylist(rejected, schema=rejected_schema),
              "hard.parquet": pa.Table.from_pylist(hard, schema=hard_schema),
              **{f"{name}.parquet": t for name, t in eval_splits.items()}}
    writes = {out / name: (lambda t: lambda f: pq.write_table(t, f))(t) for name, t in tables.items()}
    writes[out / "report.json"] = lambda f: f.write(json.dumps(report, indent=2).encode("utf-8"))
    # the system prompt the traces were written under, verbatim: the trainer's data.instructions points here,
    # so the student is trained under exactly the prompt the teacher saw (training_overrides)
    writes[out / INSTRUCTIONS_FILE] = lambda f: f.write(instructions.encode("utf-8"))
    atomic_write_many(writes)
    return report


def training_overrides(out: Path, rulebook: str | None) -> list[str]:
    """The trainer's overrides that prompt (and check) the student exactly as the teacher was: the saved
    instructions, and the rulebook when synthesis had one of its own."""
    return [f"data.dir={out}", f"data.instructions={out / INSTRUCTIONS_FILE}",
            *([f"data.rulebook={rulebook}"] if rulebook else [])]


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
