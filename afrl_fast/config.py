"""Run configuration: typed dataclasses, loaded from YAML and dotted command-line overrides.

    cfg = load_config("configs/demo.yaml", ["rl.kl_coef=0", "sft.epochs=2"])

OmegaConf checks every key and type against the dataclasses below, so a typo in a YAML file or an
override is an error naming the key, not a silently ignored setting.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import List, Optional
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError
from .pairs import SYNTHETIC_SPLITS
from .reward import RewardConfig
from .rulebook import CONFIG_DIR, load_yaml_file

DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


@dataclass
class ModelConfig:
    path: Optional[str] = None          # a Hugging Face model folder; None builds a fresh model from the fields below
    tokenizer: str = "qwen3"         # "qwen3" = the real Qwen3 tokenizer bundled with our dependencies
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    dtype: str = "float32"           # float32 | bfloat16
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 (needs the `gpu` extra)
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    dir: Optional[str] = None           # folder with train.parquet and NAME.parquet per eval.splits name; None = synthesize into the run folder
    n_train: int = 1200
    n_eval: int = 160                # rows of each synthetic evaluation split
    seed: int = 0
    reasons: bool = True             # synthetic traces write a reason sentence before each box
    rulebook: Optional[str] = None      # None = configs/rulebook/default.yaml
    instructions: str = "full"       # full = the rulebook rendered as expert policy; short = its summary; a text file (PIAR's or synthesize's instructions.txt); or a model folder (its saved prompt)
    max_prompt_tokens: int = 4096
    max_response_tokens: int = 1024
    # The paper's split of roles: SFT on a limited set of traces (train), RL on a larger labelled pool
    # SFT never saw (rl_pool.parquet: labels only). Synthetic data: n_rl_pool > 0 writes the pool; the
    # tail shares set how common long-tail rules are in each (None = natural rarity). With data.dir,
    # an rl_pool.parquet in that folder is used when present. 0 = RL on the SFT set itself.
    n_rl_pool: int = 0
    train_tail_share: Optional[float] = None
    rl_pool_tail_share: Optional[float] = None


@dataclass
class SFTConfig:
    epochs: float = 1.0
    batch_size: int = 16
    lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 0        # sequences per forward/backward on one rank (0 = the rank's whole batch)
    # trace = the expert AFRL trace (the AFRL model); grade = the grade token alone + EOS (the paper's
    # "Standard Scoring" baseline, Tables 3-4: evaluate it with run.stop_after=sft)
    target: str = "trace"


@dataclass
class DifficultyConfig:
    max_prompts: int = 0             # 0 = every training prompt
    group_size: int = 8
    temperature: float = 1.0
    easy_min: int = 7                # Acc@8 >= 7 correct: Easy
    medium_min: int = 2              # 2..6: Medium; 1: Hard; 0: dropped (paper §4.1)
    drop_unsolved: bool = True       # False keeps 0-correct prompts in Hard (smoke tests of an untrained model)
    # what "correct" means for Acc@8: first_token = the sampled grade token equals the label (the AFRL
    # answer; one prefill per prompt, the G first tokens drawn from it); verified_trace = a whole sampled
    # trace earns the full reward (format, consistency, logic gates, right grade): G full decodes per prompt
    correct: str = "first_token"
    batch_prompts: int = 32          # prompts per engine call


@dataclass
class StageConfig:
    easy: float = 0.0                # composition (fractions, scaled to the data at hand)
    medium: float = 0.0
    hard: float = 0.0
    size: int = 0                    # prompts in the stage (0 = as many as the composition allows)
    grpo_weight: float = 0.9         # α_t of the paper (Table 8): weight of L_GRPO in the stage
    sft_weight: float = 0.1          # γ_t of the paper (Table 8): weight of the SFT anchor L_SFT
    epochs: float = 1.0


@dataclass
class SGLangConfig:
    """The SGLang rollout server of each engine group (run.engine=sglang; see afrl_fast.engines.sglang)."""
    tp_size: int = 1                 # GPUs (consecutive ranks of one node) that share one server
    mem_fraction_static: float = 0.5  # of each GPU for SGLang's weights + KV pool (the trainer needs the rest)
    enable_memory_saver: bool = True  # release SGLang's memory while the trainer runs (colocated GPUs)
    dtype: str = "bfloat16"
    port: int = 30000                # group g on a node listens on port + g
    start_timeout_s: float = 900.0
    request_timeout_s: float = 3600.0
    bucket_bytes: int = 1 << 30      # weights sent per update call
    extra_args: List[str] = field(default_factory=list)   # more `sglang.launch_server` flags, verbatim


@dataclass
class RLConfig:
    mode: str = "mode_balanced"      # mode_balanced | stepwise_grpo (γ = 0) | grpo (no token weights, γ = 0)
    batch_prompts: int = 256         # B_RL prompts per step (global)
    sft_batch: int = 256             # B_SFT expert trajectories per step (global)
    mini_batches: int = 1            # optimizer updates per rollout batch (global batch / mini-batch)
    # with one update per rollout batch the sampling policy is the trained one: take the old log-probs
    # from the loss pass itself (ratio ≡ 1, same gradient) instead of a separate forward
    on_policy_shortcut: bool = True
    micro_batch_size: int = 0        # sequences per forward/backward on one rank (0 = the whole mini-batch)
    group_size: int = 8              # G
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    lr: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kl_coef: float = 0.001           # β of the paper's k3 KL term to the reference (Table 7)
    eps_low: float = 0.2
    eps_high: float = 0.2
    adv_std_norm: bool = True        # divide group advantages by the group std (GRPO); False = Dr.GRPO-style
    token_weights: List[float] = field(default_factory=lambda: [10.0, 10.0, 5.0])  # decision, steps 4-8 boxes, final
    gate: str = "literal"            # literal (paper) | pred (ŷ == y_pred only; ordinal term live)
    reward_ordinal_slope: float = 0.5  # γ of Eq. 7: R_res = −slope·|y_pred − y_gt| when wrong (unspecified in the paper)
    random_order: bool = False       # ablation: one shuffled pool instead of the curriculum
    stages: List[StageConfig] = field(default_factory=lambda: [
        StageConfig(easy=0.044, medium=0.556, hard=0.400, grpo_weight=0.85, sft_weight=0.15),
        StageConfig(easy=0.033, medium=0.410, hard=0.557, grpo_weight=0.90, sft_weight=0.10),
        StageConfig(easy=0.082, medium=0.262, hard=0.656, grpo_weight=0.95, sft_weight=0.05),
    ])
    max_steps: int = 0               # 0 = run every stage to its end
    # paper §3.6: stage 3 "targets hard and previously failed samples": prompts none of whose rollouts
    # earned the full reward in the earlier stages are added to the last stage
    fold_failed_into_last_stage: bool = True
    sglang: SGLangConfig = field(default_factory=SGLangConfig)


@dataclass
class EvalConfig:
    every: int = 10                  # RL steps between held-out evaluations (0 = only after SFT and RL)
    max_rows: int = 0                # 0 = whole split
    batch_size: int = 16
    # held-out splits scored after SFT and RL: with data.dir any names (each read from NAME.parquet
    # there); without it, the synthetic generator's (train, industry, longtail)
    splits: List[str] = field(default_factory=lambda: ["industry", "longtail"])


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda
    loss_backend: str = "auto"       # auto | triton | native | torch
    engine: str = "embedded"         # embedded | sglang
    checkpoint_every: int = 5        # RL steps between checkpoints (SFT steps: 4× as many)
    resume: bool = False
    stop_after: str = ""             # "" | sft | difficulty: end the run after that stage (tests, sweeps)
    # a run folder that stopped after difficulty (or finished): start RL from its sft_model/ and its
    # difficulty.parquet, skipping SFT and difficulty (ablation arms share one starting point)
    init_from: Optional[str] = None


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    difficulty: DifficultyConfig = field(default_factory=DifficultyConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(path: str | Path | None = DEMO_CONFIG, overrides: list[str] = ()) -> Config:
    """Defaults ← YAML file ← dotted overrides (`rl.kl_coef=0`), validated against the dataclasses."""
    cfg = load_structured(Config, path, overrides)
    validate(cfg)
    return cfg


def load_structured(schema_class, path, overrides):
    """An instance of the dataclass `schema_class` from its defaults ← the YAML file ← dotted overrides;
    unknown keys and wrong types are ConfigErrors naming the key."""
    schema = OmegaConf.structured(schema_class)
    try:
        layers = [schema]
        if path is not None:
            if not Path(path).exists():
                raise ConfigError(f"{path}: config file not found")
            data = load_yaml_file(path, ConfigError, "config file")
            if not isinstance(data, dict):
                sections = ", ".join(f.name for f in fields(schema_class))
                raise ConfigError(f"{path}: the config must be a YAML mapping of sections ({sections}), "
                                  f"got {type(data).__name__}")
            layers.append(OmegaConf.create(data))
        merged = OmegaConf.merge(*layers)
        for item in overrides:
            apply_override(merged, item)
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, TypeError) as e:
        raise ConfigError(f"{path or '<defaults>'}: {e}".replace("\n", "; ")) from None


def apply_override(merged, item: str) -> None:
    """`key.sub=value` (list items by index: `rl.stages.0.grpo_weight=0.5`); the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. rl.kl_coef=0")
    if OmegaConf.select(merged, key, default="__missing__") == "__missing__":
        raise ConfigError(f"override {item!r}: unknown key {key!r}")
    OmegaConf.update(merged, key, yaml.safe_load(value), merge=True)


