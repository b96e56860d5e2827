"""What a run leaves behind to be watched and audited: metrics.jsonl, TensorBoard, rollout logs.

Only rank 0 writes. metrics.jsonl gets one JSON object per line, flushed at once so a killed run
loses nothing it logged; on resume the lines past the checkpoint's step are dropped, so the file
reads as if the run had never stopped.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .files import atomic_write_text
from .errors import ConfigError

log = logging.getLogger("afrl_fast")


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "it"):
    """A tqdm bar; when stderr is not a terminal (a log file, CI) it redraws at most every 30 s
    instead of ten times a second, so logs get a few lines, not thousands."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
                mininterval=0.1 if interactive else 30.0, dynamic_ncols=interactive)


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


def check_run_log(path: Path) -> list[str]:
    """The lines of a run's metrics.jsonl before --resume rewrites it; ConfigError (one line naming
    the file and line) when it is not a file of UTF-8 text. RunLog writes ASCII JSON only, so such a
    byte is damage from outside, not a line torn by a kill (those are dropped on resume)."""
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():
        raise ConfigError(f"{path}: is not a file, so not the run log; move it away, then --resume again")
    lines = path.read_bytes().split(b"\n")
    for lineno, line in enumerate(lines, 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: line {lineno} is not UTF-8 text (byte {line[e.start]:#04x} at column "
                              f"{e.start + 1}); the run log was damaged: repair or delete that line, then --resume "
                              "again") from None
    return [line.decode("utf-8") for line in lines if line]


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
                except ImportError:  # tensorboard is a dependency, but a missing one must not stop training
                    log.warning("tensorboard is not installed: scalars go to metrics.jsonl only")

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (they belong to the part of a killed run that is redone)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in check_run_log(self.path):
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
        atomic_write_text(self.path, "".join(x + "\n" for x in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = f"eval_{record['split']}/" if "split" in record else f"{record.get('phase', 'train')}/"
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(prefix + k, v, record.get("step", 0))
            self.tb.flush()

    def write_rollouts(self, step: int, rows: dict) -> None:
        """One Parquet file per RL step: prompt id, response, reward and gates, for auditing."""
        if not self.enabled:
            return
        out = self.run_dir / "rollouts" / f"step_{step:06d}.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(rows), out)

    def close(self):
        if self.tb is not None:
            self.tb.close()


class Timer:
    """Accumulates wall time per phase: with timer("rollout"): ..."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out, self.totals = {f"time/{k}": v for k, v in self.totals.items()}, {}
        return out


# ---------------------------------------------------------------- reading it back

def read_metrics_log(path, numeric=()) -> tuple[list[dict], list[dict]]:
    """Read metrics.jsonl into (train_rows, eval_rows), in file order; `step` and the `numeric` fields
    must be numbers (null stands for a non-finite value).

    A line is an evaluation line iff it has `split`. A torn last line (the run was killed while
    writing) is skipped with a warning; a bad line anywhere else means the file was damaged or
    written by something else, so we stop with the file and line number instead of guessing.
    """
    path = Path(path)
    raw = path.read_bytes().split(b"\n")
    lines = []
    for i, line in enumerate(raw):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not UTF-8 text (byte {line[e.start]:#04x} at column {e.start + 1}); "
                             "the file was damaged or written by something else") from None
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    train, evals = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        row = _parse_line(path, i + 1, line, i == last, numeric)
        if row is not None:
            (evals if "split" in row else train).append(row)
    return train, evals


def _parse_line(path: Path, lineno: int, line: str, is_last: bool, numeric) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        if is_last:
            warnings.warn(f"{path}:{lineno}: skipping truncated last line ({err.msg})",
                          stacklevel=4)
            return None
        raise ValueError(f"{path}:{lineno}: invalid JSON line: {err.msg}") from err
    if not isinstance(row, dict) or "step" not in row:
        raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'step' field")
    for key, value in row.items():     # what is drawn must be a number (null: a non-finite value)
        if (key == "step" or key in numeric) and (isinstance(value, bool) or not isinstance(value, (int, float))) \
                and not (value is None and key != "step"):
            raise ValueError(f"{path}:{lineno}: field {key!r} is {value!r}, not a number")
    return row
