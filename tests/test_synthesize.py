"""Trace synthesis (afrl_fast.synthesize) and its client (afrl_fast.endpoint).

End to end with a real model behind a real `python -m afrl_fast.serve`: a tiny judge that learnt one
pair's trace by heart (tests/serving.py), labels-only pairs → synthesize → train.parquet → a short
torchrun SFT run on it. Fault paths (429 storms, garbage and truncated completions, a server that
dies mid-run, one that hangs past --timeout, an unreachable URL) use a small scripted
OpenAI-compatible server in a thread.

Oracles: the regex reference verifier (tests/reference_verifier.py) re-derives every acceptance and
rejection; the shard files are re-read to check no pair is asked or written twice.
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from afrl_fast.synthesize.__main__ import main as synth_main
from afrl_fast.config import DEMO_CONFIG, load_config
from afrl_fast.data import synthesize
from afrl_fast.format import instructions_text
from afrl_fast.pairs import PAIR_COLUMNS, read_pairs, write_table
from afrl_fast.rulebook import load_rulebook
from afrl_fast.trace_selection import REASONS, choose, parse_judge_score, rejection_reasons

sys.path.insert(0, str(Path(__file__).parent))
from reference_verifier import verify_all  # noqa: E402
from serving import Scripted, Server, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RULEBOOK = load_rulebook()


# ----------------------------------------------------------------------------------------------
# Data: one memorised pair; labels-only copies of it, some labelled differently from its trace
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(memorized_pair):
    return memorized_pair


def labels_only(source, labels) -> pa.Table:
    rows = [{"query_id": "q1", "doc_id": f"d{i}", "query": source["query"], "document": source["document"],
             "label": k} for i, k in enumerate(labels)]
    return pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in PAIR_COLUMNS[:4]]
                                                        + [("label", pa.int8())]))


@pytest.fixture(scope="module")
def files(tmp_path_factory, source):
    d = tmp_path_factory.mktemp("pairs")
    other = (source["label"] + 2) % 5
    write_table(labels_only(source, [source["label"]] * 4 + [other] * 2), d / "pairs.parquet")
    for split in ("industry", "longtail"):
        write_table(synthesize(8, seed=5, split=split), d / f"{split}.parquet")
    return d


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, memorizing_judge):
    srv = Server(memorizing_judge, tmp_path_factory.mktemp("logs") / "teacher.log")
    yield srv
    srv.stop()


def run_synth(args, capsys):
    code = synth_main([str(a) for a in args])
    return code, capsys.readouterr()


def training_overrides(cap) -> list[str]:
    """The trainer overrides synthesize prints, as a shell would pass them."""
    line = next(x for x in cap.out.splitlines() if x.startswith("train on it under the same prompt: "))
    return shlex.split(line.split(": ", 1)[1])


def error_lines(cap) -> list[str]:
    """The CLI's error lines (stderr also carries the progress bar)."""
    return [line for line in cap.err.splitlines() if line.startswith("error:")]


def reference_reasons(texts, finishes, label):
    """The rejection rule restated on the regex reference verifier."""
    out = []
    for text, finish in zip(texts, finishes):
        r = verify_all([text], [label], RULEBOOK)[0]
        if finish == "length":
            out.append("truncated")
        elif not r.fmt:
            out.append("format")
        elif not r.cst:
            out.append("inconsistent")
        elif r.y_hat != label:
            out.append("rules_imply_other_grade")
        elif r.y_final != label:
            out.append("final_not_label")
        else:
            out.append(None)
    return out


