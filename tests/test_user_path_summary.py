"""scripts/user_path_summary.py on a hand-built output folder: the stage table, the models read from
each run's results.json, and the synthesized-trace student against its control, checked against a
plain computation of the paired difference and a resampling written here."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "user_path_summary.py"


def write_run(folder: Path, answers: dict, labels: dict):
    folder.mkdir(parents=True)
    rows = {split: {"acc5": float(np.mean([int(a) == y for a, y in zip(ans, labels[split])])), "pair_acc": 0.5,
                    "macro_f1": 0.1, "answers": ans} for split, ans in answers.items()}
    (folder / "results.json").write_text(json.dumps({"results": {"majority-class": {}, "SFT": rows}}))


def summarize(out: Path, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def path_folder(tmp_path):
    rng = np.random.default_rng(7)
    out = tmp_path / "path"
    (out / "labels").mkdir(parents=True)
    labels = {s: rng.integers(0, 5, size=200).tolist() for s in ("industry", "longtail")}
    for split, y in labels.items():
        pq.write_table(pa.table({"label": y}), out / "labels" / f"{split}.parquet")
    answers = {}
    for name, p_right in (("sft", 0.8), ("control_sft", 0.6)):
        answers[name] = {s: "".join(str(v if rng.random() < p_right else (v + 1) % 5) for v in y)
                         for s, y in labels.items()}
        write_run(out / name, answers[name], labels)
    (out / "stages.tsv").write_text("stage\tseconds\tfinished\nsft\t12\t2026-12-05T00:00:00Z\n")
    return out, labels, answers


def test_synthesized_minus_control_is_the_paired_difference(path_folder, tmp_path):
    out, labels, answers = path_folder
    proc = summarize(out, "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["sft"] and summary["stages"][0]["seconds"] == 12
    assert set(summary["models"]) == {"SFT on synthesized traces", "SFT on the generator's traces (control)"}
    for split, y in labels.items():
        right = {k: np.array([int(a) == v for a, v in zip(answers[k][split], y)], dtype=float) for k in answers}
        diff = right["sft"] - right["control_sft"]
        got = summary["paired_changes"]["synthesized-trace SFT minus its control"][split]
        assert got["diff"] == pytest.approx(diff.mean(), abs=1e-12)
        # an independent resampling of the pairs: its interval agrees with the script's to within noise
        boots = np.array([diff[np.random.default_rng(100 + i).integers(0, diff.size, diff.size)].mean()
                          for i in range(2000)])
        assert got["lo"] == pytest.approx(np.quantile(boots, 0.025), abs=0.02)
        assert got["hi"] == pytest.approx(np.quantile(boots, 0.975), abs=0.02)
        assert got["lo"] < got["diff"] < got["hi"]
    assert "minus its control" in (tmp_path / "s" / "summary.md").read_text()


def test_without_the_control_run_there_is_no_comparison(path_folder, tmp_path):
    out, _, _ = path_folder
    (out / "control_sft" / "results.json").unlink()
    proc = summarize(out, "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["paired_changes"] == {}
    assert "minus its control" not in (tmp_path / "s" / "summary.md").read_text()
    assert "Paired changes" not in (tmp_path / "s" / "summary.md").read_text()


def test_rl_is_compared_with_its_sft_start_from_its_last_row(path_folder, tmp_path):
    """The RL run's results.json holds its SFT row first and the RL row last: the contrast takes the
    last row (not the SFT one, which would give zero) and subtracts the path's SFT model."""
    out, labels, answers = path_folder
    rl = {s: answers["control_sft"][s] for s in labels}           # any answers other than the SFT model's
    sft_rows = json.loads((out / "sft" / "results.json").read_text())["results"]["SFT"]
    (out / "rl").mkdir()
    (out / "rl" / "results.json").write_text(json.dumps({"results": {
        "SFT": sft_rows, "Mode-Balanced RL": {s: {"acc5": 0.0, "answers": a} for s, a in rl.items()}}}))
    proc = summarize(out, "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "s" / "summary.json").read_text())["paired_changes"]["RL minus its SFT start"]
    for split, y in labels.items():
        right = {k: np.array([int(c) == v for c, v in zip(a, y)], dtype=float)
                 for k, a in (("rl", rl[split]), ("sft", answers["sft"][split]))}
        assert got[split]["diff"] == pytest.approx((right["rl"] - right["sft"]).mean(), abs=1e-12)
        assert got[split]["diff"] != 0


def test_not_a_path_folder_is_one_line(tmp_path):
    proc = summarize(tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "stages.tsv" in proc.stderr
