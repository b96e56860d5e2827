"""Teacher traces shared between distillation runs (distill.traces_cache) and the runner's use of it.

Greedy teacher traces depend on the teacher, the data and the trace settings, not on the run's seed or
loss, so a Table-6 experiment writes them once. These tests need no model: a run that reads the cache
never calls the teacher (it is None here, so generating would fail), and a cache written under other
settings is refused with the settings named.
"""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from afrl_fast.config import ConfigError, load_distill_config
from afrl_fast.dist import DistInfo
from afrl_fast.distill_traces import SETTINGS_KEY, TRACES_FILE, trace_settings, training_examples
from afrl_fast.experiment_results import SHARED_TRACES
from afrl_fast.experiments import distillation_plan
from afrl_fast.format import load_tokenizer
from afrl_fast.rulebook import load_rulebook

ROOT = Path(__file__).resolve().parents[1]
INFO = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("qwen3")


def cfg_for(tmp_path, *extra):
    return load_distill_config(None, [f"teacher.path={tmp_path / 'teacher'}", f"data.dir={tmp_path / 'data'}",
                                      f"distill.traces_cache={tmp_path / 'shared.parquet'}", *extra])


def write_cache(path, cfg, traces, settings=None):
    table = pa.Table.from_pylist([{"pair": i, "trace": t, "reason": None if t else "format"}
                                  for i, t in enumerate(traces)],
                                 schema=pa.schema([("pair", pa.int64()), ("trace", pa.string()), ("reason", pa.string())]))
    meta = settings if settings is not None else trace_settings(cfg, len(traces))
    pq.write_table(table.replace_schema_metadata({SETTINGS_KEY: json.dumps(meta).encode()}), path)


def examples_from(cfg, tokenizer, run_dir, labels):
    train = pa.table({"label": labels})
    prompts = [[100 + i] for i in range(len(labels))]
    return training_examples(cfg, {"train": train}, tokenizer, load_rulebook(), prompts, None, run_dir, INFO)


def test_a_run_reads_the_shared_traces_and_keeps_its_own_copy(tmp_path, tokenizer):
    cfg = cfg_for(tmp_path, "run.seed=3")             # greedy: another seed reads the same traces
    write_cache(tmp_path / "shared.parquet", cfg_for(tmp_path, "run.seed=0"), ["4\nfirst", None, "2\nthird"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    examples, kept = examples_from(cfg, tokenizer, run_dir, [4, 1, 2])
    eos = tokenizer.eos_token_id
    assert [e[0] for e in examples] == [[100], [102]]                       # pairs 0 and 2, in order
    assert examples[0][1] == tokenizer.encode("4\nfirst", add_special_tokens=False) + [eos]
    assert kept["kept"] == 2 and kept["rejections"] == {"format": 1}
    assert kept["per_grade"]["4"] == {"pairs": 1, "kept": 1} and kept["per_grade"]["1"] == {"pairs": 1, "kept": 0}
    assert (run_dir / TRACES_FILE).read_bytes() == (tmp_path / "shared.parquet").read_bytes()


@pytest.mark.parametrize("change, named", [
    (["distill.max_new_tokens=99"], "distill.max_new_tokens"),
    (["distill.keep=valid"], "distill.keep"),
    (["data.max_prompt_tokens=64"], "data.max_prompt_tokens"),
])
def test_a_cache_written_under_other_settings_is_refused_naming_them(tmp_path, tokenizer, change, named):
    write_cache(tmp_path / "shared.parquet", cfg_for(tmp_path), ["4\nfirst", "1\nsecond"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(ConfigError, match=rf"traces_cache=.*{named}"):
        examples_from(cfg_for(tmp_path, *change), tokenizer, run_dir, [4, 1])
    assert not (run_dir / TRACES_FILE).exists()


def test_a_cache_of_another_split_size_or_without_settings_is_refused(tmp_path, tokenizer):
    cfg = cfg_for(tmp_path)
    write_cache(tmp_path / "shared.parquet", cfg, ["4\nfirst", "1\nsecond"])
    with pytest.raises(ConfigError, match="train pairs"):
        examples_from(cfg, tokenizer, tmp_path, [4, 1, 0])
    write_cache(tmp_path / "shared.parquet", cfg, ["4\nfirst"], settings={})
    with pytest.raises(ConfigError, match="other settings"):
        examples_from(cfg, tokenizer, tmp_path, [4])


def test_a_damaged_cache_is_one_error_naming_it(tmp_path, tokenizer):
    (tmp_path / "shared.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(ConfigError, match=r"traces_cache=.*shared\.parquet: not a readable traces file"):
        examples_from(cfg_for(tmp_path), tokenizer, tmp_path, [4, 1])


def test_sampled_traces_depend_on_the_seed(tmp_path):
    greedy = [cfg_for(tmp_path, f"run.seed={s}") for s in (0, 1)]
    sampled = [cfg_for(tmp_path, f"run.seed={s}", "distill.trace_temperature=1") for s in (0, 1)]
    assert trace_settings(greedy[0], 5) == trace_settings(greedy[1], 5)
    assert trace_settings(sampled[0], 5) != trace_settings(sampled[1], 5)


def test_the_runner_shares_greedy_teacher_traces_only_between_students_that_write_them(tmp_path):
    config = ROOT / "configs" / "distill_demo.yaml"
    students = ["distilled", "sequence", "labels", "first_token"]
    shared = f"distill.traces_cache={tmp_path / SHARED_TRACES}"
    plan = {r["name"]: r["overrides"] for r in distillation_plan(config, tmp_path, students, [0, 1], [])}
    for name, overrides in plan.items():
        assert (shared in overrides) == (name.split("/")[0] in ("distilled", "sequence")), name
    sampled = distillation_plan(config, tmp_path, students, [0, 1], ["distill.trace_temperature=1"])
    assert not any(o.startswith("distill.traces_cache") for r in sampled for o in r["overrides"])
