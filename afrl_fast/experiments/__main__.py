"""python -m afrl_fast.experiments: the ablation (arms x seeds) and distillation (students x seeds) experiments."""
from __future__ import annotations

import sys
from pathlib import Path

from afrl_fast.cli import Parser
from afrl_fast.errors import ConfigError
from afrl_fast.experiment_results import ARMS, ExperimentError, STUDENTS
from afrl_fast.experiments import __doc__ as experiments_doc, ablation, distillation, teacher


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


# one override each experiment's config really has, for its help line (tests/test_doc_examples.py loads them)
OVERRIDE_EXAMPLES = {"ablation": "rl.max_steps=5", "distillation": "distill.epochs=1", "teacher": "sft.epochs=6"}


def parse_args(argv=None):
    p = Parser(prog="python -m afrl_fast.experiments", description=experiments_doc.split("\n")[0])
    sub = p.add_subparsers(dest="experiment", required=True, help="the experiment to run")
    a = sub.add_parser("ablation", help="RL arms × seeds from one shared SFT model (paper Table 3, Figures 3-5)")
    a.add_argument("--config", type=Path, required=True, help="the recipe, e.g. configs/ablation_cpu.yaml")
    a.add_argument("--arms", default="grpo,stepwise_grpo,mode_balanced,mode_balanced_random",
                   help=f"comma-separated, from: {', '.join(ARMS)}")
    a.add_argument("--out", type=Path, default=Path("runs/ablation"), help="experiment folder (one run folder per arm "
                                                                          "and seed, experiment.json)")
    a.add_argument("--gate", choices=("check", "pilot", "ignore"), default="check",
                   help="check: run the arms only if the shared SFT model passes the pilot gate (default); "
                        "pilot: the shared SFT and the gate's report alone; ignore: run the arms regardless")
    d = sub.add_parser("distillation", help="students × seeds from one teacher (paper Table 6)")
    d.add_argument("--config", type=Path, required=True, help="the distillation recipe, e.g. configs/distill_demo.yaml")
    d.add_argument("--students", default="distilled,labels,first_token", help=f"comma-separated, from: {', '.join(STUDENTS)}")
    d.add_argument("--out", type=Path, default=Path("runs/distillation"),
                   help="experiment folder (one run folder per student and seed, experiment.json)")
    t = sub.add_parser("teacher", help="one SFT judge and its teacher gate: the starting point of the user's path")
    t.add_argument("--config", type=Path, required=True, help="the teacher recipe, e.g. configs/teacher_cpu.yaml")
    t.add_argument("--out", type=Path, default=Path("runs/teacher"),
                   help="experiment folder (data/, sft/ whose sft_model is the teacher, teacher.json)")
    for q in (a, d):
        q.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (run.seed of each compared run)")
    for name, q in (("ablation", a), ("distillation", d), ("teacher", t)):
        q.add_argument("--nproc-per-node", type=int, default=1, help="ranks per run (torchrun --nproc_per_node)")
        q.add_argument("overrides", nargs="*",
                       help=f"dotted config overrides for every run, e.g. {OVERRIDE_EXAMPLES[name]}")
    return p.parse_args(argv)


# what each experiment sets per run, so an override of it would be silently replaced
SET_PER_RUN = {"ablation": ("data.dir", "run.out_dir", "run.init_from", "run.seed", "rl.mode", "rl.random_order",
                            "run.stop_after", "sft.target"),
               "distillation": ("run.out_dir", "run.seed", "distill.traces"),
               "teacher": ("data.dir", "run.out_dir", "run.stop_after")}


def check_overrides(experiment: str, overrides: list[str]) -> None:
    """ConfigError for an override of a key the experiment sets itself for each run."""
    for o in overrides:
        if o.split("=", 1)[0] in SET_PER_RUN[experiment]:
            raise ConfigError(f"override {o!r}: the experiment sets {o.split('=', 1)[0]} itself for each run")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
        check_overrides(args.experiment, args.overrides)
        if args.experiment == "teacher":
            return teacher(args.config, args.out, list(args.overrides), args.nproc_per_node)
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
    raise SystemExit(main())
