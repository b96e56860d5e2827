"""Draw a run's metrics.jsonl as PNGs in the spirit of the paper's Figures 3-5.

    python -m afrl_fast.report RUN_DIR [--out DIR]      # default out: RUN_DIR/plots
    python -m afrl_fast.report EXPERIMENT_DIR [--out DIR]   # an afrl_fast.experiments folder: default
                                                            # out EXPERIMENT_DIR/summary

Figures (each skipped, with a printed note, when its fields were never logged):
  eval_over_training.png  Pair-ACC / Macro-F1 / 5-ACC per eval split (Fig. 3, Fig. 5)
  reward_entropy.png      reward mean (+-std) and entropy; KL and clip fraction below (Fig. 4)
  gates.png               format / consistency / logic gate pass rates
  time_split.png          seconds per step spent in rollout / verify / advantages / log-probs / loss /
                          optimizer / weight sync
Curriculum stage changes are drawn as dashed vertical lines on every step axis.

For an experiment folder (arms × seeds, see afrl_fast.experiments) it compares the arms instead:
  ablation_training.png   reward, entropy, KL and format-gate rate against RL step (Fig. 4)
  ablation_eval.png       industry / longtail Pair-ACC and 5-ACC against RL step, step 0 = SFT (Fig. 3, 5)
  summary.json, .md       final metrics per arm, mean ± std over seeds, with the SFT, standard-scoring
                          and majority-class rows for reference
Each arm's line is the mean over its seeds and its band spans the seeds (min to max). A distillation
experiment gets distillation.png (each student's metrics as bars, its seeds as dots, the teacher as a
line) and the same summary files.

We build `matplotlib.figure.Figure` objects directly instead of going through pyplot: no global
figure registry to leak into, and no display backend is ever touched (Agg renders the PNG).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from ..experiment_results import load_manifest, read_results, run_state, summarize, summary_markdown
from ..observe import read_metrics_log

EVAL_METRICS = [("pair_acc", "Pair-ACC"), ("macro_f1", "Macro-F1"), ("acc5", "5-ACC")]
GATES = [("gate/fmt", "format"), ("gate/cst", "consistency"), ("gate/logic", "logic")]
TIME_PARTS = [("time/rollout", "rollout"), ("time/verify", "verify"), ("time/advantages", "advantages"),
              ("time/logprobs", "log-probs"), ("time/loss", "loss"), ("time/optimizer", "optimizer"),
              ("time/sync", "weight sync")]
DPI = 110
# the fields the figures draw (the arm-comparison ones are added below the experiment section)
PLOTTED = {k for k, _ in EVAL_METRICS + GATES + TIME_PARTS} | {"reward/mean", "reward/std", "policy/entropy",
                                                                "policy/kl", "policy/clip_frac"}


# ---------------------------------------------------------------- loading

def load_metrics(path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl as (train_rows, eval_rows), every field a figure draws checked to be a number."""
    return read_metrics_log(path, PLOTTED)


def _series(rows: list[dict], key: str) -> tuple[list, list[float]]:
    """(steps, values) of the rows carrying `key`; a logged null (non-finite) becomes NaN."""
    picked = [r for r in rows if key in r]
    return [r["step"] for r in picked], [_num(r[key]) for r in picked]


def _num(value) -> float:
    return math.nan if value is None else float(value)


def _has(rows: list[dict], key: str) -> bool:
    return any(r.get(key) is not None for r in rows)


def stage_boundaries(train_rows: list[dict]) -> list[tuple[int, str]]:
    """(step, new stage) wherever `stage` changes from one training line to the next."""
    out, previous = [], None
    for row in train_rows:
        stage = row.get("stage")
        if stage is None:
            continue
        if previous is not None and stage != previous:
            out.append((row["step"], str(stage)))
        previous = stage
    return out


# ---------------------------------------------------------------- drawing helpers

def _mark_stages(ax, boundaries, label: bool = True) -> None:
    # x in data units, y in axes units so the label sits at the top whatever the y range is.
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for step, stage in boundaries:
        # Drawn above the data: under a stacked area the line would vanish.
        ax.axvline(step, color="0.3", linestyle="--", linewidth=1, alpha=0.8, zorder=3)
        if label:
            # A faint white box keeps the label readable where a curve runs through it.
            ax.text(step, 0.98, stage, transform=trans, rotation=90, va="top", ha="left",
                    fontsize=8, color="0.2", zorder=4,
                    bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.7))


def _style(ax, title: str, ylabel: str | None = None, xlabel: bool = True) -> None:
    ax.set_title(title)
    if xlabel:
        ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _save(fig: Figure, out_dir: Path, name: str) -> Path:
    path = out_dir / name
    fig.savefig(path, dpi=DPI)
    return path