# ----------------------------------------------------------------------------------------------
# End to end against the served model
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_labels_to_traces_to_sft(teacher, files, source, tmp_path, capsys):
    out = tmp_path / "synth"
    code, cap = run_synth(["--pairs", files / "pairs.parquet", "--teacher-endpoint", teacher.url,
                           "--teacher-model", "judge", "--out", out, "--n", "3", "--temperature", "0.3",
                           "--max-tokens", "400",
                           "--instructions", "short", "--concurrency", "4", "--shard-size", "2",
                           "--eval", f"industry={files / 'industry.parquet'}",
                           "--eval", f"longtail={files / 'longtail.parquet'}"], capsys)
    assert code == 0, cap.err
    train = read_pairs(out / "train.parquet", require_trace=True).to_pylist()
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    hard = pq.read_table(out / "hard.parquet").to_pylist()
    report = json.loads((out / "report.json").read_text())
    label = source["label"]
    # every kept trace passes the reference verifier against its pair's label, with its step columns
    assert train, cap.out
    for row in train:
        assert row["label"] == label
        ref = verify_all([row["trace"]], [row["label"]], RULEBOOK)[0]
        assert ref.fmt and ref.cst and ref.y_hat == label and ref.y_final == label
        values = {s.key: s.values[i] for s, i in zip(RULEBOOK.critical, ref.values)}
        assert {k: row[k] for k in RULEBOOK.keys} == values
        assert row["rule"] == RULEBOOK.first_rule(values).name
    # the pairs labelled unlike the trace the model knows are hard samples, not silently dropped
    other_ids = {f"d{i}" for i in (4, 5)}
    assert other_ids <= {h["doc_id"] for h in hard}
    assert {r["doc_id"] for r in train} | {h["doc_id"] for h in hard} == {f"d{i}" for i in range(6)}
    # every rejection's reason is what the reference verifier says
    for r in rejected:
        assert r["reason"] == reference_reasons([r["text"]], [r["finish_reason"]], r["label"])[0]
    # the report counts what the files hold
    assert report["pairs"] == 6 and report["pairs_with_trace"] == len(train) and report["hard_pairs"] == len(hard)
    assert sum(report["rejections"].values()) == len(rejected)
    assert report["samples"] == 18 and report["samples_kept"] == 18 - len(rejected)
    assert report["yield_per_grade"][str(label)]["with_trace"] == len(train)
    assert report["requests"] == 6 and report["completion_tokens"] > 0
    # the folder trains as it is
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone",
                           str(ROOT / "afrl_fast" / "train.py"), f"run.out_dir={run}", *training_overrides(cap),
                           "model.hidden_size=32", "model.num_layers=1",
                           "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16",
                           "model.intermediate_size=64", "sft.epochs=1", "sft.batch_size=2", "sft.warmup_steps=1",
                           "eval.batch_size=8", "run.stop_after=sft"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sft = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("phase") == "sft" and "loss" in r for r in sft)


# ----------------------------------------------------------------------------------------------
# A scripted OpenAI-compatible server for the fault paths
# ----------------------------------------------------------------------------------------------

def base_args(files, url, out, *extra):
    return ["--pairs", files / "pairs.parquet", "--teacher-endpoint", url, "--teacher-model", "m", "--out", out,
            "--n", "2", "--retries", "3", "--timeout", "10", "--concurrency", "2", "--shard-size", "2", *extra]


def test_429_storm_is_retried_and_garbage_is_counted(files, source, tmp_path, capsys):
    good = source["trace"]

    def reply(n, body):
        if n < 3:
            return 429, [], []
        if n % 2:
            return 200, [good, "###garbage"], ["stop", "stop"]
        return 200, [good[:40], good], ["length", "stop"]

    srv = Scripted(reply)
    try:
        code, cap = run_synth(base_args(files, srv.url, tmp_path / "o"), capsys)
    finally:
        srv.stop()
    assert code == 0, cap.err
    assert srv.count == 3 + 6            # three refusals retried, then one request per pair
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    rejected = pq.read_table(tmp_path / "o" / "rejected.parquet").to_pylist()
    for r in rejected:
        assert r["reason"] == reference_reasons([r["text"]], [r["finish_reason"]], r["label"])[0]
    assert report["rejections"]["truncated"] >= 1 and report["rejections"]["format"] >= 1
    assert set(report["rejections"]) == set(REASONS)


def test_the_prompt_used_is_saved_and_the_printed_overrides_train_under_it(files, source, tmp_path, capsys):
    """Synthesis and training agree by construction: OUT/instructions.txt is the system prompt the teacher
    was asked under, and the overrides the command prints make the trainer read exactly that text."""
    prompts = []

    def reply(n, body):
        prompts.append(body["prompt"])
        return 200, [source["trace"]] * 2, ["stop", "stop"]

    srv = Scripted(reply)
    try:
        code, cap = run_synth(base_args(files, srv.url, tmp_path / "o", "--instructions", "short"), capsys)
    finally:
        srv.stop()
    assert code == 0, cap.err
    saved = (tmp_path / "o" / "instructions.txt").read_text(encoding="utf-8")
    assert saved == RULEBOOK.instructions and all(saved in p for p in prompts)
    cfg = load_config(DEMO_CONFIG, training_overrides(cap))
    assert cfg.data.dir == str(tmp_path / "o")
    assert instructions_text(load_rulebook(cfg.data.rulebook), cfg.data.instructions) == saved


