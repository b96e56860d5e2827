"""Every command-line tool, fed bad input as a careless or hostile user would: each case must exit
with code 2, print exactly ONE line on stderr (starting "error: ", naming the file / row / field),
print no traceback, leave no partial output behind (no output file, no temp file next to it,
for synth no split written before the failure, no run folder a corrected rerun would trip over),
and remove or change nothing that was there before (the shared inputs, and whatever the case's
setup put in its folder: an earlier run, a model inside it, a damaged resume state).

The CLIs run in-process (their `main(argv)`), so the table is fast; the trainer's one case that
needs a built model (a damaged checkpoint on --resume) runs it in a subprocess. Endpoint faults
(synthesize, piar) go to a real HTTP server on 127.0.0.1 that answers each URL path with one fault
(tests/serving.py: Faulty); progress bars are switched off so stderr holds only what the CLI says.
"""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from afrl_fast import distill, experiments, synthesize, train
from afrl_fast.data import __main__ as data
from afrl_fast.evaluate import __main__ as evaluate
from afrl_fast.experiments import __main__ as experiments_cli
from afrl_fast.metrics import __main__ as metrics
from afrl_fast.piar import __main__ as piar
from afrl_fast.report import __main__ as report
from afrl_fast.synthesize import __main__ as synthesize_cli
from afrl_fast.verify import __main__ as verify
from afrl_fast.data import synthesize as synthesize_pairs
from afrl_fast.pairs import read_pairs, write_table
from afrl_fast.format import load_tokenizer, render_trace, resolve_prompt_settings
from afrl_fast.rulebook import DEFAULT_RULEBOOK, load_rulebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from serving import Faulty  # noqa: E402
PERFECT = {"intent": "full", "entity": "consistent", "time": "current", "source": "high", "coverage": "complete"}


@dataclass
class Case:
    cli: str                              # a key of MAINS
    argv: list                            # {d}: the case's folder, {inputs}: the shared inputs, {url}: Faulty
    outputs: list = field(default_factory=list)   # paths (with {d}) that must not exist afterwards
    needle: str = ""                      # a fragment the error line must contain
    before: str = ""                      # name of a setup step (see setup)


def write_pairs(path: Path, n_queries=2, docs=3):
    rows = [(f"q{q}", f"d{q}-{k}", f"query {q}", f"document {q} {k}", (q + k) % 5)
            for q in range(n_queries) for k in range(docs)]
    pq.write_table(pa.table({"query_id": [r[0] for r in rows], "doc_id": [r[1] for r in rows],
                             "query": [r[2] for r in rows], "document": [r[3] for r in rows],
                             "label": pa.array([r[4] for r in rows], pa.int8())}), path)


def write_predictions(path: Path, p0=None, qid=None):
    n = 4
    probs = np.full((n, 5), 0.2)
    cols = {"query_id": qid if qid is not None else ["a", "a", "b", "b"], "label": pa.array([0, 2, 1, 4], pa.int8())}
    cols.update({f"p{k}": probs[:, k] for k in range(5)})
    if p0 is not None:
        cols["p0"] = p0
    pq.write_table(pa.table(cols), path)


def rulebook_variant(path: Path, old: str, new: bytes | str):
    text = DEFAULT_RULEBOOK.read_bytes()
    path.write_bytes(text.replace(old.encode(), new if isinstance(new, bytes) else new.encode(), 1))


