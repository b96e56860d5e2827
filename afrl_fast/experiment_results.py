"""What an experiment folder holds and what it came to: its manifest, each run's state and results,
and the summary over arms and seeds (mean ± std) that afrl_fast.report draws and writes.

Apart from the runner (afrl_fast.experiments) so that the report reads an experiment without importing
the code that launches one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .checkpoint import LATEST
from .files import atomic_copy, atomic_write_text
from .metrics import paired_bootstrap
from .observe import read_metrics_log

TRAIN = Path(__file__).resolve().parent / "train.py"
DISTILL = Path(__file__).resolve().parent / "distill.py"
ARMS = {
    "grpo": ["rl.mode=grpo"],
    "stepwise_grpo": ["rl.mode=stepwise_grpo"],
    "mode_balanced": ["rl.mode=mode_balanced"],
    "mode_balanced_random": ["rl.mode=mode_balanced", "rl.random_order=true"],
    "grpo_random": ["rl.mode=grpo", "rl.random_order=true"],
}
# the students of the distillation table (paper Table 6): all from one teacher, one architecture
STUDENTS = {
    "distilled": ["distill.traces=teacher"],          # the teacher's traces, and its logits at every position
    "first_token": ["distill.traces=first_token"],    # the teacher's first-token distribution only
    # sequence-level: the teacher's traces learnt by cross-entropy alone, its logits unused
    "sequence": ["distill.traces=teacher", "distill.logit_weight=0", "distill.hard_label_weight=1"],
    "labels": [],                                     # no teacher: SFT on the data's own traces (train.py)
}
MANIFEST = "experiment.json"
# the greedy teacher traces a distillation experiment's students share (their distill.traces_cache)
SHARED_TRACES = "teacher_traces.parquet"


# what an experiment folder holds besides its runs
EXPERIMENT_FILES = {"ablation": ("data", "sft", "standard", *ARMS),
                    "distillation": (*STUDENTS, "teacher_instructions.txt", "teacher_rulebook.yaml",
                                     SHARED_TRACES),
                    "teacher": ("data", "sft", "teacher.json")}


class ExperimentError(RuntimeError):
    pass


def run_state(run_dir: Path) -> str:
    """done | resumable | fresh (nothing usable there yet)."""
    if (run_dir / "results.json").is_file():
        return "done"
    if (run_dir / "checkpoints" / LATEST).is_file():
        return "resumable"
    return "fresh"


METRICS = ("acc5", "acc2", "pair_acc", "ndcg3", "macro_f1", "weighted_f1")
# Training statistics averaged over the last steps of each run (single steps of a few prompts are noisy)
FINAL_WINDOW = 5
TRAIN_STATS = ("reward/mean", "policy/entropy", "policy/entropy_critical", "policy/kl", "gate/fmt",
               "reward/wrong_grade", "acc/first_token")


def load_manifest(exp_dir: Path) -> dict:
    """The experiment's manifest, checked field by field (ExperimentError naming the file and field)."""
    path = Path(exp_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        why = " ".join(str(e).split())[:200]
        raise ExperimentError(f"{path}: not an experiment folder ({type(e).__name__}: {why})") from None

    def bad(what: str):
        return ExperimentError(f"{path}: {what}; not a manifest written by afrl_fast.experiments")
    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__}, not an object")
    for key, ok, want in (("kind", lambda v: v in EXPERIMENT_FILES, "ablation, distillation or teacher"),
                          ("config", lambda v: isinstance(v, str), "a string"),
                          ("arms", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                           "a list of names"),
                          ("seeds", lambda v: isinstance(v, list) and all(type(x) is int for x in v),
                           "a list of integers"),
                          ("overrides", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                           "a list of strings"),
                          ("runs", lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                           "an object of run name -> folder")):
        if key not in manifest:
            raise bad(f"no {key!r} field")
        if not ok(manifest[key]):
            raise bad(f"field {key!r} is not {want}")
    for name, rel in manifest["runs"].items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise bad(f"runs[{name!r}] = {rel!r} is not a folder inside the experiment")
    return manifest


def read_results(run_dir: Path) -> dict:
    """The run's results.json rows (model name -> split -> metrics), checked (ExperimentError naming
    the file and field)."""
    path = Path(run_dir) / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExperimentError(f"{path}: unreadable ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, dict):
        raise ExperimentError(f"{path}: no 'results' object (model -> split -> metrics); not written by "
                              "train.py or distill.py")
    for model, splits in rows.items():
        if not isinstance(splits, dict):
            raise ExperimentError(f"{path}: results[{model!r}] is not an object of split -> metrics")
        for split, metrics in splits.items():
            if not isinstance(metrics, dict):
                raise ExperimentError(f"{path}: results[{model!r}][{split!r}] is not an object of metrics")
            for m in METRICS:
                v = metrics.get(m)
                if m in metrics and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise ExperimentError(f"{path}: results[{model!r}][{split!r}][{m!r}] = {v!r} is not a number")
    return rows


def rl_row(run_dir: Path) -> dict:
    """The RL model's row of a finished arm run (split -> metrics)."""
    rows = {k: v for k, v in read_results(run_dir).items() if k not in ("majority-class", "SFT", "Standard scoring")}
    if len(rows) != 1:
        raise ExperimentError(f"{run_dir}/results.json: expected one RL model row, found {sorted(rows) or 'none'}")
    return next(iter(rows.values()))


def mean_std(values: list[float]) -> dict:
    x = np.asarray(values, dtype=np.float64)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max()), "n": int(len(x)), "values": [float(v) for v in x]}


