"""Difficulty buckets and the three-stage curriculum (paper §3.6, §4.1, Tables 2 and 8).

Acc@8 of a prompt is how many of G = 8 samples of the SFT model answer its grade right in the first
token. Easy: ≥ 7 correct, Medium: 2–6, Hard: exactly 1; prompts nobody answers right are dropped
(no reliable reward signal). Each stage draws prompts from the buckets in its target composition
(Table 2), scaled to the data at hand, and carries its α_t / γ_t (Table 8), named grpo_weight / sft_weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import dist as D
from .files import atomic_write_bytes
from .observe import log, progress_bar
from .rollouts import STREAM_DIFFICULTY, generate_rollouts, prompt_seed
from .verify import verify_batch

BUCKETS = ("easy", "medium", "hard")


def difficulty_bucket(n_correct: int, easy_min: int = 7, medium_min: int = 2, drop_unsolved: bool = True) -> str:
    """'easy' | 'medium' | 'hard' | 'dropped' from the count of correct samples.
    drop_unsolved=False keeps never-solved prompts in Hard (smoke tests of an untrained model)."""
    if n_correct >= easy_min:
        return "easy"
    if n_correct >= medium_min:
        return "medium"
    if n_correct >= 1 or not drop_unsolved:
        return "hard"
    return "dropped"


@dataclass
class Stage:
    name: str
    prompts: list[int]        # indices into the RL prompt table
    grpo_weight: float        # α_t
    sft_weight: float         # γ_t
    composition: dict         # bucket -> count actually drawn


def stage_size(available: dict, fractions: dict, cap: int = 0) -> int:
    """Largest stage whose composition no bucket can't supply (every bucket drawn without repeats)."""
    sizes = [available[b] / f for b, f in fractions.items() if f > 0]
    n = int(min(sizes)) if sizes else 0
    return min(n, cap) if cap > 0 else n


def build_stages(buckets: dict, stage_cfgs, seed: int, random_order: bool = False) -> list[Stage]:
    """buckets: name -> list of prompt indices. Stages may reuse prompts (the paper's stages total
    more prompts than its pool), but inside a stage each prompt appears once."""
    rng = np.random.default_rng(seed)
    stages = []
    for i, sc in enumerate(stage_cfgs):
        want = {"easy": sc.easy, "medium": sc.medium, "hard": sc.hard}
        have = {b: len(buckets.get(b, [])) for b in BUCKETS}
        usable = {b: f for b, f in want.items() if f > 0 and have[b] > 0}
        if not usable:  # every wanted bucket is empty here: take what exists so the stage still trains
            usable = {b: 1.0 for b in BUCKETS if have[b] > 0}
        total = sum(usable.values())
        fractions = {b: f / total for b, f in usable.items()}
        n = stage_size(have, fractions, sc.size)
        counts = {b: int(round(n * f)) for b, f in fractions.items()}
        picked, drawn = [], {}
        for b, c in counts.items():
            c = min(c, have[b])
            picked += list(rng.choice(buckets[b], size=c, replace=False)) if c else []
            drawn[b] = c
        picked = [int(x) for x in rng.permutation(picked)] if picked else []
        stages.append(Stage(f"rl{i + 1}", picked, sc.grpo_weight, sc.sft_weight, drawn))
    if random_order:
        # the paper's ablation: same prompts and α/γ schedule, order shuffled across stages
        pool = [p for s in stages for p in s.prompts]
        pool = [int(x) for x in rng.permutation(pool)] if pool else []
        start = 0
        for s in stages:
            s.prompts, start = pool[start:start + len(s.prompts)], start + len(s.prompts)
    return stages


def stage_schedule(stages: list[Stage], batch_prompts: int, epochs: list[float]) -> list[tuple[int, int]]:
    """(stage index, batch index within the stage) for every RL step, in order."""
    plan = []
    for i, (s, ep) in enumerate(zip(stages, epochs)):
        n_steps = int(np.ceil(len(s.prompts) * ep / batch_prompts)) if s.prompts else 0
        plan += [(i, j) for j in range(n_steps)]
    return plan


