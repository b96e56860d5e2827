"""The user's path end to end (scripts/user_path.sh, small size): a tiny teacher trained, labels of
another data seed, PIAR with the teacher as actor, synthesis against the served teacher, SFT, RL, a distilled student served and the
held-out pairs scored through /v1/score. Each stage's output is the next one's input as the script
hands it on; the served student must score what its model folder scores; a second call does no work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["teacher", "labels", "piar", "synthesize", "sft", "rl", "distil", "serve_and_score"]


def user_path(out: Path):
    # the script's stages call `python`: this interpreter's, as if its environment were activated
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "USER_PATH_SIZE": "small", "OUT": str(out), "TQDM_DISABLE": "1"}
    return subprocess.run(["bash", str(ROOT / "scripts" / "user_path.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3000)


@pytest.mark.slow
def test_small_user_path_runs_every_stage_and_resumes_as_done(tmp_path):
    out = tmp_path / "path"
    proc = user_path(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    stages = [line.split("\t")[0] for line in (out / "stages.tsv").read_text().splitlines()[1:]]
    assert stages == STAGES
    summary = json.loads((out / "summary.json").read_text())
    assert summary["synthesis"]["pairs"] == 48 and summary["synthesis"]["pairs_with_trace"] >= 1
    models = summary["models"]
    student, served = models["distilled student"], models["distilled student, served (/v1/score)"]
    for split in ("industry", "longtail"):
        for key in ("acc5", "pair_acc", "macro_f1"):
            assert served[split][key] == pytest.approx(student[split][key], abs=1e-6), (split, key)
    # PIAR ran its round and synthesis prompted with its best text
    assert len(summary["piar"]["rounds"]) == 1
    assert (out / "synth" / "instructions.txt").read_text() == (out / "piar" / "instructions.txt").read_text()
    # the judge was trained on what synthesis kept, under the prompt synthesis used
    sft_cfg = (out / "sft" / "config.yaml").read_text()
    assert f"dir: {out / 'synth'}" in sft_cfg and "instructions.txt" in sft_cfg
    again = user_path(out)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert again.stdout.count("finished before, skipped") == len(STAGES)


def test_without_the_project_environment_it_stops_in_one_line(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\nexit 1\n")      # a python that cannot import afrl_fast
    (fake / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ.get('PATH', '')}", "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "user_path.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "user_path: `python` cannot import afrl_fast; activate the project's environment first (. .venv/bin/activate)"]
    assert not (tmp_path / "out").exists()