# Numeric ranges, checked at load time so a bad value fails before any work (not minutes into a
# run, or as a NaN loss): key -> (test, what it means). Every value must also be a finite number
# (a YAML `.nan` or `.inf` slips past comparisons otherwise).
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
POSITIVE = (lambda v: v > 0, "> 0")
SHARE = (lambda v: 0 <= v <= 1, "in [0, 1]")
NUMERIC_RANGES = {
    "model.hidden_size": AT_LEAST_1, "model.num_layers": AT_LEAST_1, "model.num_heads": AT_LEAST_1,
    "model.num_kv_heads": AT_LEAST_1, "model.head_dim": AT_LEAST_1, "model.intermediate_size": AT_LEAST_1,
    "data.n_train": AT_LEAST_1, "data.n_eval": AT_LEAST_1, "data.seed": AT_LEAST_0,
    "data.max_prompt_tokens": AT_LEAST_1, "data.max_response_tokens": AT_LEAST_1, "data.n_rl_pool": AT_LEAST_0,
    "sft.epochs": AT_LEAST_0, "sft.batch_size": AT_LEAST_1, "sft.lr": POSITIVE, "sft.warmup_steps": AT_LEAST_0,
    "sft.weight_decay": AT_LEAST_0, "sft.grad_clip": AT_LEAST_0, "sft.micro_batch_size": AT_LEAST_0,
    "difficulty.max_prompts": AT_LEAST_0, "difficulty.group_size": AT_LEAST_1, "difficulty.temperature": POSITIVE,
    "difficulty.batch_prompts": AT_LEAST_1,
    "rl.batch_prompts": AT_LEAST_1, "rl.sft_batch": AT_LEAST_0, "rl.mini_batches": AT_LEAST_1,
    "rl.micro_batch_size": AT_LEAST_0, "rl.group_size": (lambda v: v >= 2, ">= 2"), "rl.temperature": POSITIVE,
    "rl.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "rl.max_new_tokens": AT_LEAST_1, "rl.lr": POSITIVE,
    "rl.weight_decay": AT_LEAST_0, "rl.grad_clip": AT_LEAST_0, "rl.kl_coef": AT_LEAST_0,
    "rl.eps_low": (lambda v: 0 <= v < 1, "in [0, 1)"), "rl.eps_high": AT_LEAST_0,
    "rl.reward_ordinal_slope": AT_LEAST_0, "rl.max_steps": AT_LEAST_0,
    "eval.every": AT_LEAST_0, "eval.max_rows": AT_LEAST_0, "eval.batch_size": AT_LEAST_1,
    "run.seed": AT_LEAST_0, "run.checkpoint_every": AT_LEAST_0,
}
STAGE_RANGES = {"easy": AT_LEAST_0, "medium": AT_LEAST_0, "hard": AT_LEAST_0, "size": AT_LEAST_0,
                "grpo_weight": AT_LEAST_0, "sft_weight": AT_LEAST_0, "epochs": AT_LEAST_0}


