"""The distillation job (afrl_fast/distill.py) through torchrun, with a real teacher: the session's
tiny judge that writes one pair's trace by heart (tests/serving.py), so its traces pass the filter.

- sequence level: the teacher writes a trace per training pair; only the memorized pair's passes the
  consistency filter against its label, the rest are counted by reason; the student trains on it;
- the run folder holds what docs/guides/distillation.md describes, the student model carries the teacher's prompt
  and loads in transformers, results.json scores student and teacher on the eval splits with the
  first-token scorer (checked against afrl_fast.evaluate run on the exported student);
- a run killed with SIGKILL mid-run and resumed ends with the same student and log as an
  uninterrupted one;
- bad input: a missing teacher folder, a student of another vocabulary — one line, exit 2.
"""
import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train import ROOT, torchrun_script  # noqa: E402

from afrl_fast.data import synthesize  # noqa: E402
from afrl_fast.pairs import write_table  # noqa: E402

DISTILL = ROOT / "afrl_fast" / "distill.py"
STUDENT = ["student.hidden_size=32", "student.num_layers=1", "student.num_heads=2", "student.num_kv_heads=1",
           "student.head_dim=16", "student.intermediate_size=64"]
QUICK = ["distill.epochs=1", "distill.batch_size=2", "distill.lr=1e-2", "distill.warmup_steps=1",
         "distill.max_new_tokens=400", "distill.first_token_weight=4", "eval.batch_size=8", "run.checkpoint_every=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, memorized_pair):
    """Splits whose training pairs are the memorized one (twice) and three the teacher has never seen."""
    out = tmp_path_factory.mktemp("distill_data")
    others = [{**r, "query_id": f"other-{i}", "doc_id": f"other-{i}-d"}
              for i, r in enumerate(synthesize(3, seed=5, split="train").to_pylist())]
    train = pa.Table.from_pylist([memorized_pair, *others, memorized_pair | {"doc_id": "again"}])
    write_table(train, out / "train.parquet")
    write_table(synthesize(8, seed=6, split="industry"), out / "industry.parquet")
    write_table(synthesize(8, seed=7, split="longtail"), out / "longtail.parquet")
    return out


def distill(out, teacher, data_dir, *extra, check=True):
    return torchrun_script(DISTILL, [f"run.out_dir={out}", f"teacher.path={teacher}", f"data.dir={data_dir}",
                                     *STUDENT, *QUICK, *extra], check=check)


@pytest.fixture(scope="module")
def run(tmp_path_factory, memorizing_judge, data_dir):
    out = tmp_path_factory.mktemp("distill_run")
    distill(out, memorizing_judge, data_dir)
    return out


@pytest.mark.slow
def test_the_teacher_writes_the_traces_and_the_filter_keeps_the_right_ones(run, memorized_pair):
    import pyarrow.parquet as pq

    traces = pq.read_table(run / "teacher_traces.parquet").to_pylist()
    assert [t["pair"] for t in traces] == [0, 1, 2, 3, 4]
    kept = [t for t in traces if t["trace"] is not None]
    assert {t["pair"] for t in kept} >= {0, 4}                       # the memorized pair, both times
    assert all(t["trace"] == memorized_pair["trace"] for t in kept if t["pair"] in (0, 4))
    assert all(t["reason"] for t in traces if t["trace"] is None)   # every dropped pair says why
    results = json.loads((run / "results.json").read_text())
    assert results["traces"]["kept"] == len(kept) and results["traces"]["pairs"] == 5


@pytest.mark.slow
def test_run_folder_student_model_and_its_scores(run, memorizing_judge, data_dir, tmp_path):
    import subprocess

    for name in ("config.yaml", "metrics.jsonl", "checkpoints/latest.pt", "student_model/config.json",
                 "student_model/afrl_prompt.json", "results.json"):
        assert (run / name).exists(), name
    assert (run / "student_model" / "afrl_prompt.json").read_text() == \
        (memorizing_judge / "afrl_prompt.json").read_text()               # prompted as the teacher was
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and rows
    assert all(r["distill/divergence"] >= 0 for r in rows)                # a KL is never negative
    from transformers import AutoModelForCausalLM
    student = AutoModelForCausalLM.from_pretrained(run / "student_model")
    assert student.config.hidden_size == 32
    results = json.loads((run / "results.json").read_text())["results"]
    assert set(results) == {"teacher", "student"}
    proc = subprocess.run([sys.executable, "-m", "afrl_fast.evaluate", "--model", str(run / "student_model"),
                           "--pairs", str(data_dir / "industry.parquet"), "--out", str(tmp_path / "m.json"),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    offline = json.loads((tmp_path / "m.json").read_text())
    for key in ("acc5", "pair_acc", "macro_f1"):
        assert results["student"]["industry"][key] == pytest.approx(offline[key], abs=1e-6)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_ends_with_the_same_student(memorizing_judge, data_dir, tmp_path):
    import os
    import signal
    import time

    longer = ["distill.epochs=4"]
    whole = tmp_path / "whole"
    distill(whole, memorizing_judge, data_dir, *longer)
    out = tmp_path / "killed"
    proc = torchrun_script(DISTILL, [f"run.out_dir={out}", f"teacher.path={memorizing_judge}", f"data.dir={data_dir}",
                                     *STUDENT, *QUICK, *longer], wait=False)
    metrics, killed, deadline = out / "metrics.jsonl", False, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if sum(1 for x in lines if x.strip().endswith("}")) >= 2:
            worker = int((out / ".run.lock").read_text())   # torchrun's worker runs in its own session
            os.killpg(proc.pid, signal.SIGKILL)
            os.kill(worker, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, "the run ended before it could be killed"
    assert not (out / "results.json").exists()
    time.sleep(0.5)
    distill(out, memorizing_judge, data_dir, *longer, "--resume")
    a = torch.load(whole / "checkpoints" / "latest.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("throughput/tokens_per_s",)}
    rows = lambda d: [strip(json.loads(x)) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(whole) == rows(out)


@pytest.mark.parametrize("case", ["missing_teacher", "other_vocabulary"])
def test_bad_teacher_or_student_is_one_line(case, memorizing_judge, data_dir, tmp_path):
    import subprocess

    def run_plain(*extra):   # one process without torchrun: its stderr is the job's own
        return subprocess.run([sys.executable, str(DISTILL), f"run.out_dir={tmp_path / 'r'}", f"data.dir={data_dir}",
                               *STUDENT, *QUICK, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if case == "missing_teacher":
        proc = run_plain(f"teacher.path={tmp_path / 'nowhere'}")
        expected = "model folder not found"
    else:
        import transformers
        other = tmp_path / "student"
        transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16)).save_pretrained(other)
        proc = run_plain(f"teacher.path={memorizing_judge}", f"student.path={other}")
        expected = "vocabulary"
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()