def with_failed_prompts(stage: Stage, failed, seed: int) -> Stage:
    """The stage plus the prompts that failed in earlier stages (paper §3.6, Stage 3: "hard and
    previously failed samples"), each once, in a fixed shuffled order."""
    extra = sorted(set(failed) - set(stage.prompts))
    if not extra:
        return stage
    prompts = [int(x) for x in np.random.default_rng([seed, 3]).permutation(stage.prompts + extra)]
    composition = {**stage.composition, "failed": len(extra)}
    return Stage(stage.name, prompts, stage.grpo_weight, stage.sft_weight, composition)


def stage_batch(stage: Stage, batch_index: int, batch_prompts: int) -> list[int]:
    """The prompts of one step: consecutive slices of the stage, wrapping for extra epochs."""
    n = len(stage.prompts)
    start = batch_index * batch_prompts
    return [stage.prompts[(start + k) % n] for k in range(batch_prompts)]


# ----------------------------------------------------------------------------------------------
# Difficulty estimation: Acc@8 of the SFT model


def estimate_difficulty(engine, tokenizer, rulebook, prompt_ids, labels, n_prompts: int, cfg, run_seed: int,
                        info) -> np.ndarray:
    """[n_prompts, 2]: correct samples out of G per prompt, and valid-format samples (−1 when only the
    first token was sampled). Each rank samples its share of the prompts; every rank gets the table.

    difficulty.correct = first_token: the G samples stop after their first token — one prefill per
    prompt — since the AFRL answer is that token; the seeds are the full decode's, so the first tokens
    drawn are the ones a full decode would draw. verified_trace: G whole traces per prompt, correct
    when one earns the full reward under the paper's literal gate."""
    d = cfg.difficulty
    first_only = d.correct == "first_token"
    local = list(range(info.rank, n_prompts, info.world))
    bar = progress_bar(total=len(local), desc="difficulty", enabled=info.is_main, unit="prompt")
    rows = []
    for start in range(0, len(local), d.batch_prompts):
        idx = local[start:start + d.batch_prompts]
        ro = generate_rollouts(engine, tokenizer, idx, [prompt_ids[i] for i in idx], [labels[i] for i in idx],
                               group_size=d.group_size, temperature=d.temperature, top_p=1.0,
                               max_new_tokens=1 if first_only else cfg.rl.max_new_tokens,
                               seeds=[prompt_seed(run_seed, STREAM_DIFFICULTY, 0, i) for i in idx])
        res = verify_batch(ro.texts, ro.labels, rulebook)
        right = res.y_dec == ro.labels
        if not first_only:
            right &= res.fmt & res.cst & res.logic
        correct = ro.by_group(right).sum(1)
        fmt = np.full(len(idx), -1) if first_only else ro.by_group(res.fmt).sum(1)
        rows += [(i, int(c), int(f)) for i, c, f in zip(idx, correct, fmt)]
        bar.update(len(idx))
    bar.close()
    counts = np.zeros((n_prompts, 2), dtype=np.int64)
    for part in D.all_gather_objects(rows):
        for i, c, f in part:
            counts[i] = (c, f)
    return counts


def write_difficulty(path: Path, table, counts: np.ndarray, cfg) -> None:
    """difficulty.parquet: per prompt its Acc@8 count, valid-format count and bucket."""
    n = len(counts)
    d = cfg.difficulty
    buckets = [difficulty_bucket(int(c), d.easy_min, d.medium_min, d.drop_unsolved) for c in counts[:, 0]]
    out = pa.table({"prompt_index": np.arange(n), "query_id": table.column("query_id").slice(0, n),
                    "doc_id": table.column("doc_id").slice(0, n), "label": table.column("label").slice(0, n),
                    "n_correct": counts[:, 0],
                    "n_valid_format": pa.array([None if f < 0 else int(f) for f in counts[:, 1]], pa.int64()),
                    "group_size": np.full(n, d.group_size), "bucket": buckets})
    atomic_write_bytes(path, lambda f: pq.write_table(out, f))
    log.info("difficulty: %s", {b: buckets.count(b) for b in ("easy", "medium", "hard", "dropped")})


def load_buckets(path: Path) -> dict:
    """bucket name -> prompt indices, from difficulty.parquet."""
    t = pq.read_table(path)
    out = {"easy": [], "medium": [], "hard": []}
    for i, b in zip(t.column("prompt_index").to_pylist(), t.column("bucket").to_pylist()):
        if b in out:
            out[b].append(i)
    return out