def final_train_stats(run_dir: Path) -> dict:
    train, _ = read_metrics_log(run_dir / "metrics.jsonl", TRAIN_STATS)
    rl = [r for r in train if r.get("phase") == "rl"]
    tail = rl[-FINAL_WINDOW:]
    out = {}
    for key in TRAIN_STATS:
        vals = [r[key] for r in tail if r.get(key) is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    out["rl_steps"] = len(rl)
    return out


def reference_rows(kind: str, runs: dict) -> dict:
    """The rows an experiment's arms are read against. Ablation: the shared SFT model, the
    standard-scoring baseline and the majority class; distillation: the teacher (and the majority class)."""
    ref = {}
    if kind == "ablation":
        if "sft" in runs and run_state(runs["sft"]) == "done":
            rows = read_results(runs["sft"])
            ref.update({"majority class": rows.get("majority-class"), "SFT (AFRL)": rows.get("SFT")})
        if "standard" in runs and run_state(runs["standard"]) == "done":
            ref["Standard scoring"] = read_results(runs["standard"]).get("Standard scoring")
    else:
        for name, d in runs.items():
            if run_state(d) != "done":
                continue
            rows = read_results(d)
            if "teacher" in rows and "teacher" not in ref:
                ref["teacher"] = rows["teacher"]
            if "majority-class" in rows and "majority class" not in ref:
                ref["majority class"] = rows["majority-class"]
    return {k: v for k, v in ref.items() if v}


def arm_row(kind: str, arm: str, run_dir: Path) -> dict:
    """The compared model's row of a finished run: the RL model (ablation), the student (distillation)."""
    if kind == "ablation":
        return rl_row(run_dir)
    rows = read_results(run_dir)
    key = "SFT" if arm == "labels" else "student"
    if key not in rows:
        raise ExperimentError(f"{run_dir}/results.json: no {key!r} row")
    return rows[key]


def reference_answers(runs: dict) -> dict:
    """The shared SFT model's answered grade per evaluation pair ({split: digits}), if it finished."""
    if "sft" not in runs or run_state(runs["sft"]) != "done":
        return {}
    return {split: m["answers"] for split, m in (read_results(runs["sft"]).get("SFT") or {}).items()
            if isinstance(m, dict) and m.get("answers")}


def answers_right(path: Path, answers: list) -> np.ndarray | None:
    """[runs, pairs] 0/1 correctness of answered grades (one digit string per run, as results.json
    keeps them) against the labels of the split file `path`, or None when a run lacks them, their
    lengths differ or the file is missing."""
    if not answers or not all(answers) or len({len(a) for a in answers}) != 1 or not path.is_file():
        return None
    labels = np.asarray(pq.read_table(path, columns=["label"]).column("label").to_pylist())[:len(answers[0])]
    return np.stack([np.array([int(c) for c in a]) == labels for a in answers])


def split_file(exp_dir: Path, split: str) -> Path:
    """The labelled pairs of one split, as the experiment's shared data folder holds them."""
    return exp_dir / "data" / f"{split}.parquet"


def change_over_sft(exp_dir: Path, sft_answers: dict, finals: list[dict]) -> dict:
    """An arm's 5-ACC minus the shared SFT model's per split: the seeds' per-pair correctness
    averaged, then the pairs resampled (metrics.paired_bootstrap), so the interval holds both the
    evaluation set's and the seeds' spread."""
    out = {}
    for split, sft in sft_answers.items():
        right = answers_right(split_file(exp_dir, split), [sft, *(f.get(split, {}).get("answers") for f in finals)])
        if right is not None:
            out[split] = paired_bootstrap(right[0], right[1:])
    return out


# What the paper's ablations compare (Table 3, Figure 5): the full recipe against each part removed,
# and the curriculum against one shuffled pool.
CONTRASTS = (("mode_balanced", "grpo"), ("mode_balanced", "stepwise_grpo"), ("stepwise_grpo", "grpo"),
             ("mode_balanced", "mode_balanced_random"))


def arm_contrasts(exp_dir: Path, finals_by_arm: dict, entries: dict) -> list[dict]:
    """Arm a against arm b: 5-ACC per split with a paired bootstrap over the evaluation pairs (each
    arm's seeds averaged per pair first), Pair-ACC and the critical-token entropy as the difference
    of the seed means beside both seed stds (they are not per-pair quantities)."""
    out = []
    for a, b in CONTRASTS:
        if a not in finals_by_arm or b not in finals_by_arm:
            continue
        row = {"a": a, "b": b, "acc5": {}, "pair_acc": {}}
        for split in sorted(set(entries[a]["eval"]) & set(entries[b]["eval"])):
            labels = split_file(exp_dir, split)
            ra, rb = (answers_right(labels, [f.get(split, {}).get("answers") for f in finals_by_arm[x]]) for x in (a, b))
            if ra is not None and rb is not None and ra.shape[1] == rb.shape[1]:
                row["acc5"][split] = paired_bootstrap(rb.mean(axis=0), ra)
            pa_, pb_ = entries[a]["eval"][split]["pair_acc"], entries[b]["eval"][split]["pair_acc"]
            row["pair_acc"][split] = {"diff": pa_["mean"] - pb_["mean"], "std_a": pa_["std"], "std_b": pb_["std"]}
        ea, eb = (entries[x]["train"].get("policy/entropy_critical") for x in (a, b))
        if ea and eb:
            row["entropy_critical"] = {"a": ea["mean"], "b": eb["mean"], "diff": ea["mean"] - eb["mean"],
                                       "std_a": ea["std"], "std_b": eb["std"]}
        out.append(row)
    return out


def summarize(exp_dir: Path) -> dict:
    """Final metrics of every arm as mean ± std over its seeds (finished runs only), with the
    reference rows (see reference_rows)."""
    exp_dir = Path(exp_dir)
    manifest = load_manifest(exp_dir)
    kind = manifest.get("kind", "ablation")
    runs = {name: exp_dir / rel for name, rel in manifest["runs"].items()}
    reference = reference_rows(kind, runs)
    splits = sorted({s for v in reference.values() for s in v})
    arms, finals_by_arm = {}, {}
    for arm in manifest["arms"]:
        done = [(seed, runs[f"{arm}/seed{seed}"]) for seed in manifest["seeds"]
                if f"{arm}/seed{seed}" in runs and run_state(runs[f"{arm}/seed{seed}"]) == "done"]
        if not done:
            continue
        finals = [arm_row(kind, arm, d) for _, d in done]
        splits = sorted({s for f in finals for s in f} | set(splits))
        entry = {"seeds": [seed for seed, _ in done],
                 "eval": {split: {m: mean_std([f[split][m] for f in finals]) for m in METRICS}
                          for split in splits
                          if all(split in f and all(f[split].get(m) is not None for m in METRICS) for f in finals)},
                 "train": {}}
        if kind == "ablation":
            entry["vs_sft_acc5"] = change_over_sft(exp_dir, reference_answers(runs), finals)
            stats = [final_train_stats(d) for _, d in done]
            entry["train"] = {k: mean_std([st[k] for st in stats]) for k in (*TRAIN_STATS, "rl_steps")
                              if all(st[k] is not None for st in stats)}
        arms[arm] = entry
        finals_by_arm[arm] = finals
    if not arms:
        finished = sorted(name for name, d in runs.items() if run_state(d) == "done")
        raise ExperimentError(f"{exp_dir}: no finished run of any arm yet (a run is finished when its folder holds "
                              f"results.json; finished: {', '.join(finished) or 'none'}); nothing to compare")
    return {"experiment": str(exp_dir), "kind": kind, "config": manifest["config"], "arms_requested": manifest["arms"],
            "seeds_requested": manifest["seeds"], "final_window_steps": FINAL_WINDOW, "splits": splits,
            "reference": reference, "arms": arms,
            "contrasts": arm_contrasts(exp_dir, finals_by_arm, arms) if kind == "ablation" else []}


def summary_markdown(summary: dict) -> str:
    """The summary as Markdown tables: one per split (percentages, mean ± std over seeds), one for
    the training statistics."""
    names = {"acc5": "5-ACC", "acc2": "2-ACC", "pair_acc": "Pair-ACC", "ndcg3": "NDCG@3", "macro_f1": "Macro-F1",
             "weighted_f1": "W-F1"}
    out = []
    for split in summary["splits"]:
        out += [f"**{split}** (first-token metrics, %; arms: mean ± std over seeds, n = seeds)", "",
                "| model | n | " + " | ".join(names[m] for m in METRICS) + " |",
                "|---|---|" + "---|" * len(METRICS)]
        for name, rows in summary["reference"].items():
            if split in rows:
                out.append(f"| {name} | 1 | " + " | ".join(f"{100 * rows[split][m]:.2f}" for m in METRICS) + " |")
        for arm, a in summary["arms"].items():
            if split in a["eval"]:
                e = a["eval"][split]
                out.append(f"| {arm} | {len(a['seeds'])} | "
                           + " | ".join(f"{100 * e[m]['mean']:.2f} ± {100 * e[m]['std']:.2f}" for m in METRICS) + " |")
        out.append("")
    changes = [(arm, a["vs_sft_acc5"]) for arm, a in summary["arms"].items() if a.get("vs_sft_acc5")]
    if changes:
        shown = sorted({s for _, c in changes for s in c})
        out += ["**5-ACC change over the shared SFT model** (points; 95 % interval from resampling the "
                "evaluation pairs, the seeds' answers averaged per pair)", "",
                "| arm | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        for arm, c in changes:
            out.append(f"| {arm} | " + " | ".join(
                f"{100 * c[s]['diff']:+.2f} [{100 * c[s]['lo']:+.2f}, {100 * c[s]['hi']:+.2f}]" if s in c else "n/a"
                for s in shown) + " |")
        out.append("")
    out += contrasts_markdown(summary.get("contrasts") or [])
    keys = [k for k in (*TRAIN_STATS, "rl_steps") if any(k in a.get("train", {}) for a in summary["arms"].values())]
    if keys:
        out += [f"**training** (mean over the last {summary['final_window_steps']} RL steps of each run; "
                "mean ± std over seeds)", "", "| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for arm, a in summary["arms"].items():
            out.append(f"| {arm} | " + " | ".join(
                f"{a['train'][k]['mean']:.3f} ± {a['train'][k]['std']:.3f}" if k in a["train"] else "n/a"
                for k in keys) + " |")
        out.append("")
    return "\n".join(out)


def contrasts_markdown(contrasts: list[dict]) -> list[str]:
    if not contrasts:
        return []
    splits = sorted({s for c in contrasts for s in (*c["acc5"], *c["pair_acc"])})
    out = ["**Arm against arm** (a − b, points. 5-ACC: 95 % interval from resampling the evaluation pairs, each "
           "arm's seeds averaged per pair. Pair-ACC and the critical-token entropy (mean of the last RL steps): the "
           "difference of the seed means, then each arm's std over its seeds)", "",
           "| a − b | " + " | ".join(f"{s} 5-ACC | {s} Pair-ACC" for s in splits) + " | critical-token entropy |",
           "|---|" + "---|---|" * len(splits) + "---|"]
    for c in contrasts:
        cells = []
        for s in splits:
            d = c["acc5"].get(s)
            cells.append(f"{100 * d['diff']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]" if d else "n/a")
            p = c["pair_acc"].get(s)
            cells.append(f"{100 * p['diff']:+.2f} (± {100 * p['std_a']:.2f} / {100 * p['std_b']:.2f})" if p else "n/a")
        e = c.get("entropy_critical")
        cells.append(f"{e['a']:.3f} − {e['b']:.3f} = {e['diff']:+.3f} (± {e['std_a']:.3f} / {e['std_b']:.3f})"
                     if e else "n/a")
        out.append(f"| {c['a']} − {c['b']} | " + " | ".join(cells) + " |")
    return out + [""]


# what of a run folder the summary reads: small text files (no weights, no checkpoints, no rollouts)
RUN_FILES = ("results.json", "metrics.jsonl", "config.yaml")


def copy_small_files(exp_dir: Path, dest: Path, root: Path) -> list[Path]:
    """The experiment's manifest, its evaluation splits and each finished run's RUN_FILES copied into
    `dest` (atomically, file by file), so that the summary can be recomputed from `dest` alone and the
    files committed. Absolute paths inside them (the experiment folder, the checkout `root`) are
    written relative, so nothing names the machine they ran on."""
    exp_dir, dest = Path(exp_dir).resolve(), Path(dest)
    manifest = load_manifest(exp_dir)
    wanted = [exp_dir / MANIFEST, *sorted((exp_dir / "data").glob("*.parquet")),
              *[exp_dir / name for name in ("pilot_gate.json", "teacher.json") if (exp_dir / name).is_file()]]
    wanted = [f for f in wanted if f.name not in ("train.parquet", "rl_pool.parquet")]   # not read by the summary
    for rel in manifest["runs"].values():
        if run_state(exp_dir / rel) == "done":
            wanted += [exp_dir / rel / name for name in RUN_FILES if (exp_dir / rel / name).is_file()]
    written = []
    for src in wanted:
        target = dest / src.relative_to(exp_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix in (".json", ".jsonl", ".yaml"):
            text = src.read_text(encoding="utf-8")
            for prefix in (f"{exp_dir}/", f"{Path(root).resolve()}/"):
                text = text.replace(prefix, "")
            atomic_write_text(target, text)
        else:
            atomic_copy(src, target)
        written.append(target)
    return written