def _note(name: str, why: str) -> None:
    print(f"note: skipping {name}: {why}")


# ---------------------------------------------------------------- figures

def plot_eval(eval_rows, boundaries, out_dir: Path) -> Path | None:
    name = "eval_over_training.png"
    metrics = [(k, t) for k, t in EVAL_METRICS if _has(eval_rows, k)]
    if not metrics:
        _note(name, "no evaluation lines with pair_acc / macro_f1 / acc5")
        return None
    splits = list(dict.fromkeys(str(r["split"]) for r in eval_rows))  # first-seen order
    fig = Figure(figsize=(5 * len(metrics), 4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (key, title) in zip(axes, metrics):
        for split in splits:
            steps, values = _series([r for r in eval_rows if str(r["split"]) == split], key)
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, label=split)
        _mark_stages(ax, boundaries)
        _style(ax, title)
    axes[0].legend(title="split", fontsize=8)
    fig.suptitle("Evaluation over training")
    return _save(fig, out_dir, name)


def plot_reward_entropy(train_rows, boundaries, out_dir: Path) -> Path | None:
    name = "reward_entropy.png"
    # RL lines are the ones with a reward; SFT lines would only flatten the entropy panel.
    rl = [r for r in train_rows if r.get("reward/mean") is not None]
    if not rl:
        _note(name, "no RL lines with reward/mean")
        return None
    fig = Figure(figsize=(11, 7), layout="constrained")
    (ax_r, ax_e), (ax_k, ax_c) = fig.subplots(2, 2, sharex=True)
    _reward_panel(ax_r, rl)
    for ax, key, title in [(ax_e, "policy/entropy", "Policy entropy"), (ax_k, "policy/kl", "KL to reference"),
                           (ax_c, "policy/clip_frac", "Clip fraction")]:
        if _has(rl, key):
            ax.plot(*_series(rl, key), color="C1" if key == "policy/entropy" else "C2")
        else:
            ax.text(0.5, 0.5, f"{key} not logged", ha="center", va="center",
                    transform=ax.transAxes, color="0.5")
        _style(ax, title, xlabel=ax is not ax_e)  # shared x: label the bottom row only
    # RL axes only show RL steps: the SFT->RL boundary sits at the left edge and still helps.
    for ax in (ax_r, ax_e, ax_k, ax_c):
        _mark_stages(ax, boundaries)
    fig.suptitle("RL dynamics")
    return _save(fig, out_dir, name)


def _reward_panel(ax, rl_rows) -> None:
    steps, mean = _series(rl_rows, "reward/mean")
    ax.plot(steps, mean, color="C0", label="reward mean")
    if _has(rl_rows, "reward/std"):
        rows = [r for r in rl_rows if r.get("reward/std") is not None]
        s, m = _series(rows, "reward/mean")
        std = [_num(r["reward/std"]) for r in rows]
        ax.fill_between(s, [a - b for a, b in zip(m, std)], [a + b for a, b in zip(m, std)],
                        color="C0", alpha=0.2, linewidth=0, label="±1 std")
        ax.legend(fontsize=8, loc="lower right")
    _style(ax, "Reward", xlabel=False)


def plot_gates(train_rows, boundaries, out_dir: Path) -> Path | None:
    name = "gates.png"
    gates = [(k, t) for k, t in GATES if _has(train_rows, k)]
    if not gates:
        _note(name, "no gate/fmt / gate/cst / gate/logic logged")
        return None
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.subplots()
    for key, label in gates:
        ax.plot(*_series(train_rows, key), label=label)
    # Rates: a fixed 0..1 axis keeps small dips from looking dramatic; the headroom above 1
    # keeps the stage labels off curves that sit at 100%.
    ax.set_ylim(-0.02, 1.15)
    _mark_stages(ax, boundaries)
    _style(ax, "Reward gate pass rates", "pass rate")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out_dir, name)


def plot_time_split(train_rows, boundaries, out_dir: Path) -> Path | None:
    name = "time_split.png"
    parts = [(k, t) for k, t in TIME_PARTS if _has(train_rows, k)]
    if not parts:
        _note(name, "no time/* fields logged")
        return None
    rows = [r for r in train_rows if any(r.get(k) is not None for k, _ in parts)]
    steps = [r["step"] for r in rows]
    # A phase missing on some step took no time there; 0 keeps the stack contiguous.
    stacks = [[_num(r.get(k)) if r.get(k) is not None else 0.0 for r in rows] for k, _ in parts]
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax, ax_share = fig.subplots(1, 2, width_ratios=[4, 1])
    ax.stackplot(steps, stacks, labels=[t for _, t in parts], alpha=0.85)
    _mark_stages(ax, boundaries)
    _style(ax, "Time per step", "seconds")
    # Headroom above the tallest step keeps the stage labels off the stack; the legend goes
    # below the axis, where it hides neither data nor labels.
    ax.set_ylim(0, 1.2 * max(map(sum, zip(*stacks))) or 1.0)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(parts),
              frameon=False)
    _share_bar(ax_share, parts, stacks)
    return _save(fig, out_dir, name)


