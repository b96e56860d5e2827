"""One side of benchmarks/bench_vs_trl.py in a fresh process: prints one JSON line.

    python benchmarks/_vs_trl_worker.py prepare WORK_DIR        # the shared judge and prompt batch
    python benchmarks/_vs_trl_worker.py ours WORK_DIR STEPS     # afrl_fast.rl.step, STEPS times
    python benchmarks/_vs_trl_worker.py trl WORK_DIR STEPS      # TRL GRPOTrainer.train(), STEPS steps

Both sides read the same settings (`bench_config`: the demo config with plain GRPO), the same model
folder (WORK_DIR/judge) and the same prompts (WORK_DIR/batch.json), and report per step: wall
seconds, generated tokens, seconds spent generating, mean reward and mean response length, plus the
process's peak resident set (ru_maxrss) at the end. bench_vs_trl.py's docstring says how the two
sides were made comparable.

benchmarks/gpu_check.py calls `prepare`, `run_ours` and `run_trl` in its own process with
device="cuda", a larger model (`overrides`) and no memorisation (memorize_steps=0: a random model).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("afrl_fast") is None:
    sys.path.append(str(ROOT))          # an uninstalled checkout: last, so it shadows nothing installed

from afrl_fast.config import DEMO_CONFIG, load_config  # noqa: E402
from afrl_fast.format import build_prompt, instructions_text, load_tokenizer  # noqa: E402
from afrl_fast.rulebook import load_rulebook  # noqa: E402

try:                    # benchmarks/_quick.py: AFRL_BENCH_QUICK=1 shrinks the benchmark (bench_vs_trl.py)
    from _quick import choose
except ImportError:     # imported from elsewhere without benchmarks/ on sys.path: full sizes
    def choose(full, quick_value):
        return full

N_PROMPTS = choose(4, 2)   # prompts per step (× G = 8: 32 responses); 2 in quick mode
# The judge: the demo architecture trained on one pair until it reproduces the pair's trace closely,
# so sampled responses are AFRL-shaped (most stop with EOS, some pass the verifier) instead of 200
# tokens of noise. A cheap stand-in for a real SFT model: the demo's SFT takes minutes.
MEMORIZE_LR, MEMORIZE_STEPS, MEMORIZE_TARGET_CE = 1e-2, choose(80, 2), 0.02


def bench_config(n_prompts: int = N_PROMPTS, overrides=(), device: str = "cpu"):
    """The settings both sides run: the demo (model, tokenizer, data, rl.max_new_tokens, rl.lr, β, …)
    with plain GRPO — no token weights, no SFT anchor — on 4 prompts × G = 8. `overrides` (dotted, the
    caller's) and then AFRL_BENCH_OVERRIDES (space-separated dotted overrides, e.g.
    rl.max_new_tokens=16 for a smoke run) apply to both sides."""
    extra = os.environ.get("AFRL_BENCH_OVERRIDES", "").split()
    return load_config(DEMO_CONFIG, ["rl.mode=grpo", f"rl.batch_prompts={n_prompts}", "rl.mini_batches=1",
                                     "rl.micro_batch_size=0", f"run.device={device}", "run.engine=embedded",
                                     *overrides, *extra])


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def emit(result: dict) -> None:
    print(json.dumps({**result, "peak_rss": peak_rss_bytes(), "threads": torch.get_num_threads()}), flush=True)


# ------------------------------------------------------------------------------------------ prepare

def prepare(work: Path, n_prompts: int = N_PROMPTS, overrides=(), device: str = "cpu",
            memorize_steps: int = MEMORIZE_STEPS) -> dict:
    """WORK_DIR/batch.json (the prompts as text and ids, their labels) and WORK_DIR/judge (an HF
    model folder with the tokenizer). memorize_steps=0 saves the freshly initialised model."""
    from afrl_fast.data import synthesize
    from afrl_fast.loss import LossRows
    from afrl_fast.optim import make_optimizer, optimizer_step
    from afrl_fast.policy import LossSettings, PolicyLoss, build_lm, loss_backward
    from afrl_fast.run_data import QWEN_VOCAB

    cfg = bench_config(n_prompts, overrides, device)
    torch.manual_seed(cfg.run.seed)
    rulebook, tokenizer = load_rulebook(cfg.data.rulebook), load_tokenizer(cfg.model.tokenizer)
    instructions = instructions_text(rulebook, cfg.data.instructions)
    pairs = synthesize(n_prompts, cfg.data.seed, rulebook, "train", reasons=cfg.data.reasons)
    queries, docs = pairs.column("query").to_pylist(), pairs.column("document").to_pylist()
    texts = [build_prompt(tokenizer, rulebook, q, d, instructions) for q, d in zip(queries, docs)]
    batch = {"prompt_text": texts, "prompt_ids": [tokenizer.encode(t, add_special_tokens=False) for t in texts],
             "labels": pairs.column("label").to_pylist()}

    dev = torch.device(device)
    with dev:                                   # initialised where it runs (a CPU init of a big model is slow)
        lm = build_lm(cfg.model, QWEN_VOCAB)
    policy = PolicyLoss(lm, cfg.run.loss_backend)
    optimizer = make_optimizer(policy, MEMORIZE_LR, 0.0)
    prompt = batch["prompt_ids"][:1]
    trace = [tokenizer.encode(pairs.column("trace")[0].as_py(), add_special_tokens=False) + [tokenizer.eos_token_id]]
    rows = LossRows.sft(len(trace[0]), 1.0 / len(trace[0]))     # token-mean cross-entropy
    t0 = time.perf_counter()
    steps, ce = 0, None
    for steps in range(1, memorize_steps + 1):
        stats, _ = loss_backward(policy, prompt, trace, rows, LossSettings(), pad_id=tokenizer.pad_token_id,
                                 device=dev)
        optimizer_step(policy, optimizer, 1.0)
        ce = stats.loss
        if ce < MEMORIZE_TARGET_CE:
            break
    work.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(work / "judge")
    tokenizer.save_pretrained(work / "judge")
    (work / "batch.json").write_text(json.dumps(batch))
    m = cfg.model
    return {"judge_steps": steps, "judge_ce": ce, "judge_s": time.perf_counter() - t0,
            "prompt_len": [len(p) for p in batch["prompt_ids"]], "trace_len": len(trace[0]),
            "group_size": cfg.rl.group_size, "max_new_tokens": cfg.rl.max_new_tokens,
            "model": f"Qwen3 hidden {m.hidden_size}, {m.num_layers} layers, V={QWEN_VOCAB:,}"}


# ------------------------------------------------------------------------------------------ ours

def run_ours(work: Path, steps: int, overrides=(), device: str = "cpu") -> dict:
    """The trainer's own step: RLContext built the way afrl_fast/train.py builds it (a run started
    from an SFT model: policy and frozen reference both from it), then rl.step on the batch."""
    from transformers import AutoModelForCausalLM

    from afrl_fast import dist as D
    from afrl_fast.curriculum import Stage
    from afrl_fast.observe import Timer
    from afrl_fast.optim import make_optimizer
    from afrl_fast.rl import RLContext, step
    from afrl_fast.rollouts import TrainerEngine
    from afrl_fast.run_data import QWEN_VOCAB
    from afrl_fast.run_policy import build_policy, build_ref_policy

    batch = json.loads((work / "batch.json").read_text())
    n_prompts = len(batch["prompt_ids"])
    cfg = bench_config(n_prompts, overrides, device)
    info = D.init_distributed(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    rulebook, tokenizer = load_rulebook(cfg.data.rulebook), load_tokenizer(cfg.model.tokenizer)
    state = AutoModelForCausalLM.from_pretrained(work / "judge", dtype=torch.float32).state_dict()
    with info.device:                           # built on the device it runs on, then the judge's weights
        policy = build_policy(cfg, QWEN_VOCAB, info, state)
        ref = build_ref_policy(cfg, policy, info, state)
    del state
    ctx = RLContext(cfg=cfg, info=info, policy=policy, ref_policy=ref,
                    engine=TrainerEngine(cfg.run.engine, policy, tokenizer, info, work / "engine_init",
                                         seed=cfg.run.seed),
                    optimizer=make_optimizer(policy, cfg.rl.lr, cfg.rl.weight_decay), tokenizer=tokenizer,
                    rulebook=rulebook, prompts=batch["prompt_ids"], labels=batch["labels"], sft_examples=[],
                    pad_id=tokenizer.pad_token_id, timer=Timer())
    # α_t = 1: the loss is the plain token mean over the batch, as TRL's; plain GRPO has no SFT term
    stage = Stage("bench", list(range(n_prompts)), grpo_weight=1.0, sft_weight=0.0, composition={})
    rows = []
    for s in range(steps):
        t0 = time.perf_counter()
        out = step(ctx, stage, list(range(n_prompts)), s + 1)
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        ro = out.rollouts
        rows.append({"wall_s": wall, "tokens": ro.n_tokens, "gen_s": out.record["time/rollout"],
                     "reward": float(ro.result.reward.mean()), "resp_len": ro.n_tokens / len(ro.response_ids),
                     "finished": sum(ro.finished) / len(ro.finished)})
    ctx.engine.shutdown()
    return {"side": "ours", "steps": rows}


# ------------------------------------------------------------------------------------------ TRL

def run_trl(work: Path, steps: int, overrides=(), device: str = "cpu") -> dict:
    """TRL's GRPOTrainer.train() for `steps` optimizer steps on the same batch, settings mapped
    from bench_config() option by option."""
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from afrl_fast.engines import resolve_eos_ids
    from afrl_fast.verify import RewardConfig, verify_batch

    batch = json.loads((work / "batch.json").read_text())
    n_prompts = len(batch["prompt_ids"])
    cfg = bench_config(n_prompts, overrides, device)
    rl = cfg.rl
    if device == "cpu":
        # the thread count afrl_fast.dist.init_distributed gives our side on one process
        torch.set_num_threads(os.cpu_count() or 1)
    rulebook, tokenizer = load_rulebook(cfg.data.rulebook), load_tokenizer(cfg.model.tokenizer)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(work / "judge", dtype=torch.float32,
                                                 attn_implementation=cfg.model.attn_implementation)
    eos_ids = resolve_eos_ids(tokenizer, model)
    model.generation_config.eos_token_id = eos_ids      # stop on exactly the ids our engine stops on
    for text, ids in zip(batch["prompt_text"], batch["prompt_ids"]):
        if tokenizer(text=text)["input_ids"] != ids:     # what TRL's _tokenize_prompts will feed generate
            raise RuntimeError("TRL would tokenize a prompt differently from the trainer")

    reward_cfg = RewardConfig(gate=rl.gate, gamma=rl.reward_ordinal_slope)
    per_step = []

    def afrl_verifier(prompts, completions, completion_ids, label, **_):
        """The project's reward on the text our trainer verifies: special tokens kept, the closing
        EOS dropped (TRL's `completions` strip special tokens, so they are not used)."""
        texts = [tokenizer.decode(ids[:-1] if ids and ids[-1] in eos_ids else ids, skip_special_tokens=False)
                 for ids in completion_ids]
        reward = verify_batch(texts, label, rulebook, reward_cfg).reward
        n_tok = sum(len(ids) for ids in completion_ids)
        per_step.append({"tokens": n_tok, "reward": float(reward.mean()), "resp_len": n_tok / len(completion_ids),
                         "finished": sum(bool(ids) and ids[-1] in eos_ids for ids in completion_ids)
                         / len(completion_ids)})
        return reward.tolist()

    gen_s = []

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with a stopwatch around its generation call (model.generate and the EOS mask)."""

        def _generate_single_turn(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super()._generate_single_turn(*args, **kwargs)
            finally:
                gen_s.append(time.perf_counter() - t0)

    marks = []

    class StepClock(TrainerCallback):
        """Wall-clock marks at the start of training and after every optimizer step."""

        def on_train_begin(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available() and device != "cpu":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    G = rl.group_size
    # later transformers 5.x (after 5.18) renamed TrainingArguments.gradient_checkpointing to activation_checkpointing
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = GRPOConfig(
        output_dir=str(work / "trl_out"), use_cpu=device == "cpu", bf16=False, fp16=False, report_to="none",
        disable_tqdm=True, save_strategy="no", logging_steps=1, seed=cfg.run.seed, dataloader_num_workers=0,
        # the batch: 4 prompts × G completions per step, one optimizer update per rollout batch, in order
        per_device_train_batch_size=n_prompts * G, gradient_accumulation_steps=1, num_generations=G,
        num_iterations=1, max_steps=steps, shuffle_dataset=False,
        # generation through model.generate (no vLLM), our sampling settings
        use_vllm=False, max_completion_length=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p,
        top_k=0, repetition_penalty=1.0,
        # the loss: clipped ratio + β·k3 (no importance weight on the KL, as ours), token mean over the batch
        beta=rl.kl_coef, epsilon=rl.eps_low, epsilon_high=rl.eps_high, loss_type="dapo",
        use_bias_correction_kl=False, scale_rewards="group" if rl.adv_std_norm else "none",
        mask_truncated_completions=False,
        # the optimizer: AdamW at a constant rate, global-norm clipping, fp32, no checkpointing
        learning_rate=rl.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=rl.weight_decay,
        max_grad_norm=rl.grad_clip, optim="adamw_torch", **{checkpointing: cfg.model.gradient_checkpointing},
    )
    dataset = Dataset.from_dict({"prompt": batch["prompt_text"] * steps, "label": batch["labels"] * steps})
    trainer = TimedGRPOTrainer(model=model, reward_funcs=afrl_verifier, args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[StepClock()])
    trainer.train()
    walls = [b - a for a, b in zip(marks, marks[1:])]
    if not len(walls) == len(gen_s) == len(per_step) == steps:
        raise RuntimeError(f"expected {steps} steps, saw {len(walls)} / {len(gen_s)} / {len(per_step)}")
    rows = [{"wall_s": w, "gen_s": g, **p} for w, g, p in zip(walls, gen_s, per_step)]
    return {"side": "trl", "trl_version": trl.__version__, "steps": rows}


if __name__ == "__main__":
    mode, work = sys.argv[1], Path(sys.argv[2])
    if mode == "prepare":
        emit(prepare(work))
    elif mode in ("ours", "trl"):
        emit((run_ours if mode == "ours" else run_trl)(work, int(sys.argv[3])))
    else:
        raise SystemExit(f"unknown mode {mode!r}: prepare | ours | trl")
