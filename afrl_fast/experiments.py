"""Experiments: one recipe trained several ways over several seeds, from one starting point.

The paper's ablations (Table 3, Figures 3-5) and its distillation table (Table 6) at small scale:

    python -m afrl_fast.experiments ablation --config configs/ablation_cpu.yaml \
        --arms grpo,stepwise_grpo,mode_balanced,mode_balanced_random --seeds 0,1,2 --out runs/ablation
    python -m afrl_fast.experiments distillation --config configs/distill_demo.yaml \
        --students distilled,labels,first_token --seeds 0,1,2 --out runs/distillation
    python -m afrl_fast.report runs/ablation --out results/ablation      # figures + summary table

Every piece is an ordinary training run (`torchrun afrl_fast/train.py` or `afrl_fast/distill.py`,
resumable) in its own folder. The ablation:

    OUT/data/               the synthetic splits, written once; every run reads them (data.dir)
    OUT/sft/                SFT + Acc@8 difficulty (run.stop_after=difficulty): the shared starting point
    OUT/standard/           the standard-scoring baseline: SFT on the grade token alone (sft.target=grade)
    OUT/<arm>/seed<k>/      RL from OUT/sft (run.init_from: its SFT weights, reference and difficulty
                            file) with the arm's settings and run.seed=k

The arms differ only in what the paper varies (no per-arm tuning):
    grpo                  plain GRPO: no stepwise token weights, no SFT anchor (γ_t = 0)
    stepwise_grpo         stepwise token weights, no SFT anchor
    mode_balanced         stepwise weights + the SFT anchor, α_t/γ_t per curriculum stage (Table 8)
    mode_balanced_random  mode_balanced with the stages' prompts in one shuffled order (Figure 5)
    grpo_random           grpo in shuffled order

The distillation: one teacher (teacher.path) and one student architecture (student.*), per seed
    OUT/distilled/seed<k>/     distill.py: the teacher's traces and its logits at every position
    OUT/first_token/seed<k>/   distill.py: the teacher's first-token distribution only
    OUT/labels/seed<k>/        train.py SFT of the same student on the data's own traces, with the
                               distillation's optimisation settings and the teacher's prompt

--out is checked before any work: a file, an unwritable place, a run folder (train.py or distill.py
output) or a folder holding anything else than an experiment are refused with one line.
OUT/experiment.json records what was asked for and where each run lives (the report reads it). A
finished run (its results.json) is skipped, an interrupted one with a checkpoint continues with
--resume, one that died before its first checkpoint starts again: re-running the command after a
crash, or with more seeds, only does the work that is missing. Each run's output goes to its
folder's train.log; the console shows one progress bar over the runs. On N devices,
`--nproc-per-node N` launches each run with that many ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .checkpoint import LATEST, atomic_write_text, check_output_path
from .config import DEMO_CONFIG, ConfigError, load_config, load_distill_config

ROOT = Path(__file__).resolve().parent.parent
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
    "labels": [],                                     # no teacher: SFT on the data's own traces (train.py)
}
MANIFEST = "experiment.json"


class ExperimentError(RuntimeError):
    pass


def parse_list(text: str, what: str, allowed=None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ConfigError(f"--{what}: give at least one, comma-separated")
    if len(set(items)) != len(items):
        raise ConfigError(f"--{what}: {text!r} names one twice")
    if allowed is not None:
        unknown = [x for x in items if x not in allowed]
        if unknown:
            raise ConfigError(f"--{what}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return items


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for item in parse_list(text, "seeds"):
        if not item.isdigit():
            raise ConfigError(f"--seeds: {item!r} is not a non-negative integer")
        seeds.append(int(item))
    return seeds


# what an experiment folder holds besides its runs
EXPERIMENT_FILES = {"ablation": ("data", "sft", "standard", *ARMS),
                    "distillation": (*STUDENTS, "teacher_instructions.txt", "teacher_rulebook.yaml")}
# what marks a run folder of train.py / distill.py
RUN_MARKS = ("config.yaml", "checkpoints", "metrics.jsonl", "results.json", ".run.lock")


def check_experiment_out(out: Path, kind: str) -> None:
    """--out can hold this experiment: a folder to be made, an empty one, or an experiment folder
    (its manifest readable; another recipe is refused by merge_manifest). Creates nothing."""
    check_output_path(out, ConfigError, kind="dir")
    if not out.exists() or (out / MANIFEST).is_file():
        if (out / MANIFEST).is_file():
            load_manifest(out)
        return
    marks = [m for m in RUN_MARKS if (out / m).exists()]
    if marks:
        raise ConfigError(f"--out {out} is a run folder (it holds {', '.join(marks)}), not an experiment folder; "
                          "give an empty or new folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPERIMENT_FILES[kind])
    if foreign:
        raise ConfigError(f"--out {out} holds {', '.join(foreign[:4])} and no {MANIFEST}: not an experiment "
                          "folder; give an empty or new folder")


# ----------------------------------------------------------------------------- the plans

def ablation_plan(config: Path, out: Path, arms: list[str], seeds: list[int], overrides: list[str]) -> list[dict]:
    """Every run of the ablation, in the order they must run: the shared SFT first."""
    data = [f"data.dir={out / 'data'}"]
    sft = out / "sft"
    base = {"script": TRAIN, "config": config}
    plan = [{**base, "name": "sft", "dir": sft, "overrides": [*data, *overrides, "run.stop_after=difficulty"]},
            {**base, "name": "standard", "dir": out / "standard",
             "overrides": [*data, *overrides, "sft.target=grade", "run.stop_after=sft"]}]
    for arm in arms:
        for seed in seeds:
            plan.append({**base, "name": f"{arm}/seed{seed}", "dir": out / arm / f"seed{seed}",
                         "overrides": [*data, *overrides, *ARMS[arm], f"run.seed={seed}", f"run.init_from={sft}"]})
    return plan


def labels_student_overrides(cfg, out: Path) -> list[str]:
    """train.py settings that train the distillation student's architecture on the data's own traces
    with the distillation's optimisation settings and the teacher's prompt (the "student trained on
    the labels" row): only where the two runs differ is the supervision."""
    from .format import resolve_prompt_settings

    prompt = resolve_prompt_settings(cfg.teacher.path, cfg.data.rulebook, cfg.data.instructions)
    instructions = out / "teacher_instructions.txt"
    if not instructions.is_file():
        atomic_write_text(instructions, prompt.instructions)
    rulebook = out / "teacher_rulebook.yaml"
    if not rulebook.is_file():
        import yaml
        atomic_write_text(rulebook, yaml.safe_dump(prompt.rulebook.to_dict(), sort_keys=False, allow_unicode=True))
    s, d = cfg.student, cfg.distill
    model = [f"model.{k}={getattr(s, k)}" for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                     "head_dim", "intermediate_size", "dtype")]
    sft = [f"sft.{k}={getattr(d, k)}" for k in ("epochs", "batch_size", "lr", "warmup_steps", "weight_decay",
                                                 "grad_clip", "micro_batch_size")]
    return [*model, *sft, f"data.dir={cfg.data.dir}", f"data.instructions={instructions}", f"data.rulebook={rulebook}",
            f"data.max_prompt_tokens={cfg.data.max_prompt_tokens}",
            f"data.max_response_tokens={cfg.data.max_response_tokens}", f"eval.max_rows={cfg.eval.max_rows}",
            f"run.loss_backend={cfg.run.loss_backend}", "run.stop_after=sft"]


