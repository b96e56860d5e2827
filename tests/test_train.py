"""The trainer end to end, through torchrun, on a tiny Qwen3 with the real Qwen3 tokenizer:

- one rank runs SFT → difficulty → RL → evaluation and leaves the run folder docs/guides/training.md describes;
- two ranks on gloo (FSDP2) reproduce the one-rank metrics;
- a run killed with SIGKILL mid-step and resumed logs the same metrics as the uninterrupted run;
- the exported policy loads in transformers and scores with afrl_fast.evaluate.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
    "model.head_dim=16", "model.intermediate_size=64",
    "data.n_train=32", "data.n_eval=12", "data.max_response_tokens=400",
    "sft.epochs=1", "sft.batch_size=4", "sft.lr=1e-2", "sft.warmup_steps=1",
    "difficulty.max_prompts=8", "difficulty.group_size=4", "difficulty.easy_min=4", "difficulty.drop_unsolved=false",
    "rl.group_size=4", "rl.batch_prompts=2", "rl.sft_batch=2", "rl.max_new_tokens=12", "rl.lr=1e-3",
    "rl.stages.0.size=2", "rl.stages.1.size=2", "rl.stages.2.size=2", "rl.max_steps=0",
    "eval.every=2", "eval.batch_size=8", "run.checkpoint_every=1",
]
VOLATILE = ("throughput/tokens_per_s", "optim/lr")  # wall-clock derived; everything else must match


def torchrun_script(script: Path, args, nproc: int = 1, wait=True, check=True, launcher=()):
    """`torchrun --standalone [launcher flags]` of any script; check: assert exit code 0 (else the
    caller reads it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           *launcher, str(script), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def torchrun(out_dir: Path, nproc: int = 1, extra=(), wait=True, check=True, launcher=()):
    """The trainer under torchrun on the TINY settings."""
    return torchrun_script(ROOT / "afrl_fast" / "train.py", [f"run.out_dir={out_dir}", *TINY, *extra], nproc,
                           wait, check, launcher)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def training_lines(run_dir: Path):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE and not k.startswith("time/")} for r in rows]


def assert_same_metrics(a, b, rtol=1e-4, atol=1e-5):
    assert len(a) == len(b), (len(a), len(b))
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), (ra.keys(), rb.keys())
        for k in ra:
            if isinstance(ra[k], float) or isinstance(rb[k], float):
                np.testing.assert_allclose(ra[k], rb[k], rtol=rtol, atol=atol, err_msg=f"step {ra.get('step')} {k}")
            else:
                assert ra[k] == rb[k], (k, ra, rb)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    proc = torchrun(out)
    return out, proc.stdout


def test_one_rank_runs_the_whole_pipeline(baseline):
    out, stdout = baseline
    for name in ("config.yaml", "metrics.jsonl", "difficulty.parquet", "results.json",
                 "checkpoints/latest.pt", "sft_model/config.json", "final_model/config.json"):
        assert (out / name).exists(), name
    rows = training_lines(out)
    stages = [r["stage"] for r in rows if "stage" in r]
    assert stages[0] == "sft" and "rl1" in stages, stages
    rl = [r for r in rows if r.get("stage", "").startswith("rl")]
    for key in ("reward/mean", "policy/entropy", "policy/kl", "policy/clip_frac", "gate/fmt", "response/len",
                "policy/dlogp_engine", "weight/grpo", "weight/sft"):
        assert all(key in r for r in rl), key
    # stage 3 takes the prompts stages 1-2 failed on (an untrained tiny model fails most): more steps
    # than its own 2 prompts make
    assert sum(1 for r in rl if r["stage"] == "rl3") > 1
    raw = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("rollout", "verify", "advantages", "logprobs", "loss", "optimizer", "sync"):
        assert all(f"time/{key}" in r for r in raw if r.get("phase") == "rl" and "split" not in r), key
    evals = [r for r in rows if "split" in r]
    assert {r["split"] for r in evals} == {"industry", "longtail"}
    assert all(k in evals[0] for k in ("acc5", "pair_acc", "ndcg3", "macro_f1"))
    assert "INDUSTRY" in stdout and "LONGTAIL" in stdout and "majority-class" in stdout
    assert list((out / "rollouts").glob("step_*.parquet"))
    assert list((out / "plots").glob("*.png"))
    # the engine's log-probs and the trainer's agree for the same tokens (same weights, same math)
    assert max(r["policy/dlogp_engine"] for r in rl) < 1e-3