def _share_bar(ax, parts, stacks) -> None:
    """One stacked bar of each phase's share of the whole run: where the time went, at a glance."""
    totals = [sum(v for v in s if not math.isnan(v)) for s in stacks]
    grand = sum(totals) or 1.0
    bottom = 0.0
    for i, ((_, label), total) in enumerate(zip(parts, totals)):
        share = 100 * total / grand
        ax.bar(0, share, bottom=bottom, color=f"C{i}", alpha=0.85, width=0.6)
        if share >= 6:  # smaller slices would print unreadable, overlapping labels
            ax.text(0, bottom + share / 2, f"{label}\n{share:.0f}%", ha="center",
                    va="center", fontsize=8)
        bottom += share
    ax.set_xlim(-0.5, 0.5)
    ax.set_ylim(0, 100)
    ax.set_xticks([])
    ax.set_title("Share of run")
    ax.set_ylabel("%")


# ---------------------------------------------------------------- experiments (several runs)

ARM_CURVES = [("reward/mean", "Reward"), ("policy/entropy", "Policy entropy (all tokens)"),
              ("policy/entropy_critical", "Entropy at the critical tokens"), ("policy/kl", "KL to reference"),
              ("gate/fmt", "Format gate pass rate"), ("reward/wrong_grade", "Well-formed, wrong grade")]
ARM_EVALS = [("pair_acc", "Pair-ACC"), ("acc5", "5-ACC")]
SMOOTH = 5   # moving-average window over RL steps for the per-step training curves


def _moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - window + 1): i + 1] if not math.isnan(v)]
        out.append(sum(part) / len(part) if part else math.nan)
    return out


def _band(per_seed: list[tuple[list, list[float]]]):
    """Steps present in every seed, with the mean and the min / max over the seeds there."""
    common = sorted(set.intersection(*(set(s) for s, _ in per_seed))) if per_seed else []
    lookup = [dict(zip(s, v)) for s, v in per_seed]
    cols = [[d[t] for d in lookup] for t in common]
    mean = [sum(c) / len(c) for c in cols]
    return common, mean, [min(c) for c in cols], [max(c) for c in cols]


def _arm_panel(ax, series_by_arm: dict, title: str) -> None:
    for i, (arm, per_seed) in enumerate(series_by_arm.items()):
        steps, mean, lo, hi = _band(per_seed)
        if not steps:
            continue
        ax.plot(steps, mean, color=f"C{i}", label=f"{arm} (n={len(per_seed)})")
        if len(per_seed) > 1:
            ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.18, linewidth=0)
    _style(ax, title)