def tiny_model_dir(path: Path):
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      tie_word_embeddings=True)
    transformers.Qwen3ForCausalLM(config).save_pretrained(path)
    load_tokenizer().save_pretrained(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Shared inputs, valid and broken."""
    d = tmp_path_factory.mktemp("inputs")
    write_pairs(d / "pairs.parquet")
    rb = load_rulebook()
    trace = render_trace(rb, 4, PERFECT)
    pq.write_table(pa.table({"response": [trace, trace[:-3]], "label": pa.array([4, 200], pa.uint8())}),
                   d / "responses_uint8.parquet")
    pq.write_table(pa.table({"response": [trace], "label": pa.array([4], pa.int8())}), d / "responses.parquet")
    write_predictions(d / "preds.parquet")
    write_predictions(d / "preds_str.parquet", p0=["0.2", "0.2", "x", "0.2"])
    write_predictions(d / "preds_list.parquet", p0=[[0.2], [0.2], [0.2], [0.2]])
    write_predictions(d / "preds_null_qid.parquet", qid=["a", None, "b", None])
    (d / "qrels.txt").write_text("q1 0 d1 1\nq1 0 d2 0\n")
    (d / "qrels_empty.txt").write_text("\n\n")
    (d / "corpus.tsv").write_text("d1\tfirst passage\nd2\tsecond passage\n")
    (d / "corpus_latin1.tsv").write_bytes("d1\tcaf\xe9 passage\nd2\tsecond\n".encode("latin-1"))
    (d / "queries.tsv").write_text("q1\ta query\n")
    (d / "labels_grade7.csv").write_text("query_id,doc_id,query,document,rating\nq1,d1,a query,a doc,4\n"
                                         "q1,d2,a query,another doc,7\n")
    (d / "labels_latin1.csv").write_bytes("query_id,doc_id,query,document,rating\nq1,d1,caf\xe9,a doc,4\n"
                                          .encode("latin-1"))
    (d / "a_file").write_text("not a folder\n")
    (d / "a_dir").mkdir()
    rulebook_variant(d / "rb_latin1.yaml", "You are an expert", "You are an expert caf\xe9".encode("latin-1"))
    rulebook_variant(d / "rb_nan_freq.yaml", "    label: 0\n    freq: 20\n", "    label: 0\n    freq: .nan\n")
    bomb = "rules: []\nsteps:\n  - &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10))
    (d / "rb_bomb.yaml").write_text(bomb)
    (d / "empty_model").mkdir()
    (d / "odd_model").mkdir()
    (d / "odd_model" / "config.json").write_text(json.dumps({"model_type": "not_a_real_architecture"}))
    tiny_model_dir(d / "model")
    (d / "config_malformed.yaml").write_text("sft:\n  lr: [1e-3\n")
    (d / "config_list.yaml").write_text("- sft\n- rl\n")
    pq.write_table(pq.read_table(d / "pairs.parquet").slice(0, 0), d / "pairs_empty.parquet")
    (d / "splits").mkdir()
    for split, n in (("train", 8), ("industry", 6), ("longtail", 6)):
        write_table(synthesize_pairs(n, seed=3, split=split), d / "splits" / f"{split}.parquet")
    (d / "metrics_run").mkdir()
    (d / "metrics_run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (d / "metrics_latin1").mkdir()
    (d / "metrics_latin1" / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 1.0}\n{"step": 2, "note": "caf\xe9"}\n')
    return d


@pytest.fixture(scope="module")
def faulty():
    srv = Faulty()
    yield srv
    srv.stop()


# a tiny distillation: the traces come from the data, two optimizer steps
DISTILL_TINY = ["student.hidden_size=32", "student.num_layers=1", "student.num_heads=2", "student.num_kv_heads=1",
                "student.head_dim=16", "student.intermediate_size=64", "distill.traces=data", "distill.epochs=1",
                "distill.batch_size=4", "distill.warmup_steps=1", "eval.batch_size=8", "run.checkpoint_every=1"]


@pytest.fixture(scope="module")
def distill_run(files, tmp_path_factory):
    """A finished tiny distillation run (in-process, a few seconds); the resume and overwrite cases
    work on copies of it."""
    run = tmp_path_factory.mktemp("distill") / "run"
    assert distill.main([f"run.out_dir={run}", f"teacher.path={files / 'model'}", f"data.dir={files / 'splits'}",
                         *DISTILL_TINY]) == 0
    return run


def A(name):
    return "{inputs}/" + name


SYN = ["--pairs", A("pairs.parquet"), "--teacher-model", "m", "--out", "{d}/o", "--n", "2", "--retries", "0", "--timeout", "5",
       "--concurrency", "2"]


def synth_case(fault, *extra, needle=None, outputs=("{d}/o",), before=""):
    return Case("synthesize", [*SYN, "--teacher-endpoint", "{url}/" + fault, *extra], list(outputs),
                "{url}/" + fault if needle is None else needle, before)


def piar_case(fault, *extra, needle=None, val="pairs.parquet"):
    url = "{url}/" + fault
    return Case("piar", ["--pairs", A(val), "--actor-endpoint", url, "--evaluator-endpoint", url,
                         "--refiner-endpoint", url, "--out", "{d}/p",
                         "--retries", "0", "--timeout", "5", "--rounds", "1", *extra], ["{d}/p"],
                url if needle is None else needle)


DIS = ["teacher.path=" + A("model"), "data.dir=" + A("splits"), *DISTILL_TINY]
ABLATION = ["ablation", "--config", str(ROOT / "configs" / "demo.yaml"), "--arms", "grpo", "--seeds", "0"]
DISTILLATION = ["distillation", "--config", str(ROOT / "configs" / "distill_demo.yaml"), "--students", "distilled",
                "--seeds", "0"]


CASES = {
    # verify
    "verify_uint8_label_out_of_range": Case("verify", ["--responses", A("responses_uint8.parquet"), "--out", "{d}/o.parquet"],
                                            ["{d}/o.parquet"], "label 200 at index 1"),
    "verify_out_parent_is_a_file": Case("verify", ["--responses", A("responses.parquet"), "--out", A("a_file") + "/o.parquet"],
                                        [], "a_file"),
    "verify_out_is_a_directory": Case("verify", ["--responses", A("responses.parquet"), "--out", A("a_dir")], [],
                                      "is a directory"),
    "verify_out_unwritable": Case("verify", ["--responses", A("responses.parquet"), "--out", "/proc/self/o.parquet"],
                                  [], "/proc/self"),
    "verify_alias_bomb_rulebook": Case("verify", ["--responses", A("responses.parquet"), "--out", "{d}/o.parquet",
                                                  "--rulebook", A("rb_bomb.yaml")], ["{d}/o.parquet"], "aliases"),
    # data trec
    "trec_invalid_utf8_corpus": Case("data", ["trec", "--qrels", A("qrels.txt"), "--corpus", A("corpus_latin1.tsv"),
                                              "--queries", A("queries.tsv"), "--grade-map", "0:0,1:4", "--out",
                                              "{d}/p.parquet"], ["{d}/p.parquet"], "line 1"),
    "trec_qrels_is_a_directory": Case("data", ["trec", "--qrels", A("a_dir"), "--corpus", A("corpus.tsv"), "--queries",
                                               A("queries.tsv"), "--grade-map", "0:0,1:4", "--out", "{d}/p.parquet"],
                                      ["{d}/p.parquet"], "a_dir"),
    "trec_out_parent_is_a_file": Case("data", ["trec", "--qrels", A("qrels.txt"), "--corpus", A("corpus.tsv"),
                                               "--queries", A("queries.tsv"), "--grade-map", "0:0,1:4", "--out",
                                               A("a_file") + "/p.parquet"], [], "a_file"),
    "trec_out_is_a_directory": Case("data", ["trec", "--qrels", A("qrels.txt"), "--corpus", A("corpus.tsv"),
                                             "--queries", A("queries.tsv"), "--grade-map", "0:0,1:4", "--out", A("a_dir")],
                                    [], "is a directory"),
    "trec_empty_qrels": Case("data", ["trec", "--qrels", A("qrels_empty.txt"), "--corpus", A("corpus.tsv"), "--queries",
                                      A("queries.tsv"), "--grade-map", "0:0,1:4", "--out", "{d}/p.parquet"],
                             ["{d}/p.parquet"], "no judgements"),
    # data import
    "import_grade_out_of_range": Case("data", ["import", "--input", A("labels_grade7.csv"), "--column", "label=rating",
                                               "--out", "{d}/p.parquet"], ["{d}/p.parquet"],
                                      "labels_grade7.csv: row 1, column 'label': grade 7"),
    "import_latin1_csv": Case("data", ["import", "--input", A("labels_latin1.csv"), "--column", "label=rating",
                                       "--out", "{d}/p.parquet"], ["{d}/p.parquet"], "invalid UTF8"),
    "import_out_is_a_directory": Case("data", ["import", "--input", A("labels_grade7.csv"), "--out", A("a_dir")], [],
                                      "is a directory"),
    # data synth
    "synth_negative_seed": Case("data", ["synth", "--n", "20", "--seed", "-1", "--out", "{d}/s", "--no-progress"],
                                ["{d}/s"], "--seed"),
    "synth_nan_freq_rulebook": Case("data", ["synth", "--n", "20", "--out", "{d}/s", "--no-progress", "--rulebook",
                                             A("rb_nan_freq.yaml")], ["{d}/s"], "freq"),
    "synth_latin1_rulebook": Case("data", ["synth", "--n", "20", "--out", "{d}/s", "--no-progress", "--rulebook",
                                           A("rb_latin1.yaml")], ["{d}/s"], "not UTF-8"),
    "synth_alias_bomb_rulebook": Case("data", ["synth", "--n", "20", "--out", "{d}/s", "--no-progress", "--rulebook",
                                               A("rb_bomb.yaml")], ["{d}/s"], "aliases"),
    "synth_out_parent_is_a_file": Case("data", ["synth", "--n", "20", "--out", A("a_file") + "/s", "--no-progress"], [],
                                       "a_file"),
    "synth_out_is_a_file": Case("data", ["synth", "--n", "20", "--out", A("a_file"), "--no-progress"], [],
                                "not a directory"),
    "synth_zero_industry_rows": Case("data", ["synth", "--n", "20", "--n-industry", "0", "--out", "{d}/s",
                                              "--no-progress"], ["{d}/s"], "--n-industry"),
    "synth_absurd_n": Case("data", ["synth", "--n", str(10 ** 13), "--out", "{d}/s", "--no-progress"], ["{d}/s"], "--n"),
    # metrics
    "metrics_string_p_column": Case("metrics", ["--predictions", A("preds_str.parquet"), "--out", "{d}/m.json"],
                                    ["{d}/m.json"], "'p0'"),
    "metrics_list_p_column": Case("metrics", ["--predictions", A("preds_list.parquet"), "--out", "{d}/m.json"],
                                  ["{d}/m.json"], "'p0'"),
    "metrics_null_query_id": Case("metrics", ["--predictions", A("preds_null_qid.parquet"), "--out", "{d}/m.json"],
                                  ["{d}/m.json"], "query_id"),
    "metrics_out_parent_is_a_file": Case("metrics", ["--predictions", A("preds.parquet"), "--out", A("a_file") + "/m.json"],
                                         [], "a_file"),
    "metrics_out_is_a_directory": Case("metrics", ["--predictions", A("preds.parquet"), "--out", A("a_dir")], [],
                                       "is a directory"),
    # evaluate
    "evaluate_empty_model_folder": Case("evaluate", ["--model", A("empty_model"), "--pairs", A("pairs.parquet"), "--out",
                                                     "{d}/m.json", "--tokenizer", "qwen3"], ["{d}/m.json"], "no config.json"),
    "evaluate_unknown_model_type": Case("evaluate", ["--model", A("odd_model"), "--pairs", A("pairs.parquet"), "--out",
                                                     "{d}/m.json", "--tokenizer", "qwen3"], ["{d}/m.json"], "odd_model"),
    "evaluate_out_parent_is_a_file": Case("evaluate", ["--model", A("model"), "--pairs", A("pairs.parquet"), "--out",
                                                       A("a_file") + "/m.json"], [], "a_file", before="no_model_load"),
    "evaluate_predictions_out_is_a_directory": Case("evaluate", ["--model", A("model"), "--pairs", A("pairs.parquet"),
                                                                 "--out", "{d}/m.json", "--predictions", A("a_dir")],
                                                    ["{d}/m.json"], "is a directory", before="no_model_load"),
    "evaluate_cuda_without_cuda": Case("evaluate", ["--model", A("model"), "--pairs", A("pairs.parquet"), "--out",
                                                    "{d}/m.json", "--device", "cuda"], ["{d}/m.json"], "CUDA",
                                       before="no_cuda"),
    # train: the config is checked before anything is done
    "train_malformed_yaml": Case("train", ["--config", A("config_malformed.yaml"), "run.out_dir={d}/run"], ["{d}/run"],
                                 "not valid YAML at line"),
    "train_config_not_a_mapping": Case("train", ["--config", A("config_list.yaml"), "run.out_dir={d}/run"], ["{d}/run"],
                                       "mapping"),
    "train_negative_lr": Case("train", ["sft.lr=-1", "run.out_dir={d}/run"], ["{d}/run"], "sft.lr"),
    "train_cuda_without_cuda": Case("train", ["run.device=cuda", "run.out_dir={d}/run"], ["{d}/run"], "run.device=cuda",
                                    before="no_cuda"),
    "train_pred_gate_gamma_breaks_ordering": Case("train", ["rl.gate=pred", "rl.reward_ordinal_slope=0.9", "run.out_dir={d}/run"],
                                        ["{d}/run"], "rl.reward_ordinal_slope"),
    # train: inputs are checked before the run folder is made, and never inside what --overwrite removes
    "train_missing_model_path": Case("train", ["model.path={d}/nowhere", "run.out_dir={d}/run", "data.n_train=8",
                                               "data.n_eval=4"], ["{d}/run"], "model.path"),
    "train_model_inside_the_overwritten_run": Case("train", ["--overwrite", "model.path={d}/run/final_model",
                                                             "run.out_dir={d}/run", "data.n_train=8", "data.n_eval=4"],
                                                   ["{d}/run/data"], "final_model", before="train_run_with_model"),
    # distill
    "distill_out_dir_is_a_file": Case("distill", [*DIS, "run.out_dir=" + A("a_file")], [], "not a directory"),
    "distill_cuda_without_cuda": Case("distill", [*DIS, "run.device=cuda", "run.out_dir={d}/run"], ["{d}/run"],
                                      "run.device=cuda", before="no_cuda"),
    "distill_trace_longer_than_max_leaves_no_folder": Case("distill", [*DIS, "run.out_dir={d}/run",
                                                                      "data.max_response_tokens=8"], ["{d}/run"],
                                                           "max_response_tokens"),
    "distill_teacher_inside_the_overwritten_run": Case("distill", ["--overwrite", "teacher.path={d}/run/student_model",
                                                                   "data.dir=" + A("splits"), *DISTILL_TINY,
                                                                   "run.out_dir={d}/run"], [], "student_model",
                                                       before="distill_run"),
    "distill_teacher_linked_into_the_overwritten_run": Case("distill", ["--overwrite", "teacher.path={d}/teacher",
                                                                        "data.dir=" + A("splits"), *DISTILL_TINY,
                                                                        "run.out_dir={d}/run"], [], "student_model",
                                                            before="distill_run_linked_teacher"),
    "distill_resume_with_non_utf8_metrics": Case("distill", ["--resume", *DIS, "run.out_dir={d}/run"], [],
                                                 "metrics.jsonl", before="distill_run_bad_metrics"),
    # synthesize: reserved split names, arguments checked before the folder is made, endpoint faults,
    # a damaged resume state
    "synth_eval_named_rejected": synth_case("zero", "--eval", "rejected=" + A("pairs.parquet"), needle="rejected"),
    "synth_eval_named_hard": synth_case("zero", "--eval", "hard=" + A("pairs.parquet"), needle="hard"),
    "synth_not_an_http_url": Case("synthesize", [*SYN, "--teacher-endpoint", "ftp://127.0.0.1/v1"], ["{d}/o"],
                                  "not an http(s) URL"),
    "synth_timeout_nan": synth_case("zero", "--timeout", "nan", needle="--timeout"),
    "synth_empty_pairs": Case("synthesize", [*SYN, "--teacher-endpoint", "{url}/zero", "--pairs", A("pairs_empty.parquet")],
                              ["{d}/o"], "no pairs"),
    "synth_endpoint_answers_html": synth_case("html"),
    "synth_endpoint_answers_broken_json": synth_case("notjson"),
    "synth_endpoint_answers_another_object": synth_case("foo"),
    "synth_endpoint_answers_no_choices": synth_case("zero", needle="0 choices"),
    "synth_endpoint_answers_one_choice_for_two": synth_case("fewer", needle="1 choices"),
    "synth_endpoint_answers_n_plus_3_choices": synth_case("more", needle="5 choices"),
    "synth_endpoint_refuses_every_request": synth_case("refuse", needle="does not exist"),
    "synth_resume_corrupt_synthesis_json": synth_case("zero", "--resume", needle="synthesis.json", outputs=(),
                                                      before="synth_corrupt_state"),
    "synth_resume_corrupt_shard": synth_case("zero", "--resume", needle="000000.parquet",
                                             outputs=("{d}/o/train.parquet",), before="synth_corrupt_shard"),
    # piar
    "piar_actor_answers_html": piar_case("html"),
    "piar_actor_answers_broken_json": piar_case("notjson"),
    "piar_actor_answers_another_object": piar_case("foo"),
    "piar_actor_answers_no_choices": piar_case("zero", needle="0 choices"),
    "piar_actor_refuses_every_pair": piar_case("refuse", needle="does not exist"),
    "piar_actor_answers_no_grade": piar_case("garbage", needle="6 of 6"),
    "piar_empty_validation_set": piar_case("zero", val="pairs_empty.parquet", needle="no pairs"),
    # experiments: --out is checked before any work, and is never a run folder
    "experiments_out_is_a_file": Case("experiments", [*ABLATION, "--out", A("a_file")], [], "not a directory",
                                      before="no_runs"),
    "experiments_ablation_into_a_distill_run_folder": Case("experiments", [*ABLATION, "--out", "{d}/run"],
                                                           ["{d}/run/experiment.json", "{d}/run/data", "{d}/run/sft"],
                                                           "run folder", before="distill_run_folder"),
    "experiments_distillation_into_a_distill_run_folder": Case(
        "experiments", [*DISTILLATION, "--out", "{d}/run", "teacher.path=" + A("model"), "data.dir=" + A("splits")],
        ["{d}/run/experiment.json", "{d}/run/distilled", "{d}/run/teacher_instructions.txt"], "run folder",
        before="distill_run_folder"),
    # report
    "report_out_is_a_file": Case("report", [A("metrics_run"), "--out", A("a_file")], [], "not a directory"),
    "report_metrics_not_utf8": Case("report", [A("metrics_latin1")], [A("metrics_latin1") + "/plots"],
                                    "metrics.jsonl"),
    "report_experiment_json_not_an_object": Case("report", ["{d}/exp"], ["{d}/exp/summary"], "experiment.json",
                                                 before="experiment_list"),
    "report_experiment_json_without_runs": Case("report", ["{d}/exp"], ["{d}/exp/summary"], "'runs'",
                                                before="experiment_without_runs"),
    "report_results_json_not_rows": Case("report", ["{d}/exp"], ["{d}/exp/summary"], "grpo/seed0/results.json",
                                         before="experiment_bad_results"),
    "report_experiment_without_a_finished_run": Case("report", ["{d}/exp"], ["{d}/exp/summary"], "no finished run",
                                                     before="experiment_unfinished"),
}
MAINS = {"data": data.main, "verify": verify.main, "metrics": metrics.main, "evaluate": evaluate.main,
         "train": train.main, "distill": distill.main, "synthesize": synthesize_cli.main, "piar": piar.main,
         "experiments": experiments_cli.main, "report": report.main}


def setup(step: str, monkeypatch, d: Path, files: Path, argv: list, request):
    if step == "no_model_load":      # the output path must be checked before the model is even loaded
        def refuse(*a, **k):
            raise AssertionError("the model was loaded before the output path was checked")
        monkeypatch.setattr(evaluate, "load_model", refuse)
    elif step == "no_cuda":          # the same answer on a machine with a GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    elif step == "train_run_with_model":    # a finished run whose exported model the next run starts from
        shutil.copytree(files / "model", d / "run" / "final_model")
        (d / "run" / "results.json").write_text("{}\n")
    elif step in ("distill_run", "distill_run_bad_metrics", "distill_run_linked_teacher"):
        shutil.copytree(request.getfixturevalue("distill_run"), d / "run")
        if step == "distill_run_linked_teacher":   # the teacher's path outside the run, a symlink into it
            (d / "teacher").symlink_to(d / "run" / "student_model", target_is_directory=True)
        if step == "distill_run_bad_metrics":      # a Latin-1 byte in the middle of the log
            path = d / "run" / "metrics.jsonl"
            lines = path.read_bytes().splitlines(keepends=True)
            path.write_bytes(lines[0] + b'{"step": 1, "note": "caf\xe9"}\n' + b"".join(lines[1:]))
    elif step == "synth_corrupt_state":
        (d / "o" / "shards").mkdir(parents=True)
        (d / "o" / "synthesis.json").write_text("{not json")
    elif step == "synth_corrupt_shard":        # the run's own settings, and a torn shard
        args = synthesize_cli.build_parser().parse_args(argv)
        prompt = resolve_prompt_settings(None, args.rulebook, args.instructions)
        settings = synthesize.run_settings(args, Path(args.pairs), read_pairs(args.pairs).num_rows,
                                           prompt.instructions)
        (d / "o" / "shards").mkdir(parents=True)
        (d / "o" / "synthesis.json").write_text(json.dumps(settings))
        (d / "o" / "shards" / "000000.parquet").write_bytes(b"PAR1 torn")
    elif step in ("no_runs", "distill_run_folder"):
        def refuse(*a, **k):
            raise AssertionError("a training run was started")
        monkeypatch.setattr(experiments, "run_one", refuse)
        if step == "distill_run_folder":       # what a distillation run leaves in its folder
            run = d / "run"
            (run / "checkpoints").mkdir(parents=True)
            (run / "student_model").mkdir()
            (run / "config.yaml").write_text("run:\n  seed: 0\n")
            (run / "checkpoints" / "latest.pt").write_bytes(b"PK")
            (run / "metrics.jsonl").write_text('{"step": 1}\n')
    elif step.startswith("experiment_"):
        exp = d / "exp"
        exp.mkdir()
        manifest = {"kind": "ablation", "config": "configs/demo.yaml", "arms": ["grpo"], "seeds": [0], "overrides": [],
                    "runs": {"sft": "sft", "standard": "standard", "grpo/seed0": "grpo/seed0"}}
        if step == "experiment_without_runs":
            del manifest["runs"]
        elif step == "experiment_bad_results":
            (exp / "grpo" / "seed0").mkdir(parents=True)
            (exp / "grpo" / "seed0" / "results.json").write_text('{"results": ["GRPO"]}')
        (exp / "experiment.json").write_text("[1, 2]" if step == "experiment_list" else json.dumps(manifest))
    else:
        raise KeyError(step)


def no_progress_bars(monkeypatch):
    """A terminal shows the progress bars on stderr beside the one error line; here stderr must hold
    only what the CLI says."""
    import tqdm.auto

    real = tqdm.auto.tqdm
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **k: real(*a, **{**k, "disable": True}))


def snapshot(folder: Path) -> dict:
    return {p: (p.is_dir(), None if p.is_dir() else p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_no_partial_output(name, files, tmp_path, capsys, monkeypatch, request):
    case = CASES[name]
    url = request.getfixturevalue("faulty").url if any("{url}" in a for a in case.argv) else ""
    fill = lambda s: s.format(d=tmp_path, inputs=files, url=url)   # noqa: E731
    argv = [fill(a) for a in case.argv]
    no_progress_bars(monkeypatch)
    if case.before:
        setup(case.before, monkeypatch, tmp_path, files, argv, request)
    before = snapshot(files)
    setup_made = snapshot(tmp_path)
    rc = MAINS[case.cli](argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc == 2, f"exit {rc}; stderr: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert "Traceback" not in err and fill(case.needle) in lines[0], lines[0]
    for path in case.outputs:
        assert not Path(fill(path)).exists(), f"partial output left: {fill(path)}"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")], "temp files left"
    # the inputs (and the file/dir used as a bad --out) are untouched, and so is all that the case's
    # setup made (an earlier run, the model inside it, a damaged resume state): nothing removed or changed
    assert snapshot(files) == before
    after = snapshot(tmp_path)
    assert {p: v for p, v in after.items() if p in setup_made} == setup_made, \
        sorted(str(p) for p in setup_made if after.get(p) != setup_made[p])[:5]


def test_uint8_labels_in_range_are_fine(files, tmp_path, capsys):
    """The uint8 column that used to crash the verifier works when its labels are grades."""
    table = pq.read_table(files / "responses_uint8.parquet").slice(0, 1)
    pq.write_table(table, tmp_path / "r.parquet")
    assert verify.main(["--responses", str(tmp_path / "r.parquet"), "--out", str(tmp_path / "o.parquet")]) == 0
    assert pq.read_table(tmp_path / "o.parquet").column("reward").to_pylist() == [1.0]


def test_synth_writes_all_splits_or_none(tmp_path, capsys, monkeypatch):
    """A failure while writing the last split leaves no split behind, not even the old ones
    replaced (validate first, write all three together last)."""
    out = tmp_path / "s"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"the previous train split")
    real = pq.write_table

    def fail_on_longtail(table, where, **kw):
        if table.column("query_id")[0].as_py().startswith("longtail"):
            raise OSError(28, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", fail_on_longtail)
    assert data.main(["synth", "--n", "20", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet"]
    assert (out / "train.parquet").read_bytes() == b"the previous train split"


def test_train_refuses_a_damaged_checkpoint_with_one_line(tmp_path):
    """--resume on a truncated latest.pt: one line, exit 2, and the file is left for inspection."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "latest.pt"
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    tiny = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
            "model.head_dim=16", "model.intermediate_size=64", "data.n_train=8", "data.n_eval=4"]
    res = subprocess.run([sys.executable, str(ROOT / "afrl_fast" / "train.py"), f"run.out_dir={run}", *tiny,
                          "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(errors) == 1 and str(ckpt) in errors[0] and "truncated" in errors[0], res.stderr[-3000:]
    assert ckpt.read_bytes() == b"PK\x03\x04 truncated"
