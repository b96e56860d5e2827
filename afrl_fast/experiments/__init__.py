"""Experiments: one recipe trained several ways over several seeds, from one starting point.

The paper's ablations (Table 3, Figures 3-5) and its distillation table (Table 6) at small scale:

    python -m afrl_fast.experiments ablation --config configs/ablation_cpu.yaml \
        --arms grpo,stepwise_grpo,mode_balanced,mode_balanced_random --seeds 0,1,2 --out runs/ablation
    python -m afrl_fast.experiments distillation --config configs/distill_demo.yaml \
        --students distilled,labels,first_token --seeds 0,1,2 --out runs/distillation
    python -m afrl_fast.report runs/ablation --out results/ablation      # figures + summary table
    python -m afrl_fast.experiments teacher --config configs/teacher_cpu.yaml --out runs/teacher

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

The teacher (the user's path starts from it, scripts/user_path.sh): one SFT run and its measurements
    OUT/data/, OUT/sft/     as the ablation's shared SFT (its sft_model is the teacher)
    OUT/teacher.json        where the model is and the teacher gate (TEACHER_GATE): 5-ACC on both
                            splits and the format validity of its sampled traces at T = 1; exit 1 below it

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

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from ..data import RL_POOL, configured_splits, write_splits
from ..files import atomic_write_text, check_output_path
from ..config import DEMO_CONFIG, comparable_config, config_differences, load_config, load_distill_config
from ..errors import ConfigError
from ..format import resolve_prompt_settings
from ..observe import progress_bar
from ..pairs import SYNTHETIC_SPLITS
from ..rulebook import load_rulebook
from ..experiment_results import (ARMS, DISTILL, EXPERIMENT_FILES, MANIFEST, SHARED_TRACES, STUDENTS, TRAIN,
                                 ExperimentError, load_manifest, read_results, run_state)

ROOT = Path(__file__).resolve().parents[2]   # the checkout: runs start from there


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
    prompt = resolve_prompt_settings(cfg.teacher.path, cfg.data.rulebook, cfg.data.instructions)
    instructions = out / "teacher_instructions.txt"
    if not instructions.is_file():
        atomic_write_text(instructions, prompt.instructions)
    rulebook = out / "teacher_rulebook.yaml"
    if not rulebook.is_file():
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
    """Every student of the Table-6 analogue × seed, each from the same teacher and data. Greedy
    teacher traces are the same for every seed and student, so the first run writes them to the
    experiment folder and the others read them there."""
    cfg = load_distill_config(config, overrides)
    shared = [f"distill.traces_cache={out / SHARED_TRACES}"] if cfg.distill.trace_temperature == 0 else []
    plan = []
    for student in students:
        for seed in seeds:
            run = {"name": f"{student}/seed{seed}", "dir": out / student / f"seed{seed}"}
            if student == "labels":
                run.update(script=TRAIN, config=DEMO_CONFIG,
                           overrides=[*labels_student_overrides(cfg, out), f"run.device={cfg.run.device}",
                                      f"run.seed={seed}"])
            else:
                reads_traces = "distill.traces=teacher" in STUDENTS[student]
                run.update(script=DISTILL, config=config, overrides=[*overrides, *STUDENTS[student], f"run.seed={seed}",
                                                                      *(shared if reads_traces else [])])
            plan.append(run)
    return plan


def write_data(cfg, out: Path) -> None:
    """The synthetic splits every run of the experiment reads, written once (atomically, by the
    same generator the trainer uses when data.dir is unset)."""
    splits = SYNTHETIC_SPLITS + ((RL_POOL,) if cfg.data.n_rl_pool else ())
    if all((out / "data" / f"{s}.parquet").is_file() for s in splits):
        return
    write_splits(out / "data", configured_splits(cfg.data, load_rulebook(cfg.data.rulebook)))


# ----------------------------------------------------------------------------- running the plan

def check_finished_run(run: dict) -> None:
    """A finished run is skipped only when it ran this experiment's recipe: a run folder copied in
    from elsewhere, or left by other overrides, would otherwise enter the comparison unnoticed.
    Compared as a resume compares a checkpoint (where and how a run ran aside)."""
    loader = load_config if run["script"] == TRAIN else load_distill_config

    def recipe(cfg) -> dict:
        d = comparable_config(cfg, ("out_dir", "device", "resume"))
        if d["run"].get("stop_after") in ("sft", "difficulty"):
            # a run that ended before RL did nothing its RL settings say (eval.every counts RL steps)
            d.pop("rl", None)
            d["eval"].pop("every", None)
        return d
    try:
        have = recipe(loader(run["dir"] / "config.yaml", []))
    except ConfigError as e:
        raise ExperimentError(f"{run['dir']}: a finished run whose config.yaml cannot be read ({e})") from None
    diff = config_differences(have, recipe(loader(run["config"], run["overrides"])))
    if diff:
        raise ExperimentError(f"{run['dir']} holds a finished run of another recipe: {diff}; "
                              "move it away (the runner then trains it) or use another --out")


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
    manifest = merge_manifest(out, kind, config, arms, seeds, overrides, plan)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    if only is not None:
        plan = [r for r in plan if r["name"] in only]
    for run in plan:
        if run_state(run["dir"]) == "done":
            check_finished_run(run)
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
# A teacher worth learning from (issue: the user's path): right on both splits, and its sampled traces
# valid often enough that best-of-N synthesis keeps most pairs.
TEACHER_GATE = {
    "sft industry 5-ACC": (0.85, 1.0),
    "sft longtail 5-ACC": (0.85, 1.0),
    "valid format at T=1": (0.85, 1.0),
}
TEACHER_FILE = "teacher.json"


def pilot_gate(sft_dir: Path, gate: dict = PILOT_GATE) -> dict:
    """The gate's measurements from an SFT run (its results.json and difficulty.parquet), each
    checked against its range in `gate`."""
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
    checks = [{"name": k, "value": values[k], "range": list(gate[k]),
               "ok": values[k] is not None and gate[k][0] <= values[k] <= gate[k][1]} for k in gate]
    return {"ok": all(c["ok"] for c in checks), "checks": checks,
            "buckets": {b: buckets.count(b) for b in ("easy", "medium", "hard", "dropped")}}


def gate_report(gate: dict, name: str = "pilot gate") -> str:
    lines = [f"  {'ok ' if c['ok'] else 'NO '} {c['name']}: "
             + ("n/a" if c["value"] is None else f"{c['value']:.4g}") + f"  (wanted {c['range'][0]:g}..{c['range'][1]:g})"
             for c in gate["checks"]]
    return "\n".join([f"{name} {'holds' if gate['ok'] else 'FAILS'} (buckets {gate['buckets']}):", *lines])


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


def teacher(config: Path, out: Path, overrides: list[str], nproc: int = 1) -> int:
    """The teacher: one SFT run on the recipe's data (OUT/sft, run.stop_after=difficulty, so the
    format validity of its sampled traces is measured), then OUT/teacher.json: where its model is and
    how it does against TEACHER_GATE. Exit 1 when the gate fails (the model is kept either way)."""
    check_experiment_out(out, "teacher")
    out = out.resolve()
    plan = [{"script": TRAIN, "config": config, "name": "sft", "dir": out / "sft",
             "overrides": [f"data.dir={out / 'data'}", *overrides, "run.stop_after=difficulty"]}]
    cfg = load_config(config, plan[0]["overrides"])   # the run's own settings: a bad override fails here
    out.mkdir(parents=True, exist_ok=True)
    write_data(cfg, out)
    execute("teacher", config, out, [], [], overrides, plan, nproc)
    verdict = pilot_gate(out / "sft", TEACHER_GATE)
    verdict["model"] = "sft/sft_model"         # relative to OUT: the folder moves with it
    atomic_write_text(out / TEACHER_FILE, json.dumps(verdict, indent=2))
    print(gate_report(verdict, "teacher gate"), flush=True)
    print(f"the teacher is {out / 'sft' / 'sft_model'}; serve it with: python -m afrl_fast.serve "
          f"--model {out / 'sft' / 'sft_model'}")
    return 0 if verdict["ok"] else 1


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


# ----------------------------------------------------------------------------- command line
