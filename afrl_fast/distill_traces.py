"""What the distillation student learns to write: the teacher's own traces (sampled, filtered like
trace synthesis), the train split's traces, or the teacher's grade token alone."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import dist as D
from .engines import EmbeddedEngine
from .errors import ConfigError
from .files import atomic_copy, atomic_write_bytes
from .observe import progress_bar
from .rollouts import STREAM_EVAL, generate_rollouts, prompt_seed
from .run_data import tokenize_targets
from .trace_selection import choose, rejection_reasons

TRACES_FILE = "teacher_traces.parquet"
SETTINGS_KEY = b"afrl_fast.trace_settings"    # parquet metadata: what produced the traces


def trace_settings(cfg, n_pairs: int) -> dict:
    """Everything the teacher's traces depend on. Greedy traces do not depend on the run's seed, so
    runs that differ only in seed or loss (a Table-6 experiment's students) can share one file."""
    d = cfg.distill
    settings = {"teacher.path": str(Path(cfg.teacher.path).resolve()), "data.dir": str(Path(cfg.data.dir).resolve()),
                "data.rulebook": cfg.data.rulebook, "data.instructions": cfg.data.instructions,
                "data.max_prompt_tokens": cfg.data.max_prompt_tokens, "distill.keep": d.keep,
                "distill.trace_samples": d.trace_samples, "distill.trace_temperature": d.trace_temperature,
                "distill.max_new_tokens": d.max_new_tokens, "train pairs": n_pairs}
    if d.trace_temperature > 0:
        settings["run.seed"] = cfg.run.seed
    return settings


def read_shared_traces(path: Path, settings: dict) -> pa.Table | None:
    """distill.traces_cache: the traces an earlier run wrote with the same settings, or None when
    there is no file yet. A file written under other settings is refused (ConfigError naming them)."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        written = json.loads((table.schema.metadata or {}).get(SETTINGS_KEY, b"{}"))
    except (pa.ArrowException, OSError, ValueError) as e:
        why = " ".join(str(e).split())[:200]
        raise ConfigError(f"distill.traces_cache={path}: not a readable traces file ({type(e).__name__}: {why}); "
                          "remove it and the next run writes it again") from None
    differ = sorted(k for k in settings.keys() | written.keys() if settings.get(k) != written.get(k))
    if differ:
        raise ConfigError(f"distill.traces_cache={path}: written under other settings ("
                          + ", ".join(f"{k}: {written.get(k)!r} there, {settings.get(k)!r} here" for k in differ)
                          + "); point it elsewhere or remove the file")
    return table


def teacher_traces(cfg, teacher_lm, tokenizer, rulebook, prompts, labels, info) -> pa.Table:
    """One trace per training pair written by the teacher (or none when no sample passes the filter):
    pair index, trace text, its token ids, and why a pair has none. Each rank writes its share."""
    d = cfg.distill
    engine = EmbeddedEngine(teacher_lm, tokenizer, device=info.device)
    local = list(range(info.rank, len(prompts), info.world))
    rows = []
    bar = progress_bar(total=len(local), desc="teacher traces", enabled=info.is_main, unit="pair")
    for start in range(0, len(local), 32):
        idx = local[start:start + 32]
        ro = generate_rollouts(engine, tokenizer, idx, [prompts[i] for i in idx], [labels[i] for i in idx],
                               group_size=d.trace_samples, temperature=d.trace_temperature, top_p=1.0,
                               max_new_tokens=d.max_new_tokens,
                               seeds=[prompt_seed(cfg.run.seed, STREAM_EVAL, 1, i) for i in idx])
        for g, i in enumerate(idx):
            span = ro.rows_of([g])
            texts = [ro.texts[j] for j in span]
            finish = ["stop" if ro.finished[j] else "length" for j in span]
            reasons = rejection_reasons(texts, finish, labels[i], rulebook)
            if d.keep == "valid":   # the label checks do not apply
                reasons = [None if r in ("rules_imply_other_grade", "final_not_label") else r for r in reasons]
            best = choose(texts, [k for k, r in enumerate(reasons) if r is None], {})
            rows.append({"pair": i, "trace": None if best is None else texts[best],
                         "reason": None if best is not None else reasons[0]})
        bar.update(len(idx))
    bar.close()
    rows = sorted((r for part in D.all_gather_objects(rows) for r in part), key=lambda r: r["pair"])
    return pa.Table.from_pylist(rows, schema=pa.schema([("pair", pa.int64()), ("trace", pa.string()),
                                                        ("reason", pa.string())]))


def data_examples(cfg, tables, tokenizer, prompts):
    """distill.traces=data: (prompt ids, trace ids + EOS) per training pair and its summary; the
    traces' lengths are checked here, before the run folder is made."""
    train = tables["train"]
    targets = tokenize_targets(tokenizer, train, "trace", cfg.data.max_response_tokens,
                               Path(cfg.data.dir) / "train.parquet")
    return list(zip(prompts, targets)), {"source": "data", "kept": len(targets), "pairs": train.num_rows}


def training_examples(cfg, tables, tokenizer, rulebook, prompts, teacher_lm, run_dir, info, from_data=None):
    """(prompt ids, target ids + EOS) per kept training pair, and a summary of what was kept
    (`from_data`: data_examples' answer, for distill.traces=data)."""
    d = cfg.distill
    train = tables["train"]
    if d.traces == "data":
        return from_data
    labels = train.column("label").to_pylist()
    if d.traces == "first_token":
        # the standard-scoring student: the teacher's answer token alone, distilled at that one position
        eos = tokenizer.eos_token_id
        examples = [(p, [tokenizer.encode(str(y), add_special_tokens=False)[0], eos]) for p, y in zip(prompts, labels)]
        return examples, {"source": "first_token", "kept": len(examples), "pairs": train.num_rows}
    path = run_dir / TRACES_FILE
    shared = Path(d.traces_cache) if d.traces_cache else None
    settings = trace_settings(cfg, train.num_rows)
    if path.is_file():          # a resumed run reuses the traces it already wrote
        table = pq.read_table(path)
    elif shared is not None and (table := read_shared_traces(shared, settings)) is not None:
        if info.is_main:        # the run folder keeps its own copy: it reads complete without the cache
            atomic_copy(shared, path)
        D.barrier()
    else:
        table = teacher_traces(cfg, teacher_lm, tokenizer, rulebook, prompts, labels, info)
        table = table.replace_schema_metadata({SETTINGS_KEY: json.dumps(settings).encode()})
        if info.is_main:
            atomic_write_bytes(path, lambda f: pq.write_table(table, f))
            if shared is not None:
                atomic_copy(path, shared)
        D.barrier()
    kept = [(i, t) for i, t in zip(table.column("pair").to_pylist(), table.column("trace").to_pylist()) if t]
    eos = tokenizer.eos_token_id
    examples = [(prompts[i], tokenizer.encode(t, add_special_tokens=False) + [eos]) for i, t in kept]
    reasons = {}
    for r in table.column("reason").to_pylist():
        if r:
            reasons[r] = reasons.get(r, 0) + 1
    per_grade = {str(g): {"pairs": labels.count(g), "kept": sum(1 for i, _ in kept if labels[i] == g)}
                 for g in range(5)}
    summary = {"source": "teacher", "kept": len(examples), "pairs": train.num_rows, "rejections": reasons,
               "per_grade": per_grade}
    if not examples:
        raise ConfigError(f"the teacher wrote no trace that passes distill.keep={d.keep} "
                          f"(rejections: {reasons}); check teacher.path, or use distill.traces=data")
    return examples, summary
