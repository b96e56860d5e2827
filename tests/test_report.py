"""afrl_fast.report: metrics.jsonl parsing and the PNG report, on a synthetic run."""
import json
import math

import matplotlib.image as mpimg
import pytest

from afrl_fast import report
from afrl_fast.report.__main__ import main
from afrl_fast.report import draw_report, load_metrics, stage_boundaries

ALL_PNGS = {"eval_over_training.png", "reward_entropy.png", "gates.png", "time_split.png"}


def _train_rows():
    """SFT for 10 steps, then three RL stages of 10 steps each, with every optional field."""
    rows = [{"step": s, "phase": "sft", "stage": "sft", "loss": 2.0 / (s + 1), "policy/entropy": 0.9 - 0.01 * s}
            for s in range(10)]
    for s in range(10, 40):
        stage = ["rl1", "rl2", "rl3"][(s - 10) // 10]
        rows.append({"step": s, "phase": "rl", "stage": stage, "reward/mean": 0.2 + 0.02 * (s - 10),
                     "reward/std": 0.3, "policy/entropy": 0.5 - 0.001 * s, "policy/kl": 0.001 * s,
                     "policy/clip_frac": 0.05, "gate/fmt": 0.95, "gate/cst": 0.9, "gate/logic": 0.8,
                     "time/rollout": 5.0, "time/verify": 0.5, "time/advantages": 0.1, "time/logprobs": 1.5,
                     "time/loss": 1.0, "time/optimizer": 0.3, "time/sync": 0.05,
                     "weight/grpo": 0.9, "weight/sft": 0.1})
    return rows


def _eval_rows():
    return [{"step": s, "split": split, "acc5": 0.5 + 0.005 * s, "pair_acc": 0.7 + 0.003 * s,
             "ndcg3": 0.8, "macro_f1": 0.4 + 0.004 * s, "phase": "rl" if s >= 10 else "sft"}
            for s in (0, 10, 20, 30, 39) for split in ("industry", "longtail")]


def _write(run_dir, rows, tail=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (run_dir / "metrics.jsonl").write_text(text, encoding="utf-8")
    return run_dir


@pytest.fixture
def full_run(tmp_path):
    # A killed run: the last line is cut off mid-object, without its newline.
    return _write(tmp_path / "run", _train_rows() + _eval_rows(), tail='{"step": 40, "stage": "rl')


def _assert_png(path, min_w=400, min_h=250):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h, (path.name, w, h)
    assert img.std() > 0.01, f"{path.name} looks blank"  # something was actually drawn


def test_load_metrics_splits_rows_and_skips_torn_tail(full_run):
    with pytest.warns(UserWarning, match=r"metrics.jsonl:51: skipping truncated"):
        train, evals = load_metrics(full_run / "metrics.jsonl")
    assert len(train) == 40 and len(evals) == 10
    assert all("split" in r for r in evals) and not any("split" in r for r in train)


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    run = _write(tmp_path / "run", _train_rows()[:3])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines.insert(1, '{"step": 1, "stage": sft}')  # line 2 is garbage, more lines follow
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2:"):
        load_metrics(run / "metrics.jsonl")


def test_object_without_step_is_an_error(tmp_path):
    run = _write(tmp_path / "run", [{"step": 0, "stage": "sft"}, [1, 2], {"step": 1}])
    with pytest.raises(ValueError, match=r":2:.*'step'"):
        load_metrics(run / "metrics.jsonl")


def test_null_values_become_nan(tmp_path):
    # RunLog writes non-finite floats as null; they must plot as gaps, not crash float().
    run = _write(tmp_path / "run", [{"step": 0, "stage": "rl1", "reward_mean": None, "kl": 0.1},
                                    {"step": 1, "stage": "rl1", "reward_mean": 0.5, "kl": None}])
    train, _ = load_metrics(run / "metrics.jsonl")
    steps, values = report._series(train, "kl")
    assert steps == [0, 1] and values[0] == 0.1 and math.isnan(values[1])


def test_stage_boundaries():
    assert stage_boundaries(_train_rows()) == [(10, "rl1"), (20, "rl2"), (30, "rl3")]
    assert stage_boundaries([{"step": 0}, {"step": 1, "stage": "rl1"}]) == []


def test_draw_report_writes_all_pngs(full_run):
    with pytest.warns(UserWarning):
        paths = draw_report(full_run)
    assert {p.name for p in paths} == ALL_PNGS
    for p in paths:
        assert p.parent == full_run / "plots"
        _assert_png(p)
    _assert_png(full_run / "plots" / "eval_over_training.png", min_w=1000)  # three subplots


def test_missing_fields_skip_figures(tmp_path, capsys):
    # SFT only plus evals without 5-ACC: no RL, gate or timing figure can be drawn.
    evals = [{k: v for k, v in r.items() if k != "acc5"} for r in _eval_rows()]
    run = _write(tmp_path / "run", _train_rows()[:10] + evals)
    paths = draw_report(run, tmp_path / "out")
    assert [p.name for p in paths] == ["eval_over_training.png"]
    _assert_png(paths[0])
    out = capsys.readouterr().out
    for name in ("reward_entropy.png", "gates.png", "time_split.png"):
        assert f"skipping {name}" in out
    assert not (tmp_path / "out" / "gates.png").exists()


def test_partial_optional_fields(tmp_path):
    # RL lines with only the required fields: reward figure yes, no std band, no gates/timing.
    rows = [{"step": s, "stage": "rl1", "reward/mean": 0.1 * s, "policy/entropy": 0.5, "policy/kl": 0.0,
             "policy/clip_frac": 0.1, "time/rollout": 2.0} for s in range(5)]
    paths = draw_report(_write(tmp_path / "run", rows))
    assert {p.name for p in paths} == {"reward_entropy.png", "time_split.png"}


def test_empty_file_draws_nothing(tmp_path):
    run = _write(tmp_path / "run", [])
    assert draw_report(run) == []


def test_cli(full_run, tmp_path, capsys):
    out = tmp_path / "pngs"
    with pytest.warns(UserWarning):
        assert main([str(full_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == ALL_PNGS
    assert str(out / "gates.png") in printed


def test_cli_reports_errors(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    run = _write(tmp_path / "run", [])
    (run / "metrics.jsonl").write_text('not json\n{"step": 0}\n')
    assert main([str(run)]) == 2
    assert "metrics.jsonl:1:" in capsys.readouterr().err


def test_stage_lines_are_drawn_with_labels():
    from matplotlib.figure import Figure
    ax = Figure().subplots()
    ax.plot([0, 40], [0, 1])
    report._mark_stages(ax, [(10, "rl1"), (20, "rl2")])
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert [ln.get_xdata()[0] for ln in dashed] == [10, 20]
    assert [t.get_text() for t in ax.texts] == ["rl1", "rl2"]