def _check_number(key: str, value, rule) -> None:
    test, meaning = rule
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (finite and test(value)):
        raise ConfigError(f"{key}: invalid value {value!r} (must be a finite number {meaning})")


def validate_numbers(cfg: Config) -> None:
    for key, rule in NUMERIC_RANGES.items():
        section, name = key.split(".")
        _check_number(key, getattr(getattr(cfg, section), name), rule)
    for i, stage in enumerate(cfg.rl.stages):
        for name, rule in STAGE_RANGES.items():
            _check_number(f"rl.stages[{i}].{name}", getattr(stage, name), rule)
    for i, w in enumerate(cfg.rl.token_weights):
        _check_number(f"rl.token_weights[{i}]", w, POSITIVE)
    for key in ("train_tail_share", "rl_pool_tail_share"):
        if getattr(cfg.data, key) is not None:
            _check_number(f"data.{key}", getattr(cfg.data, key), SHARE)


def validate(cfg: Config) -> None:
    validate_numbers(cfg)
    checks = [
        (cfg.rl.mode in ("mode_balanced", "stepwise_grpo", "grpo"), "rl.mode", cfg.rl.mode),
        (cfg.rl.gate in ("literal", "pred"), "rl.gate", cfg.rl.gate),
        (len(cfg.rl.token_weights) == 3, "rl.token_weights", cfg.rl.token_weights),
        (len(cfg.rl.stages) >= 1, "rl.stages", len(cfg.rl.stages)),
        (cfg.run.loss_backend in ("auto", "triton", "native", "torch"), "run.loss_backend", cfg.run.loss_backend),
        (cfg.run.engine in ("embedded", "sglang"), "run.engine", cfg.run.engine),
        (cfg.run.device in ("auto", "cpu", "cuda"), "run.device", cfg.run.device),
        (cfg.run.stop_after in ("", "sft", "difficulty"), "run.stop_after", cfg.run.stop_after),
        (cfg.model.dtype in ("float32", "bfloat16"), "model.dtype", cfg.model.dtype),
        (cfg.difficulty.correct in ("first_token", "verified_trace"), "difficulty.correct", cfg.difficulty.correct),
        (cfg.sft.target in ("trace", "grade"), "sft.target", cfg.sft.target),
        (cfg.sft.target == "trace" or cfg.run.stop_after == "sft",
         "sft.target=grade trains a grade-only model that writes no trace to verify: set run.stop_after=sft",
         cfg.run.stop_after),
        (cfg.model.num_heads % cfg.model.num_kv_heads == 0, "model.num_kv_heads (must divide model.num_heads)",
         cfg.model.num_kv_heads),
        (cfg.data.instructions in ("full", "short") or Path(cfg.data.instructions).exists(),
         "data.instructions (full, short, an existing text file or a model folder)", cfg.data.instructions),
        (cfg.rl.batch_prompts % cfg.rl.mini_batches == 0,
         "rl.mini_batches (must divide rl.batch_prompts)", cfg.rl.mini_batches),
        (cfg.rl.sglang.tp_size >= 1, "rl.sglang.tp_size", cfg.rl.sglang.tp_size),
        (0.0 < cfg.rl.sglang.mem_fraction_static < 1.0, "rl.sglang.mem_fraction_static (in (0, 1))",
         cfg.rl.sglang.mem_fraction_static),
        (cfg.rl.sglang.dtype in ("bfloat16", "float16", "float32", "auto"), "rl.sglang.dtype", cfg.rl.sglang.dtype),
        (1024 <= cfg.rl.sglang.port <= 65535, "rl.sglang.port", cfg.rl.sglang.port),
        (cfg.rl.sglang.start_timeout_s > 0 and cfg.rl.sglang.request_timeout_s > 0,
         "rl.sglang.start_timeout_s / request_timeout_s (> 0)",
         (cfg.rl.sglang.start_timeout_s, cfg.rl.sglang.request_timeout_s)),
        (cfg.rl.sglang.bucket_bytes >= 1 << 20, "rl.sglang.bucket_bytes (>= 1 MiB)", cfg.rl.sglang.bucket_bytes),
    ]
    d = cfg.difficulty
    checks += [
        (1 <= d.medium_min < d.easy_min <= d.group_size,
         "difficulty (need 1 <= medium_min < easy_min <= group_size)", (d.medium_min, d.easy_min, d.group_size)),
    ]
    for ok, key, value in checks:
        if not ok:
            raise ConfigError(f"{key}: invalid value {value!r}")
    check_eval_splits(cfg.eval.splits, cfg.data.dir)
    for i, st in enumerate(cfg.rl.stages):
        if st.easy + st.medium + st.hard <= 0:
            raise ConfigError(f"rl.stages[{i}]: composition easy/medium/hard must be >= 0 and not all 0")
    try:
        RewardConfig(gamma=cfg.rl.reward_ordinal_slope, gate=cfg.rl.gate)
    except ValueError as e:
        raise ConfigError(f"rl.reward_ordinal_slope / rl.gate: {e}") from None


SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")   # a split names a file, <name>.parquet


def check_eval_splits(splits, data_dir) -> None:
    """eval.splits names files: plain names, each once (case-insensitively, as a file system may
    compare them), and without data.dir only the splits the synthetic generator writes."""
    for name in splits:
        if not SPLIT_NAME.fullmatch(name):
            raise ConfigError(f"eval.splits: {name!r} is not a split name (letters, digits, _ and -; the split is "
                              f"read from <name>.parquet in data.dir)")
    if len({s.lower() for s in splits}) != len(splits):
        raise ConfigError(f"eval.splits: {list(splits)} names a split twice")
    unknown = [s for s in splits if s not in SYNTHETIC_SPLITS]
    if unknown and not data_dir:
        raise ConfigError(f"eval.splits: {', '.join(map(repr, unknown))}: data.dir is unset, so the data is synthetic "
                          f"and its only splits are {', '.join(SYNTHETIC_SPLITS)}; set data.dir to a folder holding "
                          f"train.parquet and {', '.join(s + '.parquet' for s in unknown)}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ----------------------------------------------------------------------------- distillation (afrl_fast/distill.py)

@dataclass
class TeacherConfig:
    path: str = ""                   # an exported model folder (save_pretrained), e.g. a run's final_model
    dtype: str = "auto"              # auto (as saved) | float32 | bfloat16


@dataclass
class DistillDataConfig:
    dir: str = ""                    # train.parquet and NAME.parquet per eval.splits name, e.g. the teacher run's data/ folder
    rulebook: Optional[str] = None      # None = the teacher folder's rulebook
    instructions: Optional[str] = None  # None = the teacher folder's system prompt, else full (full | short | a text file | a model folder)
    max_prompt_tokens: int = 4096
    max_response_tokens: int = 1024


@dataclass
class DistillSettings:
    # what the student learns to write (sequence level): teacher = a trace the teacher writes per training
    # pair (embedded engine); data = the train split's `trace` column (e.g. afrl_fast.synthesize output);
    # first_token = the grade token alone (a standard-scoring student, distilled on its first token only)
    traces: str = "teacher"
    # which teacher traces are kept: label = format and consistency gates pass, the boxed steps imply the
    # label and the final grade is the label (the synthesis consistency filter); valid = format and
    # consistency gates only (for pairs without trusted labels)
    keep: str = "label"
    trace_samples: int = 1           # teacher samples per pair; the shortest kept one is used
    trace_temperature: float = 0.0   # 0 = greedy
    max_new_tokens: int = 320
    # a teacher_traces.parquet shared by runs with the same teacher, data and trace settings: read when
    # it exists (settings checked), written there by the first run otherwise; "" = each run writes its own
    traces_cache: str = ""
    kind: str = "forward_kl"         # forward_kl (KL(teacher‖student)) | reverse_kl | jsd
    jsd_beta: float = 0.5
    temperature: float = 1.0         # τ of both distributions in the divergence
    first_token_weight: float = 1.0  # row weight of the grade position; every other trace position has 1
    hard_label_weight: float = 0.0   # + this × the student's cross-entropy on the trace tokens
    # × the divergence term: 0 with hard_label_weight > 0 is sequence-level distillation (the teacher's
    # traces learnt by cross-entropy alone, its logits unused)
    logit_weight: float = 1.0
    epochs: float = 3.0
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 0


@dataclass
class DistillRunConfig:
    out_dir: str = "runs/distill"
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda
    loss_backend: str = "auto"       # auto | triton | native | torch
    checkpoint_every: int = 20       # optimizer steps between checkpoints


@dataclass
class DistillConfig:
    run: DistillRunConfig = field(default_factory=DistillRunConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: ModelConfig = field(default_factory=ModelConfig)   # student.path, or a fresh architecture
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    distill: DistillSettings = field(default_factory=DistillSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)


DISTILL_RANGES = {
    "student.hidden_size": AT_LEAST_1, "student.num_layers": AT_LEAST_1, "student.num_heads": AT_LEAST_1,
    "student.num_kv_heads": AT_LEAST_1, "student.head_dim": AT_LEAST_1, "student.intermediate_size": AT_LEAST_1,
    "data.max_prompt_tokens": AT_LEAST_1, "data.max_response_tokens": AT_LEAST_1,
    "distill.trace_samples": AT_LEAST_1, "distill.trace_temperature": AT_LEAST_0, "distill.max_new_tokens": AT_LEAST_1,
    "distill.jsd_beta": (lambda v: 0 < v < 1, "in (0, 1)"), "distill.temperature": POSITIVE,
    "distill.first_token_weight": AT_LEAST_0, "distill.hard_label_weight": AT_LEAST_0,
    "distill.logit_weight": AT_LEAST_0, "distill.epochs": AT_LEAST_0,
    "distill.batch_size": AT_LEAST_1, "distill.lr": POSITIVE, "distill.warmup_steps": AT_LEAST_0,
    "distill.weight_decay": AT_LEAST_0, "distill.grad_clip": AT_LEAST_0, "distill.micro_batch_size": AT_LEAST_0,
    "eval.max_rows": AT_LEAST_0, "eval.batch_size": AT_LEAST_1, "run.seed": AT_LEAST_0,
    "run.checkpoint_every": AT_LEAST_0,
}


def load_distill_config(path: str | Path | None, overrides: list[str] = ()) -> DistillConfig:
    cfg = load_structured(DistillConfig, path, overrides)
    for key, rule in DISTILL_RANGES.items():
        section, name = key.split(".")
        _check_number(key, getattr(getattr(cfg, section), name), rule)
    d = cfg.distill
    checks = [
        (bool(cfg.teacher.path), "teacher.path (the teacher's exported model folder)", cfg.teacher.path),
        (bool(cfg.data.dir), "data.dir (the folder with train.parquet and the eval.splits files)", cfg.data.dir),
        (cfg.teacher.dtype in ("auto", "float32", "bfloat16"), "teacher.dtype", cfg.teacher.dtype),
        (cfg.student.dtype in ("float32", "bfloat16"), "student.dtype", cfg.student.dtype),
        (d.traces in ("teacher", "data", "first_token"), "distill.traces", d.traces),
        (d.keep in ("label", "valid"), "distill.keep", d.keep),
        (d.kind in ("forward_kl", "reverse_kl", "jsd"), "distill.kind", d.kind),
        (d.logit_weight + d.hard_label_weight > 0, "distill.logit_weight + distill.hard_label_weight (> 0: the "
         "student must learn from something)", (d.logit_weight, d.hard_label_weight)),
        (cfg.student.num_heads % cfg.student.num_kv_heads == 0, "student.num_kv_heads (must divide num_heads)",
         cfg.student.num_kv_heads),
        (cfg.run.loss_backend in ("auto", "triton", "native", "torch"), "run.loss_backend", cfg.run.loss_backend),
        (cfg.run.device in ("auto", "cpu", "cuda"), "run.device", cfg.run.device),
    ]
    for ok, key, value in checks:
        if not ok:
            raise ConfigError(f"{key}: invalid value {value!r}")
    check_eval_splits(cfg.eval.splits, cfg.data.dir)
    return cfg


# ----------------------------------------------------------------------------- comparing configs

def config_differences(saved: dict, current: dict, most: int = 6) -> str:
    """The dotted keys where two (comparable) configs differ, with both values; "" when they agree."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    a, b = flat(saved), flat(current)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in diff[:most])


def check_same_config(saved: dict, current: dict, where: Path) -> None:
    diff = config_differences(saved, current)
    if diff:
        raise ConfigError(f"{where}: cannot resume, the config differs from the checkpoint's in {diff}")


def comparable_config(cfg, run_switches=("out_dir", "device")) -> dict:
    """The config a checkpoint must match to be resumed: all of it but the `run` keys that only say
    where and how this attempt runs."""
    d = json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg)), default=str))
    for key in run_switches:
        d["run"].pop(key, None)
    return d
