"""The experiment runner (afrl_fast.experiments) and its report, on a tiny model for a couple of steps:

- the ablation runs the shared SFT, the standard-scoring baseline and every arm × seed from that SFT
  model (same weights, same difficulty file), each an ordinary run folder;
- running the same command again does no work; a run whose results were lost resumes from its
  checkpoint; a run that died before a checkpoint starts again;
- the summary's means and stds equal an independent computation from the runs' results.json, and
  the report draws its figures;
- bad arguments are one line and exit 2, before any work.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY  # noqa: E402  (the tiny model and sizes every trainer test uses)

# the tiny trainer settings, minus what the experiment sets itself, plus a 2-step RL phase
OVERRIDES = [o for o in TINY if not o.startswith("eval.every")] + ["rl.max_steps=2", "eval.every=1",
                                                                    "difficulty.correct=verified_trace"]


def run_experiments(out: Path, *args, overrides=OVERRIDES):
    cmd = [sys.executable, "-m", "afrl_fast.experiments", "ablation", "--config", str(ROOT / "configs" / "demo.yaml"),
           "--out", str(out), *args, *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "TQDM_DISABLE": "1"})


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """The pilot first (the tiny SFT model fails the gate: exit 1, no arm runs), then two arms on seed 0
    past the gate, then a second seed for one arm: each command adds to the experiment."""
    out = tmp_path_factory.mktemp("ablation")
    proc = run_experiments(out, "--arms", "grpo,mode_balanced", "--seeds", "0", "--gate", "pilot")
    assert proc.returncode == 1 and "pilot gate FAILS" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "pilot_gate.json").is_file() and not (out / "grpo").exists()
    for arms, seeds in (("grpo,mode_balanced", "0"), ("grpo", "1")):
        proc = run_experiments(out, "--arms", arms, "--seeds", seeds, "--gate", "ignore")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_every_run_starts_from_the_shared_sft_model(experiment):
    manifest = json.loads((experiment / "experiment.json").read_text())
    assert sorted(manifest["runs"]) == ["grpo/seed0", "grpo/seed1", "mode_balanced/seed0", "sft", "standard"]
    assert manifest["arms"] == ["grpo", "mode_balanced"] and manifest["seeds"] == [0, 1]
    sft = experiment / "sft"
    assert (sft / "difficulty.parquet").is_file() and not (sft / "final_model").exists()   # stopped after difficulty
    standard = json.loads((experiment / "standard" / "results.json").read_text())["results"]
    assert "Standard scoring" in standard
    sft_weights = (sft / "sft_model" / "model.safetensors").read_bytes()
    for name in ("grpo/seed0", "grpo/seed1", "mode_balanced/seed0"):
        run = experiment / manifest["runs"][name]
        cfg = (run / "config.yaml").read_text()
        assert f"init_from: {sft}" in cfg and f"dir: {experiment / 'data'}" in cfg
        assert (run / "sft_model" / "model.safetensors").read_bytes() == sft_weights   # the same reference
        assert (run / "difficulty.parquet").read_bytes() == (sft / "difficulty.parquet").read_bytes()
        rl = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rl if "split" not in r] == [1, 2]
        weights = {r["weight/sft"] for r in rl if "weight/sft" in r}
        assert (weights == {0.0}) == name.startswith("grpo")      # plain GRPO has no SFT anchor
        results = json.loads((run / "results.json").read_text())["results"]
        assert ("GRPO" if name.startswith("grpo") else "Mode-Balanced RL") in results
    seeds = [json.loads((experiment / "grpo" / f"seed{s}" / "metrics.jsonl").read_text().splitlines()[0])
             for s in (0, 1)]
    assert seeds[0]["reward/mean"] != seeds[1]["reward/mean"] or seeds[0]["loss"] != seeds[1]["loss"]


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_resumes_the_rest(experiment):
    logs = {p: p.read_text() for p in experiment.rglob("train.log")}
    proc = run_experiments(experiment, "--arms", "grpo,mode_balanced", "--seeds", "0", "--gate", "ignore")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 finished already" in proc.stdout
    assert {p: p.read_text() for p in experiment.rglob("train.log")} == logs      # nothing ran again

    lost = experiment / "grpo" / "seed1"
    before = (lost / "results.json").read_text()
    (lost / "results.json").unlink()                  # finished, but its results are gone: resume
    proc = run_experiments(experiment, "--arms", "grpo", "--seeds", "1", "--gate", "ignore")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (lost / "train.log").read_text()
    assert "resumable:" in log.splitlines()[-1] or "resumable:" in log
    assert json.loads((lost / "results.json").read_text()) == json.loads(before)


@pytest.mark.slow
def test_summary_matches_an_independent_computation(experiment, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "afrl_fast.report", str(experiment), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("ablation_training.png", "ablation_eval.png", "summary.json", "summary.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    for arm, row, seeds in (("grpo", "GRPO", (0, 1)), ("mode_balanced", "Mode-Balanced RL", (0,))):
        finals = [json.loads((experiment / arm / f"seed{s}" / "results.json").read_text())["results"][row]
                  for s in seeds]
        assert summary["arms"][arm]["seeds"] == list(seeds)
        for split in ("industry", "longtail"):
            for metric in ("acc5", "pair_acc", "macro_f1"):
                x = np.array([f[split][metric] for f in finals])
                got = summary["arms"][arm]["eval"][split][metric]
                std = x.std(ddof=1) if len(x) > 1 else 0.0
                assert got["mean"] == pytest.approx(x.mean()) and got["std"] == pytest.approx(std)
    sft = json.loads((experiment / "sft" / "results.json").read_text())["results"]["SFT"]
    assert summary["reference"]["SFT (AFRL)"] == sft
    # the change over SFT: per pair, the seeds' mean correctness minus SFT's, averaged over pairs
    import pyarrow.parquet as pq
    for arm, row, seeds in (("grpo", "GRPO", (0, 1)), ("mode_balanced", "Mode-Balanced RL", (0,))):
        for split in ("industry", "longtail"):
            labels = pq.read_table(experiment / "data" / f"{split}.parquet").column("label").to_pylist()
            arm_right = np.mean([[int(c) == y for c, y in zip(json.loads(
                (experiment / arm / f"seed{s}" / "results.json").read_text())["results"][row][split]["answers"], labels)]
                for s in seeds], axis=0)
            sft_right = np.array([int(c) == y for c, y in zip(sft[split]["answers"], labels)])
            got = summary["arms"][arm]["vs_sft_acc5"][split]
            assert got["diff"] == pytest.approx(float(np.mean(arm_right - sft_right)))
            assert got["lo"] <= got["diff"] <= got["hi"]
    # arm against arm: mode_balanced − grpo, each arm's seeds averaged per pair first
    [contrast] = summary["contrasts"]
    assert (contrast["a"], contrast["b"]) == ("mode_balanced", "grpo")
    for split in ("industry", "longtail"):
        labels = pq.read_table(experiment / "data" / f"{split}.parquet").column("label").to_pylist()
        right = {arm: np.mean([[int(c) == y for c, y in zip(json.loads(
            (experiment / arm / f"seed{s}" / "results.json").read_text())["results"][row][split]["answers"], labels)]
            for s in seeds], axis=0) for arm, row, seeds in (("grpo", "GRPO", (0, 1)), ("mode_balanced",
                                                                                     "Mode-Balanced RL", (0,)))}
        got = contrast["acc5"][split]
        assert got["diff"] == pytest.approx(float(np.mean(right["mode_balanced"] - right["grpo"])))
        assert got["lo"] <= got["diff"] <= got["hi"]
        means = {arm: summary["arms"][arm]["eval"][split]["pair_acc"]["mean"] for arm in ("grpo", "mode_balanced")}
        assert contrast["pair_acc"][split]["diff"] == pytest.approx(means["mode_balanced"] - means["grpo"])
    md = (tmp_path / "summary.md").read_text()
    assert "| mode_balanced − grpo |" in md
    # --copy-runs: the small files alone recompute the same summary, and name no machine path
    copy = tmp_path / "copy"
    for args in ([str(experiment), "--out", str(copy), "--copy-runs"], [str(copy), "--out", str(tmp_path / "again")]):
        proc = subprocess.run([sys.executable, "-m", "afrl_fast.report", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "again" / "summary.md").read_text() == md
    assert not list(copy.rglob("*.pt")) and (copy / "grpo" / "seed1" / "metrics.jsonl").is_file()
    copied = [f for f in copy.rglob("*") if f.suffix in (".json", ".jsonl", ".yaml") and f.name != "summary.json"]
    assert copied and not [f for f in copied if str(experiment) in f.read_text()]
    assert "| grpo | 2 |" in md and "| SFT (AFRL) | 1 |" in md and "change over the shared SFT model" in md


@pytest.mark.parametrize("args, message", [
    (["--arms", "grpo,nope"], "unknown nope"),
    (["--seeds", "0,x"], "not a non-negative integer"),
    (["--arms", "grpo,grpo"], "names one twice"),
    (["rl.mode=grpo"], "sets rl.mode itself"),
    (["rl.no_such_key=1"], "unknown key"),
])
def test_bad_arguments_are_one_line_before_any_work(tmp_path, args, message):
    out = tmp_path / "exp"
    proc = run_experiments(out, *args, overrides=[])
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not (out / "sft").exists()


def test_pilot_gate_reads_the_shared_sft_run(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from afrl_fast.experiments import ExperimentError, gate_report, pilot_gate

    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "results.json").write_text(json.dumps({"results": {"SFT": {"industry": {"acc5": 0.9},
                                                                      "longtail": {"acc5": 0.6}}}}))
    buckets = ["easy"] * 6 + ["medium"] * 3 + ["hard"]
    valid = [8] * 9 + [4]                                   # 76 of 80 sampled traces well-formed
    pq.write_table(pa.table({"bucket": buckets, "n_valid_format": valid, "group_size": [8] * 10}),
                   sft / "difficulty.parquet")
    gate = pilot_gate(sft)
    got = {c["name"]: c["value"] for c in gate["checks"]}
    assert got["valid format at T=1"] == pytest.approx(76 / 80) and got["hard prompts"] == 1
    assert got["medium+hard share of the pool"] == pytest.approx(0.4) and gate["ok"]
    (sft / "results.json").write_text(json.dumps({"results": {"SFT": {"industry": {"acc5": 0.9},
                                                                      "longtail": {"acc5": 0.95}}}}))
    gate = pilot_gate(sft)
    assert not gate["ok"] and [c["name"] for c in gate["checks"] if not c["ok"]] == ["sft longtail 5-ACC"]
    assert "FAILS" in gate_report(gate)
    pq.write_table(pa.table({"bucket": buckets, "n_valid_format": pa.array([None] * 10, pa.int64()),
                             "group_size": [8] * 10}), sft / "difficulty.parquet")
    with pytest.raises(ExperimentError, match="verified_trace"):
        pilot_gate(sft)


def test_teacher_gate_reads_the_same_measurements(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from afrl_fast.experiments import TEACHER_GATE, pilot_gate

    sft = tmp_path / "sft"
    sft.mkdir()
    pq.write_table(pa.table({"bucket": ["easy"] * 10, "n_valid_format": [8] * 9 + [6], "group_size": [8] * 10}),
                   sft / "difficulty.parquet")
    for longtail, ok in ((0.95, True), (0.6, False)):
        (sft / "results.json").write_text(json.dumps({"results": {"SFT": {"industry": {"acc5": 0.9},
                                                                          "longtail": {"acc5": longtail}}}}))
        gate = pilot_gate(sft, TEACHER_GATE)
        assert gate["ok"] is ok and [c["name"] for c in gate["checks"]] == list(TEACHER_GATE)
        assert gate["checks"][2]["value"] == pytest.approx(78 / 80)


@pytest.mark.slow
def test_teacher_command_trains_measures_and_skips_a_finished_teacher(tmp_path):
    """`experiments teacher`: one SFT run with its trace validity measured; teacher.json points at the
    model; the tiny model fails the gate (exit 1) and a second call does no work."""
    out = tmp_path / "teacher"
    cmd = [sys.executable, "-m", "afrl_fast.experiments", "teacher", "--config", str(ROOT / "configs" / "demo.yaml"),
           "--out", str(out), *[o for o in OVERRIDES if not o.startswith("rl.")]]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 1 and "teacher gate FAILS" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    verdict = json.loads((out / "teacher.json").read_text())
    assert (out / verdict["model"] / "config.json").is_file() and (out / "sft" / "difficulty.parquet").is_file()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert "1 finished already" in again.stdout and again.returncode == 1
    copy = tmp_path / "copy"
    proc = subprocess.run([sys.executable, "-m", "afrl_fast.report", str(out), "--out", str(copy), "--copy-runs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((copy / "teacher.json").read_text()) == verdict
    assert (copy / "sft" / "results.json").is_file() and list(copy.glob("*.png"))


def finished_plan(out: Path, overrides=()):
    """An ablation plan whose runs all look finished: each folder holds the config.yaml its run would
    write and a results.json (no training)."""
    from afrl_fast.config import load_config, to_yaml
    from afrl_fast.experiments import ablation_plan

    config = ROOT / "configs" / "demo.yaml"
    plan = ablation_plan(config, out, ["grpo"], [0, 1], list(overrides))
    for run in plan:
        run["dir"].mkdir(parents=True, exist_ok=True)
        cfg = load_config(config, [*run["overrides"], f"run.out_dir={run['dir']}"])
        (run["dir"] / "config.yaml").write_text(to_yaml(cfg))
        (run["dir"] / "results.json").write_text("{}")
    return config, plan


def test_a_finished_run_of_another_recipe_is_not_taken_as_done(tmp_path, capsys):
    from afrl_fast.config import load_config, to_yaml
    from afrl_fast.experiment_results import ExperimentError
    from afrl_fast.experiments import execute

    config, plan = finished_plan(tmp_path / "exp")
    assert execute("ablation", config, tmp_path / "exp", ["grpo"], [0, 1], [], plan, 1) == 0
    assert "(4 finished already)" in capsys.readouterr().out       # sft, standard, two seeds

    # one arm's folder was copied in from an experiment with another learning rate
    other = load_config(config, [*plan[-1]["overrides"], "rl.lr=3e-4", f"run.out_dir={plan[-1]['dir']}"])
    (plan[-1]["dir"] / "config.yaml").write_text(to_yaml(other))
    with pytest.raises(ExperimentError, match=r"grpo/seed1 holds a finished run of another recipe: rl\.lr"):
        execute("ablation", config, tmp_path / "exp", ["grpo"], [0, 1], [], plan, 1)
    # where and how a run ran is not its recipe: another device or a resumed attempt still counts as done
    same = load_config(config, [*plan[-1]["overrides"], "run.device=cpu", "run.resume=true",
                                f"run.out_dir={tmp_path / 'elsewhere'}"])
    (plan[-1]["dir"] / "config.yaml").write_text(to_yaml(same))
    assert execute("ablation", config, tmp_path / "exp", ["grpo"], [0, 1], [], plan, 1) == 0

    # the shared SFT run stopped before RL: RL settings changed since do not make it another recipe,
    # its own settings do
    sft = plan[0]
    for change, done in (("rl.lr=3e-4", True), ("sft.lr=1e-2", False)):
        cfg = load_config(config, [*sft["overrides"], change, f"run.out_dir={sft['dir']}"])
        (sft["dir"] / "config.yaml").write_text(to_yaml(cfg))
        if done:
            assert execute("ablation", config, tmp_path / "exp", ["grpo"], [0, 1], [], plan, 1) == 0
        else:
            with pytest.raises(ExperimentError, match=r"sft holds a finished run of another recipe: sft\.lr"):
                execute("ablation", config, tmp_path / "exp", ["grpo"], [0, 1], [], plan, 1)