def test_server_dying_mid_run_keeps_finished_shards_and_resume_repeats_nothing(files, source, tmp_path, capsys):
    def dying(n, body):
        if n < 2:
            return 200, [source["trace"]] * body["n"], ["stop"] * body["n"]
        srv.server.should_exit = True           # the process goes away: later connections are refused
        return 503, [], []

    out = tmp_path / "o"
    srv = Scripted(dying)
    try:
        code, cap = run_synth(base_args(files, srv.url, out, "--retries", "1", "--concurrency", "1"), capsys)
    finally:
        srv.stop()
    assert code == 2
    err = error_lines(cap)
    assert len(err) == 1 and srv.url in err[0] and "--resume" in err[0]
    first = sorted(x for p in (out / "shards").glob("*.parquet") for x in pq.read_table(p).column("pair").to_pylist())
    assert sorted(set(first)) == [0, 1]          # the finished shard survived the failure
    assert not (out / "train.parquet").exists()
    asked = []

    def healthy(n, body):
        asked.append(body["prompt"])
        return 200, [source["trace"]] * body["n"], ["stop"] * body["n"]

    srv = Scripted(healthy)
    try:
        code, cap = run_synth(base_args(files, srv.url, out, "--resume"), capsys)
    finally:
        srv.stop()
    assert code == 0, cap.err
    assert len(asked) == 4                      # only the four unfinished pairs were asked
    pairs = [x for p in (out / "shards").glob("*.parquet") for x in set(pq.read_table(p).column("pair").to_pylist())]
    assert sorted(pairs) == list(range(6))      # every pair exactly once across shards
    train = read_pairs(out / "train.parquet", require_trace=True)
    assert train.num_rows == 4 and len(set(train.column("doc_id").to_pylist())) == 4


def test_judge_picks_its_best_and_ranks_unparseable_last(files, source, tmp_path, capsys):
    # two verified samples of different length: without a judge the shorter wins
    short = source["trace"]
    head, rest = short.split("\n", 1)
    longer = head + "\n" + rest.replace("): ", "): Read closely, ", 1)
    assert rejection_reasons([short, longer], ["stop", "stop"], source["label"], RULEBOOK) == [None, None]

    def teacher(n, body):
        return 200, [short, longer], ["stop", "stop"]

    def judge(n, body):
        # the longer trace gets 9, the shorter an unparseable reply three times in a row
        return 200, (["Score: 9"] if longer in body["prompt"] else ["I cannot say"]), ["stop"]

    t, j = Scripted(teacher), Scripted(judge)
    try:
        code, cap = run_synth(base_args(files, t.url, tmp_path / "o", "--judge-endpoint", j.url,
                                        "--judge-model", "judge"), capsys)
        plain, cap2 = run_synth(base_args(files, t.url, tmp_path / "p"), capsys)
    finally:
        t.stop()
        j.stop()
    assert code == 0 and plain == 0, cap.err + cap2.err
    judged = read_pairs(tmp_path / "o" / "train.parquet").to_pylist()
    unjudged = read_pairs(tmp_path / "p" / "train.parquet").to_pylist()
    assert {r["trace"] for r in judged} == {longer} and {r["judge_score"] for r in judged} == {9.0}
    assert {r["trace"] for r in unjudged} == {short}
    assert j.count == 4 * (1 + 3)       # 4 accepted pairs: one reply for the longer, three tries for the shorter