@pytest.mark.slow
def test_two_ranks_on_gloo_match_one_rank(baseline, tmp_path):
    out1, _ = baseline
    torchrun(tmp_path, nproc=2)
    assert_same_metrics(training_lines(out1), training_lines(tmp_path))


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_matches_uninterrupted(baseline, tmp_path):
    out1, _ = baseline
    first_rl_step = min(r["step"] for r in training_lines(out1) if r.get("stage", "").startswith("rl"))
    proc = torchrun(tmp_path, wait=False)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(x).get("step", 0) > first_rl_step and "stage" in json.loads(x)
                                    for x in metrics.read_text().splitlines() if x.strip().endswith("}")):
            # torchrun starts its workers in sessions of their own: kill the worker (its pid is in the
            # run lock) as well as torchrun, as a crash of the machine would
            worker = int((tmp_path / ".run.lock").read_text())
            os.killpg(proc.pid, signal.SIGKILL)
            os.kill(worker, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, "the run ended before it could be killed mid-RL"
    while alive(worker):
        time.sleep(0.05)
    torchrun(tmp_path, extra=["--resume"])
    assert_same_metrics(training_lines(out1), training_lines(tmp_path))


def test_exported_policy_loads_in_transformers_and_evaluate(baseline, tmp_path):
    out, _ = baseline
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out / "final_model")
    assert model.config.vocab_size == 151936
    # no --instructions: the exported folder carries the prompt the run trained with (demo: short)
    assert (out / "final_model" / "afrl_prompt.json").is_file()
    res = subprocess.run([sys.executable, "-m", "afrl_fast.evaluate", "--model", str(out / "final_model"),
                          "--pairs", str(out / "data" / "industry.parquet"), "--out", str(tmp_path / "m.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((tmp_path / "m.json").read_text())
    final_eval = [r for r in training_lines(out) if r.get("split") == "industry"][-1]
    np.testing.assert_allclose(got["acc5"], final_eval["acc5"], atol=1e-9)
    np.testing.assert_allclose(got["pair_acc"], final_eval["pair_acc"], atol=1e-6)


def run_train_direct(args, tmp_path):
    return subprocess.run([sys.executable, str(ROOT / "afrl_fast" / "train.py"), f"run.out_dir={tmp_path}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bad_inputs_end_with_one_clear_line(tmp_path):
    res = run_train_direct(["rl.betaa=0"], tmp_path / "a")
    assert res.returncode == 2 and "unknown key 'rl.betaa'" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "data"
    bad.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq
    for split in ("train", "industry", "longtail"):
        pq.write_table(pa.table({"query_id": ["q"], "doc_id": ["d"], "query": ["x"], "document": ["y"],
                                 "label": pa.array([7], pa.int8()), "trace": ["7"]}), bad / f"{split}.parquet")
    res = run_train_direct([f"data.dir={bad}"], tmp_path / "b")
    assert res.returncode == 2 and "train.parquet: row 0, column 'label'" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_resume_refuses_a_different_config(baseline):
    out, _ = baseline
    res = subprocess.run([sys.executable, str(ROOT / "afrl_fast" / "train.py"), f"run.out_dir={out}", *TINY,
                          "rl.kl_coef=0.5", "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "cannot resume" in res.stderr and "rl.kl_coef" in res.stderr, res.stderr[-2000:]


def test_a_new_run_never_replaces_an_earlier_one_silently(baseline, tmp_path):
    out, _ = baseline
    before = {p: p.stat().st_mtime_ns for p in (out / "checkpoints" / "latest.pt", out / "metrics.jsonl")}
    res = run_train_direct(TINY, out)
    assert res.returncode == 2 and "already holds a run" in res.stderr and "--resume" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    # --overwrite validates every input before it deletes anything: a bad data folder leaves the run intact
    bad = tmp_path / "data"
    bad.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq
    for split in ("train", "industry", "longtail"):
        pq.write_table(pa.table({"query_id": ["q"], "doc_id": ["d"], "query": ["x"], "document": ["y"],
                                 "label": pa.array([9], pa.int8()), "trace": ["9"]}), bad / f"{split}.parquet")
    res = run_train_direct([*TINY, f"data.dir={bad}", "--overwrite"], out)
    assert res.returncode == 2 and "column 'label'" in res.stderr, res.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (out / "final_model" / "config.json").is_file()


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    res = run_train_direct([*TINY, "--resume"], tmp_path)
    assert res.returncode == 2 and "no checkpoint to resume" in res.stderr, res.stderr[-2000:]


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    import fcntl
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".run.lock", "a+") as held:       # what a running trainer holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        res = run_train_direct(TINY, tmp_path)
    assert res.returncode == 2 and "another run is using this folder (pid 4242)" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists()
    # the lock dies with its holder: a later run takes the folder without any clean-up
    res = run_train_direct([*TINY, "run.stop_after=sft", "sft.epochs=0.1"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]


def test_rl_can_start_from_another_runs_sft_model_and_difficulty(baseline, tmp_path):
    out, _ = baseline
    torchrun(tmp_path / "arm", extra=[f"run.init_from={out}", "rl.mode=grpo", "run.seed=1", "rl.max_steps=2"])
    rows = training_lines(tmp_path / "arm")
    assert [r["phase"] for r in rows if "split" not in r] == ["rl", "rl"]       # no SFT, no difficulty
    assert (tmp_path / "arm" / "difficulty.parquet").read_bytes() == (out / "difficulty.parquet").read_bytes()
    mine = json.loads((tmp_path / "arm" / "results.json").read_text())["results"]
    base = json.loads((out / "results.json").read_text())["results"]
    assert mine["SFT"] == base["SFT"]
    res = run_train_direct([*TINY, f"run.init_from={out}", "model.hidden_size=64"], tmp_path / "bad")
    assert res.returncode == 2 and "model config differs" in res.stderr, res.stderr[-2000:]


def test_rl_from_an_sft_folder_draws_what_rl_after_sft_in_one_process_does(baseline, tmp_path):
    """The baseline ran SFT and RL in one process (its RL steps are numbered after the SFT steps); an
    arm started from its folder with the same settings must sample and update alike: RL's draws are
    keyed on the RL phase's own step count, not the log's step number."""
    out, _ = baseline
    torchrun(tmp_path / "arm", extra=[f"run.init_from={out}", "rl.max_steps=2"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step"}           # noqa: E731
                          for r in rows if r.get("phase") == "rl" and "split" not in r]
    in_process, from_folder = strip(training_lines(out))[:2], strip(training_lines(tmp_path / "arm"))
    assert len(from_folder) == 2 and in_process[0]["stage"] == "rl1"
    assert_same_metrics(in_process, from_folder)


def test_a_non_finite_loss_stops_the_run_with_exit_3_and_keeps_the_last_checkpoint(baseline, tmp_path):
    """rl.lr=1e30 from the SFT model: RL step 1 is finite and checkpointed, its update blows the
    weights up, and step 2 is not finite: the run stops before stepping, with one line of its own
    (not glued to the progress bar) and exit 3 (torchrun itself exits 1 and reports the worker's
    code; the worker's own stderr is in its log). A non-finite loss with a finite gradient, which
    no real run produces on demand, is tests/test_optim.py's."""
    import torch

    out, _ = baseline
    run, logs = tmp_path / "run", tmp_path / "logs"
    proc = torchrun(run, extra=[f"run.init_from={out}", "rl.lr=1e30", "rl.max_steps=3"], check=False,
                    launcher=["--log-dir", str(logs), "--redirects", "2"])
    worker_err = next(logs.rglob("stderr.log")).read_text()
    errors = [line for line in worker_err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rl step 2: non-finite"), worker_err[-3000:]
    assert "Traceback" not in worker_err
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]
    # the last checkpoint is step 1's, and nothing past it was logged
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert (state["progress"]["phase"], state["progress"]["step"]) == ("rl", 1)
    assert [r["step"] for r in training_lines(run) if "split" not in r] == [1]
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.fixture(scope="module")
def grade_run(tmp_path_factory):
    """The standard-scoring baseline (sft.target=grade) through SFT, started in a run folder whose
    data manifest is garbage (not even UTF-8)."""
    out = tmp_path_factory.mktemp("grade")
    (out / "data").mkdir()
    (out / "data" / "manifest.json").write_bytes(b"\xff\x00{garbage")
    proc = torchrun(out, extra=["sft.target=grade", "run.stop_after=sft"])
    return out, proc


def test_standard_scoring_trains_on_the_grade_token_alone_and_names_its_row(grade_run):
    from afrl_fast.pairs import read_pairs
    from afrl_fast.format import label_token_ids, load_tokenizer
    from afrl_fast.run_data import tokenize_targets

    out, _ = grade_run
    tok = load_tokenizer()
    train = read_pairs(out / "data" / "train.parquet")
    rows = tokenize_targets(tok, train, "grade", 400, "train")
    # exactly the token first-token evaluation reads for the label, then EOS
    ids = label_token_ids(tok)
    assert rows == [[ids[y], tok.eos_token_id] for y in train.column("label").to_pylist()]
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"majority-class", "Standard scoring"}
    assert set(results["results"]["Standard scoring"]) == {"industry", "longtail"}
    assert "sft_traces" not in results                      # a grade-only model writes no trace
    evals = [r for r in training_lines(out) if "split" in r]
    assert {(r["phase"], r["split"]) for r in evals} == {("sft", "industry"), ("sft", "longtail")}


def test_a_corrupted_data_manifest_is_one_warning_and_the_data_is_synthesized_again(grade_run):
    out, proc = grade_run
    said = [line for line in proc.stderr.splitlines() if "manifest.json" in line]
    assert len(said) == 1 and "WARNING" in said[0] and "synthesizing the data again" in said[0], said
    assert "Traceback" not in proc.stderr
    manifest = json.loads((out / "data" / "manifest.json").read_text())     # rewritten from the config
    assert (manifest["n_train"], manifest["n_eval"]) == (32, 12)


def test_a_folder_in_place_of_the_data_manifest_is_one_line(tmp_path):
    (tmp_path / "data" / "manifest.json").mkdir(parents=True)
    res = run_train_direct(TINY, tmp_path)
    assert res.returncode == 2 and "manifest.json: is a directory" in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_rl_draws_from_the_labels_only_pool_when_the_config_asks_for_one(tmp_path):
    from afrl_fast.config import ConfigError, DEMO_CONFIG, load_config
    from afrl_fast.rulebook import load_rulebook
    from afrl_fast.run_data import prepare_data, rl_split, write_data

    rb = load_rulebook()
    run = tmp_path / "run"
    cfg = load_config(DEMO_CONFIG, ["data.n_train=40", "data.n_eval=10", "data.n_rl_pool=60"])
    tables, data_dir, pending = prepare_data(cfg, run, rb)
    assert rl_split(tables) == "rl_pool" and tables["rl_pool"].num_rows == 60
    assert "trace" not in tables["rl_pool"].column_names and not run.exists()   # nothing written yet
    write_data(data_dir, pending)
    tables, _, pending = prepare_data(cfg, run, rb)                    # read back: the same pool
    assert pending is None and rl_split(tables) == "rl_pool" and tables["rl_pool"].num_rows == 60
    # the same folder, a config without a pool: RL uses the SFT set, and writing drops the old pool
    cfg = load_config(DEMO_CONFIG, ["data.n_train=40", "data.n_eval=10"])
    tables, _, pending = prepare_data(cfg, run, rb)
    assert rl_split(tables) == "train"
    write_data(data_dir, pending)
    assert not (data_dir / "rl_pool.parquet").exists()
    # a user's data folder without the pool the config asks for: one clear error
    cfg = load_config(DEMO_CONFIG, [f"data.dir={data_dir}", "data.n_rl_pool=60"])
    with pytest.raises(ConfigError, match="rl_pool.parquet"):
        prepare_data(cfg, tmp_path / "run2", rb)


def test_the_rl_change_is_paired_over_the_same_pairs():
    import pyarrow as pa

    from afrl_fast.run_results import rl_change

    labels = [0, 1, 2, 3, 4] * 20
    sft = "".join(str(x) for x in labels[:60]) + "0" * 40               # 60 right, then 40 wrong (unless label 0)
    rl = "".join(str(x) for x in labels[:80]) + "0" * 20
    history = {"sft": {"industry": {"answers": sft}}, "rl": {"industry": {"answers": rl}}}
    tables = {"industry": pa.table({"label": labels})}
    got = rl_change(history, tables, ["industry", "longtail"])
    right = lambda a: np.mean([int(c) == y for c, y in zip(a, labels)])  # noqa: E731
    assert list(got) == ["industry"]                                      # no answers for longtail: left out
    assert got["industry"]["diff"] == pytest.approx(right(rl) - right(sft))
    assert got["industry"]["lo"] <= got["industry"]["diff"] <= got["industry"]["hi"]


def test_evaluation_splits_are_the_ones_the_config_names(tmp_path):
    """eval.splits=[head,tail] with data.dir: the trainer reads train.parquet, head.parquet and
    tail.parquet (no industry/longtail anywhere), and every result is keyed by those names."""
    from afrl_fast.config import ConfigError, DEMO_CONFIG, load_config
    from afrl_fast.data import synthesize
    from afrl_fast.pairs import write_table
    from afrl_fast.rulebook import load_rulebook
    from afrl_fast.run_data import prepare_data

    data = tmp_path / "mine"
    write_table(synthesize(16, seed=1, split="train"), data / "train.parquet")
    for name, split in (("head", "industry"), ("tail", "longtail")):      # evaluation needs no traces
        write_table(synthesize(6, seed=1, split=split).drop_columns(["trace"]), data / f"{name}.parquet")
    splits = [f"data.dir={data}", "eval.splits=[head,tail]"]
    tables, _, pending = prepare_data(load_config(DEMO_CONFIG, splits), tmp_path / "run0", load_rulebook())
    assert sorted(tables) == ["head", "tail", "train"] and pending is None
    res = run_train_direct([*TINY, *splits, "run.stop_after=sft", "sft.epochs=0.25"], tmp_path / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {m: sorted(r) for m, r in results["results"].items()} == {"majority-class": ["head", "tail"],
                                                                      "SFT": ["head", "tail"]}
    assert results["sft_traces"]["n_traces"] == 6                  # checked on the first named split, head
    evals = [r for r in training_lines(tmp_path / "run") if "split" in r]
    assert sorted(r["split"] for r in evals) == ["head", "tail"]
    assert "\nHEAD\n" in res.stdout and "\nTAIL\n" in res.stdout
    # a split the config names but the folder lacks: one error naming the file and the key
    (data / "tail.parquet").unlink()
    with pytest.raises(ConfigError) as err:
        prepare_data(load_config(DEMO_CONFIG, splits), tmp_path / "run0", load_rulebook())
    assert f"{data / 'tail.parquet'}: file not found; eval.splits=['head', 'tail']" in str(err.value)