def distillation_plan(config: Path, out: Path, students: list[str], seeds: list[int], overrides: list[str]) -> list[dict]:
    """Every student of the Table-6 analogue × seed, each from the same teacher and data."""
    plan = []
    for student in students:
        for seed in seeds:
            run = {"name": f"{student}/seed{seed}", "dir": out / student / f"seed{seed}"}
            if student == "labels":
                cfg = load_distill_config(config, overrides)
                run.update(script=TRAIN, config=DEMO_CONFIG,
                           overrides=[*labels_student_overrides(cfg, out), f"run.device={cfg.run.device}",
                                      f"run.seed={seed}"])
            else:
                run.update(script=DISTILL, config=config, overrides=[*overrides, *STUDENTS[student], f"run.seed={seed}"])
            plan.append(run)
    return plan


def run_state(run_dir: Path) -> str:
    """done | resumable | fresh (nothing usable there yet)."""
    if (run_dir / "results.json").is_file():
        return "done"
    if (run_dir / "checkpoints" / LATEST).is_file():
        return "resumable"
    return "fresh"


def write_data(cfg, out: Path) -> None:
    """The synthetic splits every run of the experiment reads, written once (atomically, by the
    same generator the trainer uses when data.dir is unset)."""
    from .data import RL_POOL, SPLITS, configured_splits, write_splits
    from .rulebook import load_rulebook

    splits = SPLITS + ((RL_POOL,) if cfg.data.n_rl_pool else ())
    if all((out / "data" / f"{s}.parquet").is_file() for s in splits):
        return
    write_splits(out / "data", configured_splits(cfg.data, load_rulebook(cfg.data.rulebook)))