def draw_experiment(exp_dir, out_dir) -> list[Path]:
    """The comparison of an experiment folder (afrl_fast.experiments): training curves and held-out
    metrics against RL step, per arm (mean over seeds, the band spanning the seeds), and the summary
    table of final metrics (summary.json, summary.md)."""
    exp_dir, out_dir = Path(exp_dir), Path(out_dir)
    manifest = load_manifest(exp_dir)
    if manifest.get("kind") == "distillation":
        return draw_distillation(exp_dir, out_dir)
    if manifest.get("kind") == "teacher":      # one run and its gate (teacher.json): the run's own figures
        return draw_report(exp_dir / "sft", out_dir)
    summary = summarize(exp_dir)       # checks every finished run's results.json; refuses an empty comparison
    sft_rows = {}
    sft_dir = exp_dir / manifest["runs"]["sft"] if "sft" in manifest["runs"] else None
    if sft_dir is not None and run_state(sft_dir) == "done":
        sft_rows = read_results(sft_dir).get("SFT", {})
    train_by_arm, eval_by_arm = {}, {}
    for arm in manifest["arms"]:
        for seed in manifest["seeds"]:
            rel = manifest["runs"].get(f"{arm}/seed{seed}")    # not every arm runs every seed
            metrics = exp_dir / rel / "metrics.jsonl" if rel else None
            if metrics is not None and metrics.is_file():
                train, evals = load_metrics(metrics)
                train_by_arm.setdefault(arm, []).append([r for r in train if r.get("phase") == "rl"])
                eval_by_arm.setdefault(arm, []).append([r for r in evals if r.get("phase") == "rl"])
    figures = []
    if train_by_arm:
        fig = Figure(figsize=(15, 7.5), layout="constrained")
        axes = fig.subplots(2, 3, sharex=True).ravel()
        for ax, (key, title) in zip(axes, ARM_CURVES):
            curves = {}
            for arm, runs in train_by_arm.items():
                for rows in runs:
                    steps, values = _series(rows, key)
                    if steps:
                        curves.setdefault(arm, []).append((steps, _moving_average(values, SMOOTH)))
            _arm_panel(ax, curves, title)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"RL dynamics per arm (moving average over {SMOOTH} steps; line: mean over seeds, "
                     "band: min to max over seeds)")
        figures.append((fig, "ablation_training.png"))
    if eval_by_arm:
        splits = list(dict.fromkeys(str(r["split"]) for runs in eval_by_arm.values() for rows in runs for r in rows))
        fig = Figure(figsize=(5.5 * len(ARM_EVALS), 4 * len(splits)), layout="constrained")
        axes = fig.subplots(len(splits), len(ARM_EVALS), squeeze=False, sharex=True)
        for row, split in enumerate(splits):
            for col, (key, title) in enumerate(ARM_EVALS):
                curves = {}
                for arm, runs in eval_by_arm.items():
                    for rows in runs:
                        steps, values = _series([r for r in rows if str(r["split"]) == split], key)
                        if split in sft_rows and sft_rows[split].get(key) is not None:  # step 0: the SFT model
                            steps, values = [0, *steps], [float(sft_rows[split][key]), *values]
                        if steps:
                            curves.setdefault(arm, []).append((steps, values))
                _arm_panel(axes[row][col], curves, f"{split}: {title}")
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Held-out first-token metrics against RL step (step 0: the shared SFT model; "
                     "line: mean over seeds, band: min to max)")
        figures.append((fig, "ablation_eval.png"))
    out_dir.mkdir(parents=True, exist_ok=True)        # everything was read and drawn: now write
    written = [_save(fig, out_dir, name) for fig, name in figures]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "summary.md").write_text(summary_markdown(summary) + "\n")
    return written + [out_dir / "summary.json", out_dir / "summary.md"]


DISTILL_METRICS = [("acc5", "5-ACC"), ("pair_acc", "Pair-ACC"), ("macro_f1", "Macro-F1")]


def draw_distillation(exp_dir: Path, out_dir: Path) -> list[Path]:
    """The distillation table as bars (Table 6): per split and metric, each student's mean over its
    seeds with every seed as a dot, and the teacher as a dashed line."""
    summary = summarize(exp_dir)       # refuses an experiment without a finished run
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    if summary["arms"]:
        splits = summary["splits"]
        fig = Figure(figsize=(4.5 * len(DISTILL_METRICS), 3.8 * len(splits)), layout="constrained")
        axes = fig.subplots(len(splits), len(DISTILL_METRICS), squeeze=False)
        students = list(summary["arms"])
        for row, split in enumerate(splits):
            for col, (key, title) in enumerate(DISTILL_METRICS):
                ax = axes[row][col]
                for i, name in enumerate(students):
                    m = summary["arms"][name]["eval"].get(split, {}).get(key)
                    if m is None:
                        continue
                    ax.bar(i, 100 * m["mean"], color=f"C{i}", alpha=0.75, width=0.6)
                    ax.plot([i] * len(m["values"]), [100 * v for v in m["values"]], "o", color="0.15", markersize=3)
                teacher = summary["reference"].get("teacher", {}).get(split, {}).get(key)
                if teacher is not None:
                    ax.axhline(100 * teacher, color="0.3", linestyle="--", linewidth=1, label="teacher")
                    ax.legend(fontsize=8, loc="lower right")
                ax.set_xticks(range(len(students)), students, fontsize=8)
                _style(ax, f"{split}: {title}", "%", xlabel=False)
        fig.suptitle("Students of one teacher (bars: mean over seeds; dots: seeds)")
        written.append(_save(fig, out_dir, "distillation.png"))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "summary.md").write_text(summary_markdown(summary) + "\n")
    return written + [out_dir / "summary.json", out_dir / "summary.md"]


# ---------------------------------------------------------------- entry points

def draw_report(run_dir, out_dir=None) -> list[Path]:
    """Draw every figure the run's metrics allow; return the PNG paths written."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found (is {run_dir} a run folder?)")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    train, evals = load_metrics(metrics)        # read and checked before anything is made
    out_dir.mkdir(parents=True, exist_ok=True)
    boundaries = stage_boundaries(train)
    written = [plot_eval(evals, boundaries, out_dir),
               plot_reward_entropy(train, boundaries, out_dir),
               plot_gates(train, boundaries, out_dir),
               plot_time_split(train, boundaries, out_dir)]
    return [p for p in written if p is not None]