def test_unreachable_endpoint_is_one_line_naming_the_url(files, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code, cap = run_synth(base_args(files, url, tmp_path / "o", "--retries", "1", "--timeout", "2"), capsys)
    lines = error_lines(cap)
    assert code == 2 and len(lines) == 1 and url in lines[0] and "Traceback" not in cap.err


def test_a_server_that_hangs_past_the_timeout_is_retried_then_one_line_naming_the_url(files, tmp_path, capsys):
    """Every request hangs: each times out after --timeout (0.5 s), is sent again once (--retries 1),
    and the run ends like the other endpoint failures: one line naming the URL, exit 2, nothing
    assembled. The scripted hang ends when the server stops, so the test's wall time is bounded."""
    asked = []

    def hang(n, body):
        asked.append(body["prompt"])
        return None

    srv = Scripted(hang)
    try:
        code, cap = run_synth(base_args(files, srv.url, tmp_path / "o", "--retries", "1", "--timeout", "0.5",
                                        "--concurrency", "1"), capsys)
    finally:
        srv.stop()
    lines = error_lines(cap)
    assert code == 2 and len(lines) == 1 and srv.url in lines[0] and "0.5 s timeout" in lines[0], cap.err
    assert "Traceback" not in cap.err and "nothing was written" in lines[0]
    assert len(asked) >= 2 and asked[0] == asked[1]        # the first request, then its retry
    assert not (tmp_path / "o").exists()                   # no pair finished: no folder to trip over


def shard_pairs(out: Path) -> list[list[int]]:
    """The pairs of each shard, in write order."""
    return [sorted(set(pq.read_table(p).column("pair").to_pylist()))
            for p in sorted((out / "shards").glob("*.parquet"))]


def test_refused_pairs_are_asked_again_on_resume(files, source, tmp_path, capsys):
    """One pair's request is refused (400, as a too-long prompt is): the others are kept, the run
    says so, and --resume asks for that pair alone; its new rows replace the refusal."""
    good = source["trace"]

    def refuse_pair_2(n, body):                  # a pair's seed is its index (--seed 0)
        return (400, [], []) if body["seed"] == 2 else (200, [good] * body["n"], ["stop"] * body["n"])

    out = tmp_path / "o"
    srv = Scripted(refuse_pair_2)
    try:
        code, cap = run_synth(base_args(files, srv.url, out), capsys)
    finally:
        srv.stop()
    assert code == 0, cap.err
    assert "1 pairs have no trace because the endpoint refused" in cap.out and "--resume" in cap.out
    report = json.loads((out / "report.json").read_text())
    assert report["rejections"]["request_refused"] == 1 and report["pairs_to_retry"] == 1
    assert "d2" in {h["doc_id"] for h in pq.read_table(out / "hard.parquet").to_pylist()}
    asked = []

    def healthy(n, body):
        asked.append(body["seed"])
        return 200, [good] * body["n"], ["stop"] * body["n"]

    srv = Scripted(healthy)
    try:
        code, cap = run_synth(base_args(files, srv.url, out, "--resume"), capsys)
    finally:
        srv.stop()
    assert code == 0, cap.err
    assert asked == [2]                          # the refused pair alone
    assert shard_pairs(out) == [[0, 1], [2, 3], [4, 5], [2]]   # its refusal stays in its shard, superseded
    report = json.loads((out / "report.json").read_text())
    assert report["rejections"]["request_refused"] == 0 and report["pairs_to_retry"] == 0
    assert report["samples"] == 12 and report["requests"] == 6
    train = read_pairs(out / "train.parquet", require_trace=True).to_pylist()
    assert sorted(r["doc_id"] for r in train) == ["d0", "d1", "d2", "d3"]


def test_aborted_samples_are_not_complete_and_their_pairs_are_asked_again(files, source, tmp_path, capsys):
    """finish_reason "abort" (a server that gave up on the sample): never kept, even when its text
    verifies; a pair left without a trace by it is asked again on --resume."""
    good = source["trace"]

    def aborting(n, body):
        return 200, [good, good], ["abort", "abort" if body["seed"] == 0 else "stop"]

    out = tmp_path / "o"
    srv = Scripted(aborting)
    try:
        code, cap = run_synth(base_args(files, srv.url, out), capsys)
    finally:
        srv.stop()
    assert code == 0, cap.err
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    assert {(r["doc_id"], r["sample"]) for r in rejected if r["reason"] == "aborted"} == \
        {(f"d{i}", 0) for i in range(6)} | {("d0", 1)}
    train = read_pairs(out / "train.parquet", require_trace=True).to_pylist()
    assert sorted(r["doc_id"] for r in train) == ["d1", "d2", "d3"]
    # d0: both samples aborted; d4, d5: labelled unlike the trace, and one sample aborted
    assert json.loads((out / "report.json").read_text())["pairs_to_retry"] == 3
    asked = []

    def healthy(n, body):
        asked.append(body["seed"])
        return 200, [good] * body["n"], ["stop"] * body["n"]

    srv = Scripted(healthy)
    try:
        code, cap = run_synth(base_args(files, srv.url, out, "--resume"), capsys)
    finally:
        srv.stop()
    assert code == 0, cap.err
    assert sorted(asked) == [0, 4, 5]
    train = read_pairs(out / "train.parquet", require_trace=True).to_pylist()
    assert sorted(r["doc_id"] for r in train) == ["d0", "d1", "d2", "d3"]


def test_an_endpoint_refusing_requests_in_a_row_is_an_endpoint_error():
    """RequestRefused for the first refusals (an item's problem), EndpointError once max_refusals
    come in a row (the endpoint's); an answer in between resets the count."""
    import asyncio

    from afrl_fast.endpoint import Endpoint, EndpointError, RequestRefused

    script = iter([400, 400, 200, 400, 400, 400])
    srv = Scripted(lambda n, body: (next(script), ["0"], ["stop"]))

    async def go():
        ep = Endpoint(srv.url, "m", retries=0, max_refusals=3)
        seen = []
        try:
            for _ in range(6):
                try:
                    await ep.generate(prompt="x")
                    seen.append("ok")
                except RequestRefused:
                    seen.append("refused")
        except EndpointError as e:
            seen.append(str(e))
        finally:
            await ep.close()
        return seen
    try:
        seen = asyncio.run(go())
    finally:
        srv.stop()
    assert seen[:5] == ["refused", "refused", "ok", "refused", "refused"]
    assert "refused 3 requests in a row" in seen[5] and srv.url in seen[5] and "model name" in seen[5]


@pytest.mark.parametrize("args, needle", [
    (["--n", "0"], "--n"),
    (["--judge-model", "x"], "--judge-endpoint"),
    (["--eval", "nonsense"], "NAME=PATH"),
    (["--resume"], "nothing to resume"),
])
def test_bad_arguments_are_one_line(files, tmp_path, capsys, args, needle):
    code, cap = run_synth(base_args(files, "http://127.0.0.1:9", tmp_path / "o", *args), capsys)
    lines = error_lines(cap)
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in cap.err


def test_bad_pairs_file_names_row_and_column(files, source, tmp_path, capsys):
    bad = labels_only(source, [1, 7])
    pq.write_table(bad, tmp_path / "bad.parquet")
    code, cap = run_synth(["--pairs", tmp_path / "bad.parquet", "--teacher-endpoint", "http://127.0.0.1:9",
                           "--teacher-model", "m", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "bad.parquet" in cap.err and "row 1" in cap.err and "label" in cap.err
    assert not (tmp_path / "o").exists()


def test_a_used_folder_needs_resume(files, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    code, cap = run_synth(base_args(files, "http://127.0.0.1:9", tmp_path / "o"), capsys)
    assert code == 2 and "--resume" in cap.err and (tmp_path / "o" / "keep.txt").read_text() == "x"


# ----------------------------------------------------------------------------------------------
# The pure parts
# ----------------------------------------------------------------------------------------------

def test_rejection_reasons_match_the_reference_verifier():
    rows = synthesize(24, seed=2, split="longtail").to_pylist()
    texts, finishes, labels = [], [], []
    for i, r in enumerate(rows):
        t = r["trace"]
        t = [t, t[:60], t.replace("Final: \\boxed{", "Final: \\boxed{1", 1), "x" + t][i % 4]
        texts.append(t)
        finishes.append("length" if i % 7 == 0 else "stop")
        labels.append(r["label"] if i % 3 else (r["label"] + 1) % 5)
    for text, finish, label in zip(texts, finishes, labels):
        assert rejection_reasons([text], [finish], label, RULEBOOK) == reference_reasons([text], [finish], label)


def test_choose_and_parse_judge_score():
    texts = ["aaaa", "aa", "aaa", "aa"]
    assert choose(texts, [], {}) is None
    assert choose(texts, [0, 1, 2, 3], {}) == 1                      # shortest, then lowest index
    assert choose(texts, [0, 1, 2, 3], {0: 7.0, 2: 7.0, 1: None, 3: 2.0}) == 2   # best score, then shortest
    assert choose(texts, [0, 3], {0: None, 3: None}) == 3
    assert parse_judge_score("Reasoning...\nScore: 8") == 8.0
    assert parse_judge_score("score = 7.5, later Score: 6") == 6.0
    assert parse_judge_score("**Score:** 9") == 9.0
    assert parse_judge_score("10") == 10.0
    for bad in ("", "Score: 11", "no idea", "Score: -1"):
        assert parse_judge_score(bad) is None