# ----------------------------------------------------------------------------- running the plan

def run_command(run: dict, state: str, nproc: int) -> list[str]:
    flag = {"done": [], "resumable": ["--resume"], "fresh": ["--overwrite"]}[state]
    config = ["--config", str(run["config"])] if run["config"] is not None else []
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
            str(run["script"]), *config, *flag, f"run.out_dir={run['dir']}", *run["overrides"]]


def run_one(run: dict, nproc: int) -> float:
    """One run to its end (resuming if it can); its output goes to train.log. Seconds taken."""
    state = run_state(run["dir"])
    run["dir"].mkdir(parents=True, exist_ok=True)
    log_path = run["dir"] / "train.log"
    cmd = run_command(run, state, nproc)
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {state}: {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise ExperimentError(f"run {run['name']} failed (exit {proc.returncode}); its log is {log_path}:\n  "
                              + "\n  ".join(tail))
    return time.time() - t0


def merge_manifest(out: Path, kind: str, config: Path, arms, seeds, overrides, plan) -> dict:
    """The experiment's manifest with this command's arms and seeds added. A folder holds one recipe:
    another config or other overrides would mix runs of different recipes in one comparison."""
    manifest = {"kind": kind, "config": str(config), "arms": [], "seeds": [], "overrides": overrides, "runs": {}}
    if (out / MANIFEST).is_file():
        manifest = load_manifest(out)
        for key, value in (("kind", kind), ("config", str(config)), ("overrides", overrides)):
            if manifest.get(key) != value:
                raise ConfigError(f"{out} holds an experiment with {key} {manifest.get(key)!r}, not {value!r}; "
                                  "use another --out for another recipe")
    manifest["arms"] += [a for a in arms if a not in manifest["arms"]]
    manifest["seeds"] += [s for s in seeds if s not in manifest["seeds"]]
    manifest["runs"].update({r["name"]: str(r["dir"].relative_to(out)) for r in plan})
    return manifest


def execute(kind: str, config: Path, out: Path, arms, seeds, overrides, plan, nproc: int, only=None) -> int:
    """Record the experiment, then run what is not finished yet, one run at a time (only the runs
    named in `only`, when given)."""
    from .observe import progress_bar

    manifest = merge_manifest(out, kind, config, arms, seeds, overrides, plan)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    if only is not None:
        plan = [r for r in plan if r["name"] in only]
    todo = [r for r in plan if run_state(r["dir"]) != "done"]
    print(f"{kind}: {len(plan)} runs in {out} ({len(plan) - len(todo)} finished already)", flush=True)
    bar = progress_bar(total=len(plan), initial=len(plan) - len(todo), desc="runs", unit="run")
    for run in todo:
        bar.set_postfix_str(run["name"])
        seconds = run_one(run, nproc)
        bar.write(f"{run['name']}: done in {seconds / 60:.1f} min ({run['dir']})")
        bar.update(1)
    bar.close()
    if only is None:
        print(f"all runs finished; draw the comparison with: python -m afrl_fast.report {out}")
    return 0


# The pilot gate (docs/results/headroom.md): the arms are worth running only when the
# shared SFT model leaves RL something to fix on the long tail without failing the head, writes valid
# traces when sampled, and the RL pool holds prompts that are neither always nor never solved.
PILOT_GATE = {
    "sft longtail 5-ACC": (0.55, 0.75),
    "sft industry 5-ACC": (0.85, 1.0),
    "valid format at T=1": (0.85, 1.0),
    "medium+hard share of the pool": (0.20, 1.0),
    "hard prompts": (1, float("inf")),
}
GATE_FILE = "pilot_gate.json"


def pilot_gate(sft_dir: Path) -> dict:
    """The gate's measurements from the shared SFT run (its results.json and difficulty.parquet)."""
    import pyarrow.parquet as pq

    sft = read_results(sft_dir).get("SFT") or {}
    diff = pq.read_table(sft_dir / "difficulty.parquet").to_pydict()
    if any(v is None for v in diff["n_valid_format"]):
        raise ExperimentError(f"{sft_dir}: difficulty was estimated from the first token alone; the gate needs "
                              "difficulty.correct=verified_trace (format validity of the sampled traces)")
    buckets = diff["bucket"]
    values = {"sft longtail 5-ACC": (sft.get("longtail") or {}).get("acc5"),
              "sft industry 5-ACC": (sft.get("industry") or {}).get("acc5"),
              "valid format at T=1": sum(diff["n_valid_format"]) / max(sum(diff["group_size"]), 1),
              "medium+hard share of the pool": sum(b in ("medium", "hard") for b in buckets) / max(len(buckets), 1),
              "hard prompts": sum(b == "hard" for b in buckets)}
    checks = [{"name": k, "value": values[k], "range": list(PILOT_GATE[k]),
               "ok": values[k] is not None and PILOT_GATE[k][0] <= values[k] <= PILOT_GATE[k][1]} for k in PILOT_GATE]
    return {"ok": all(c["ok"] for c in checks), "checks": checks,
            "buckets": {b: buckets.count(b) for b in ("easy", "medium", "hard", "dropped")}}


def gate_report(gate: dict) -> str:
    lines = [f"  {'ok ' if c['ok'] else 'NO '} {c['name']}: "
             + ("n/a" if c["value"] is None else f"{c['value']:.4g}") + f"  (wanted {c['range'][0]:g}..{c['range'][1]:g})"
             for c in gate["checks"]]
    return "\n".join([f"pilot gate {'holds' if gate['ok'] else 'FAILS'} (buckets {gate['buckets']}):", *lines])


def ablation(config: Path, out: Path, arms: list[str], seeds: list[int], overrides: list[str], nproc: int = 1,
             gate: str = "check") -> int:
    """gate: check = run the shared SFT first and the arms only if the pilot gate holds; pilot = the
    shared SFT and the gate's report alone; ignore = the arms whatever the gate says."""
    check_experiment_out(out, "ablation")
    cfg = load_config(config, overrides)       # a bad config or override fails here, before any work
    out = out.resolve()
    plan = ablation_plan(config, out, arms, seeds, overrides)
    for run in plan:                           # every run's overrides too, before hours of training
        load_config(config, run["overrides"])
    out.mkdir(parents=True, exist_ok=True)
    write_data(cfg, out)
    if gate != "ignore":
        execute("ablation", config, out, arms, seeds, overrides, plan, nproc, only=["sft"])
        verdict = pilot_gate(out / "sft")
        atomic_write_text(out / GATE_FILE, json.dumps(verdict, indent=2))
        print(gate_report(verdict), flush=True)
        if gate == "pilot":
            return 0 if verdict["ok"] else 1
        if not verdict["ok"]:
            print(f"the arms were not run: the shared SFT model leaves no room for the effect (see {out / GATE_FILE});"
                  " tune the recipe (e.g. data.train_tail_share) or pass --gate ignore", file=sys.stderr)
            return 1
    return execute("ablation", config, out, arms, seeds, overrides, plan, nproc)


def distillation(config: Path, out: Path, students: list[str], seeds: list[int], overrides: list[str],
                 nproc: int = 1) -> int:
    check_experiment_out(out, "distillation")
    cfg = load_distill_config(config, overrides)
    if not Path(cfg.teacher.path).is_dir():
        raise ConfigError(f"teacher.path={cfg.teacher.path}: model folder not found")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = distillation_plan(config, out, students, seeds, overrides)
    for run in plan:
        (load_config if run["script"] == TRAIN else load_distill_config)(run["config"], run["overrides"])
    return execute("distillation", config, out, students, seeds, overrides, plan, nproc)


# ----------------------------------------------------------------------------- the summary

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
    for key, ok, want in (("kind", lambda v: v in EXPERIMENT_FILES, "ablation or distillation"),
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
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max()), "n": int(len(x)), "values": [float(v) for v in x]}


