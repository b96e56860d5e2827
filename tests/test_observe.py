"""What a run leaves to be watched: metrics.jsonl (flushed per line, non-finite values as null,
truncated to the checkpoint's step on resume), per-step rollout tables, the phase timer and the
progress bar's throttling off a terminal."""
import json
import math

import pyarrow.parquet as pq

from afrl_fast.observe import RunLog, Timer, progress_bar


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_every_record_is_on_disk_at_once_with_non_finite_values_as_null(tmp_path):
    log = RunLog(tmp_path, enabled=True, tensorboard=False)
    log.write({"step": 1, "loss": 0.5, "kl": float("nan"), "x": float("inf")})
    got = lines(tmp_path / "metrics.jsonl")              # readable before close: nothing buffered
    assert got == [{"step": 1, "loss": 0.5, "kl": None, "x": None}]
    log.close()


def test_truncate_after_drops_the_redone_steps_and_a_torn_line(tmp_path):
    log = RunLog(tmp_path, enabled=True, tensorboard=False)
    for s in range(1, 6):
        log.write({"step": s, "loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')                          # the kill tore the last line
    log.truncate_after(3)
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    log.write({"step": 4, "loss": 40.0})
    assert lines(tmp_path / "metrics.jsonl")[-1] == {"step": 4, "loss": 40.0}


def test_disabled_log_writes_nothing(tmp_path):
    log = RunLog(tmp_path / "rank1", enabled=False)
    log.write({"step": 1})
    log.write_rollouts(1, {"a": [1]})
    assert not (tmp_path / "rank1").exists()


def test_rollouts_are_one_parquet_per_step(tmp_path):
    log = RunLog(tmp_path, enabled=True, tensorboard=False)
    log.write_rollouts(7, {"response": ["2\n...", "x"], "reward": [1.0, -1.0]})
    t = pq.read_table(tmp_path / "rollouts" / "step_000007.parquet")
    assert t.column("reward").to_pylist() == [1.0, -1.0]


def test_tensorboard_groups_scalars_by_phase(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log = RunLog(tmp_path, enabled=True)
    log.write({"step": 3, "phase": "rl", "reward/mean": 0.25})
    log.write({"step": 3, "split": "industry", "acc5": 0.5})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"rl/reward/mean", "eval_industry/acc5"} <= tags
    assert acc.Scalars("rl/reward/mean")[0].value == 0.25 and acc.Scalars("rl/reward/mean")[0].step == 3


def test_timer_accumulates_per_phase_and_resets_on_pop():
    timer = Timer()
    for _ in range(3):
        with timer("a"):
            pass
    with timer("b"):
        sum(range(1000))
    out = timer.pop()
    assert set(out) == {"time/a", "time/b"} and all(v >= 0 and math.isfinite(v) for v in out.values())
    assert timer.pop() == {}


def test_progress_bar_redraws_rarely_when_stderr_is_not_a_terminal():
    bar = progress_bar(total=10, desc="x")                # pytest captures stderr: not a terminal
    assert bar.mininterval >= 30
    bar.close()
    assert progress_bar(total=1, desc="y", enabled=False).disable