def final_train_stats(run_dir: Path) -> dict:
    from .report import load_metrics

    train, _ = load_metrics(run_dir / "metrics.jsonl")
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


def change_over_sft(exp_dir: Path, sft_answers: dict, finals: list[dict]) -> dict:
    """An arm's 5-ACC minus the shared SFT model's per split: the seeds' per-pair correctness
    averaged, then the pairs resampled (metrics.paired_bootstrap), so the interval holds both the
    evaluation set's and the seeds' spread."""
    import numpy as np
    import pyarrow.parquet as pq

    from .metrics import paired_bootstrap

    out = {}
    for split, sft in sft_answers.items():
        answers = [f.get(split, {}).get("answers") for f in finals]
        path = exp_dir / "data" / f"{split}.parquet"
        if not all(a and len(a) == len(sft) for a in answers) or not path.is_file():
            continue
        labels = np.asarray(pq.read_table(path, columns=["label"]).column("label").to_pylist())[:len(sft)]
        right = lambda digits: np.array([int(c) for c in digits]) == labels   # noqa: E731
        out[split] = paired_bootstrap(right(sft), np.stack([right(a) for a in answers]))
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
    arms = {}
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
    if not arms:
        finished = sorted(name for name, d in runs.items() if run_state(d) == "done")
        raise ExperimentError(f"{exp_dir}: no finished run of any arm yet (a run is finished when its folder holds "
                              f"results.json; finished: {', '.join(finished) or 'none'}); nothing to compare")
    return {"experiment": str(exp_dir), "kind": kind, "config": manifest["config"], "arms_requested": manifest["arms"],
            "seeds_requested": manifest["seeds"], "final_window_steps": FINAL_WINDOW, "splits": splits,
            "reference": reference, "arms": arms}


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


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m afrl_fast.experiments", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="experiment", required=True)
    a = sub.add_parser("ablation", help="RL arms × seeds from one shared SFT model (paper Table 3, Figures 3-5)")
    a.add_argument("--config", type=Path, required=True, help="the recipe, e.g. configs/ablation_cpu.yaml")
    a.add_argument("--arms", default="grpo,stepwise_grpo,mode_balanced,mode_balanced_random",
                   help=f"comma-separated, from: {', '.join(ARMS)}")
    a.add_argument("--out", type=Path, default=Path("runs/ablation"))
    a.add_argument("--gate", choices=("check", "pilot", "ignore"), default="check",
                   help="check: run the arms only if the shared SFT model passes the pilot gate (default); "
                        "pilot: the shared SFT and the gate's report alone; ignore: run the arms regardless")
    d = sub.add_parser("distillation", help="students × seeds from one teacher (paper Table 6)")
    d.add_argument("--config", type=Path, required=True, help="the distillation recipe, e.g. configs/distill_demo.yaml")
    d.add_argument("--students", default="distilled,labels,first_token", help=f"comma-separated, from: {', '.join(STUDENTS)}")
    d.add_argument("--out", type=Path, default=Path("runs/distillation"))
    for q in (a, d):
        q.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (run.seed of each compared run)")
        q.add_argument("--nproc-per-node", type=int, default=1, help="ranks per run (torchrun --nproc_per_node)")
        q.add_argument("overrides", nargs="*", help="dotted config overrides for every run, e.g. rl.max_steps=5")
    return p.parse_args(argv)


# what each experiment sets per run, so an override of it would be silently replaced
SET_PER_RUN = {"ablation": ("data.dir", "run.out_dir", "run.init_from", "run.seed", "rl.mode", "rl.random_order",
                            "run.stop_after", "sft.target"),
               "distillation": ("run.out_dir", "run.seed", "distill.traces")}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
        for o in args.overrides:
            if o.split("=", 1)[0] in SET_PER_RUN[args.experiment]:
                raise ConfigError(f"override {o!r}: the experiment sets {o.split('=', 1)[0]} itself for each run")
        seeds = parse_seeds(args.seeds)
        if args.experiment == "ablation":
            return ablation(args.config, args.out, parse_list(args.arms, "arms", ARMS), seeds, list(args.overrides),
                            args.nproc_per_node, args.gate)
        return distillation(args.config, args.out, parse_list(args.students, "students", STUDENTS), seeds,
                            list(args.overrides), args.nproc_per_node)
    except (ConfigError, ExperimentError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
