"""Mode-Balanced RL (paper §3.5, Algorithm 1): one step, and the curriculum phase that runs the steps.

`step(ctx, stage, batch, step_no)` reads top to bottom as the algorithm:

    1. this rank's share of the global batch's prompts, cut into mini-batches      (here)
    2. G rollouts per prompt from the engine, prefix shared across the group       rollouts.py, engines/
    3. verify every response: gates, ŷ, reward, spans of the critical values       verify.py
    4. group-normalised advantages times the stepwise token weights                grpo.py
    5. reference log-probs; old log-probs from the trainer's own forward, or —      policy.py
       one update per rollout batch — from the loss pass itself (ratio ≡ 1)
    6. per mini-batch: L = α_t·L_GRPO + γ_t·L_SFT through the fused loss over RL   policy.py, loss.py
       rows and SFT rows together, backward, AdamW with gradient clipping          optim.py
    7. push the new weights to the rollout engine                                  rollouts.py

α_t / γ_t are the stage's `grpo_weight` / `sft_weight` (paper Table 8); the KL coefficient β of the
k3 term is `rl.kl_coef`. Token-mean aggregation across the global batch: RL rows carry scale
α_t·world/#RL tokens and SFT rows γ_t·world/#SFT tokens, where the counts are summed over ranks
(FSDP averages gradients over ranks), so the gradient is that of the global token mean whatever the
number of ranks or micro-batches. Plain GRPO (`rl.mode=grpo`) drops the token weights and the SFT
term; Stepwise-GRPO (`stepwise_grpo`) keeps the weights and drops the SFT term.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from . import dist as D
from .curriculum import Stage, build_stages, load_buckets, stage_batch, stage_schedule, with_failed_prompts
from .grpo import critical_token_mask, rollout_token_advantages
from .loss import LossRows
from .observe import Timer, log, progress_bar
from .optim import optimizer_step
from .policy import LossSettings, LossStats, forward_logprobs, loss_backward
from .rollouts import STREAM_RL, Rollouts, TrainerEngine, generate_rollouts, prompt_seed
from .verify import RewardConfig, verify_batch


@dataclass
class RLContext:
    """Everything a step reads besides the stage and its prompts."""
    cfg: object                        # the run's Config (rl.*, run.seed)
    info: D.DistInfo
    policy: torch.nn.Module            # PolicyLoss, trained
    ref_policy: torch.nn.Module        # PolicyLoss, frozen: the SFT model
    engine: TrainerEngine
    optimizer: torch.optim.Optimizer
    tokenizer: object
    rulebook: object
    prompts: list[list[int]]           # token ids of every RL prompt (the training split)
    labels: list[int]
    sft_examples: list[tuple[list[int], list[int]]]   # (prompt, trace + EOS) of the SFT anchor
    pad_id: int
    timer: Timer

    @property
    def reward(self) -> RewardConfig:
        return RewardConfig(gate=self.cfg.rl.gate, gamma=self.cfg.rl.reward_ordinal_slope)

    @property
    def loss_settings(self) -> LossSettings:
        rl = self.cfg.rl
        return LossSettings(kl_coef=rl.kl_coef, eps_low=rl.eps_low, eps_high=rl.eps_high,
                            temperature=rl.temperature)


@dataclass
class MiniBatch:
    """The RL rows of one optimizer update on this rank: its prompt groups' responses and the
    per-token advantages and log-probs, in response order (old_logp None: on-policy)."""
    prompts: list[list[int]]
    responses: list[list[int]]
    advantages: np.ndarray
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor
    engine_logp: torch.Tensor
    critical: torch.Tensor             # bool per token: the decisions (grpo.critical_token_mask)

    @property
    def n_tokens(self) -> int:
        return sum(len(r) for r in self.responses)


@dataclass
class StepStats:
    """Sums over this rank's rollouts and updates of one step; `reduce` sums them over ranks."""
    responses: float = 0.0
    reward: float = 0.0
    reward_sq: float = 0.0
    fmt: float = 0.0
    cst: float = 0.0
    logic: float = 0.0
    correct_first_token: float = 0.0
    wrong_grade: float = 0.0           # well-formed responses that answered a wrong grade
    tokens: float = 0.0
    dlogp_engine: float = 0.0
    entropy_rl: float = 0.0
    entropy_critical: float = 0.0
    critical_tokens: float = 0.0
    clipped: float = 0.0
    kl: float = 0.0
    rl_rows: float = 0.0
    loss: float = 0.0
    grad_norm: float = 0.0
    updates: float = 0.0

    @staticmethod
    def of_rollouts(ro: Rollouts) -> "StepStats":
        res = ro.result
        reward = res.reward.astype(np.float64)
        return StepStats(responses=len(ro.response_ids), reward=float(reward.sum()),
                         reward_sq=float((reward ** 2).sum()), fmt=float(res.fmt.sum()), cst=float(res.cst.sum()),
                         logic=float(res.logic.sum()), correct_first_token=float((res.y_dec == ro.labels).sum()),
                         wrong_grade=float((res.fmt & (res.y_dec != ro.labels)).sum()), tokens=float(ro.n_tokens))

    def add_update(self, loss: LossStats, grad_norm: float, dlogp_engine: float) -> None:
        self.dlogp_engine += dlogp_engine
        self.entropy_rl += loss.entropy_rl
        self.entropy_critical += loss.entropy_critical
        self.critical_tokens += loss.n_critical
        self.clipped += loss.clipped
        self.kl += loss.kl_sum
        self.rl_rows += loss.n_rl
        self.loss += loss.loss
        self.grad_norm += grad_norm
        self.updates += 1

    def reduce(self, device) -> "StepStats":
        names = [f.name for f in fields(self)]
        # grad norms are global already (every rank computed the same one): average, not sum
        total = StepStats(*D.all_reduce_sum([getattr(self, n) for n in names], device))
        total.grad_norm, total.updates = self.grad_norm, self.updates
        return total

    def record(self, world: int) -> dict:
        """Per-step metrics, grouped by what they describe."""
        n = max(self.responses, 1)
        rows = max(self.rl_rows, 1)
        mean = self.reward / n
        return {"reward/mean": mean, "reward/std": math.sqrt(max(self.reward_sq / n - mean ** 2, 0.0)),
                "gate/fmt": self.fmt / n, "gate/cst": self.cst / n, "gate/logic": self.logic / n,
                "acc/first_token": self.correct_first_token / n,
                # where the reward was lost: a broken format (−1) or a well-formed wrong grade
                "reward/fmt_fail": 1.0 - self.fmt / n, "reward/wrong_grade": self.wrong_grade / n,
                "policy/entropy": self.entropy_rl / rows, "policy/kl": self.kl / rows,
                "policy/entropy_critical": self.entropy_critical / max(self.critical_tokens, 1),
                "policy/clip_frac": self.clipped / rows,
                "policy/dlogp_engine": self.dlogp_engine / max(self.tokens, 1),
                "response/len": self.tokens / n,
                # each rank's loss carries the factor world (FSDP averages gradients over ranks)
                "loss": self.loss / world, "optim/grad_norm": self.grad_norm / max(self.updates, 1)}


def split_even(n: int, parts: int) -> list[range]:
    """[0, n) cut into `parts` consecutive ranges whose sizes differ by at most one."""
    return [range(k * n // parts, (k + 1) * n // parts) for k in range(parts)]


def minibatch(ro: Rollouts, tok_adv: np.ndarray, critical: np.ndarray, old_logp, ref_logp,
              groups: range) -> MiniBatch:
    """The responses of the given prompt groups, with their per-token advantages and log-probs."""
    resp = ro.rows_of(groups)
    starts = np.concatenate([[0], np.cumsum([len(r) for r in ro.response_ids])]).astype(np.int64)
    tok = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in resp]) if resp else np.zeros(0, np.int64)
    tok_t = torch.as_tensor(tok, dtype=torch.long)
    engine = torch.tensor([x for i in resp for x in ro.engine_logp[i]], dtype=torch.float32)
    return MiniBatch([ro.prompt_ids[i] for i in resp], [ro.response_ids[i] for i in resp], tok_adv[tok],
                     None if old_logp is None else old_logp[tok_t], ref_logp[tok_t], engine,
                     torch.as_tensor(critical[tok], dtype=torch.bool))


def mode_balanced_rows(advantages, old_logp, ref_logp, n_sft: int, *, grpo_weight: float, sft_weight: float,
                       n_rl_global: float, n_sft_global: float, world: int) -> LossRows:
    """Rows of L = α_t·L_GRPO + γ_t·L_SFT (Eq. 8) as token means over the global batch: this rank's RL
    rows with scale α_t·world/#RL tokens, then its n_sft SFT rows with γ_t·world/#SFT tokens."""
    return LossRows.cat([LossRows.rl(advantages, old_logp, ref_logp, grpo_weight * world / max(n_rl_global, 1.0)),
                         LossRows.sft(n_sft, sft_weight * world / max(n_sft_global, 1.0))])


@dataclass
class StepResult:
    record: dict                 # the step's metrics, reduced over ranks
    rollouts: Rollouts           # this rank's verified rollouts
    failed_prompts: list[int]    # prompts of the global batch none of whose rollouts earned the full reward


def unsolved_prompts(ro: Rollouts) -> list[int]:
    """Prompt indices (every rank's) whose G responses all missed the full reward: right grade with
    the format, consistency and logic gates passing."""
    res = ro.result
    full = res.fmt & res.cst & res.logic & (res.y_dec == ro.labels)
    solved = ro.by_group(full).any(axis=1)
    local = [p for p, ok in zip(ro.group_prompts(), solved) if not ok]
    return [i for part in D.all_gather_objects(local) for i in part]


BUCKETS = ("easy", "medium", "hard")


def bucket_accuracy(ro: Rollouts, bucket_of: dict, device) -> dict:
    """First-token accuracy of the step's rollouts per difficulty bucket of their prompts (summed over
    ranks): does RL fix the Hard prompts, or only polish the Easy ones? A bucket no rollout of this
    step came from is left out."""
    correct = (ro.result.y_dec == ro.labels)
    sums = []
    for b in BUCKETS:
        mine = np.array([bucket_of.get(i) == b for i in ro.prompt_index], dtype=bool)
        sums += [float(correct[mine].sum()), float(mine.sum())]
    sums = D.all_reduce_sum(sums, device)
    return {f"acc/{b}": sums[2 * k] / sums[2 * k + 1] for k, b in enumerate(BUCKETS) if sums[2 * k + 1]}


def step(ctx: RLContext, stage: Stage, batch: list[int], step_no: int, draw: int | None = None) -> StepResult:
    """One Mode-Balanced RL step over the global batch of prompt indices `batch`. `step_no` numbers the
    step in the run's log; `draw` (default `step_no`) keys its random draws, the RL phase's own step
    count, so RL after SFT in one process samples what RL started from that SFT folder does."""
    draw = step_no if draw is None else draw
    rl, info, timer = ctx.cfg.rl, ctx.info, ctx.timer
    t0 = time.perf_counter()
    G = rl.group_size
    grpo_weight = stage.grpo_weight
    sft_weight = stage.sft_weight if rl.mode == "mode_balanced" else 0.0

    # 1. Global mini-batches first, then each split over ranks: the same updates on any world size.
    mb_positions = [D.rank_slice(list(r), info) for r in split_even(len(batch), rl.mini_batches)]
    positions = [p for mb in mb_positions for p in mb]
    local = [batch[p] for p in positions]

    # 2. Rollouts; seeds keyed by the position in the global batch: a prompt drawn twice samples twice.
    with timer("rollout"):
        ro = generate_rollouts(ctx.engine, ctx.tokenizer, local, [ctx.prompts[i] for i in local],
                               [ctx.labels[i] for i in local], group_size=G, temperature=rl.temperature,
                               top_p=rl.top_p, max_new_tokens=rl.max_new_tokens,
                               seeds=[prompt_seed(ctx.cfg.run.seed, STREAM_RL, draw, p) for p in positions])
        ctx.engine.release_memory()

    # 3. The gated reward of every response.
    with timer("verify"):
        ro.result = verify_batch(ro.texts, ro.labels, ctx.rulebook, ctx.reward)

    # 4. Group advantages, times λ at the decision, the boxed values of steps 4-8 and the final grade.
    with timer("advantages"):
        weights = None if rl.mode == "grpo" else tuple(rl.token_weights)
        tok_adv = rollout_token_advantages(ro, ctx.tokenizer, rl.adv_std_norm, weights)
        critical = critical_token_mask(ro, ctx.tokenizer)

    # 5. Log-probs of the sampled tokens under the reference and, with several updates per rollout
    #    batch, under the sampling (old) policy; with one update the loss pass supplies the latter.
    on_policy = rl.on_policy_shortcut and rl.mini_batches == 1
    with timer("logprobs"):
        lp_args = dict(pad_id=ctx.pad_id, temperature=rl.temperature, device=info.device,
                       micro_batch=rl.micro_batch_size)
        old_logp = None if on_policy else forward_logprobs(ctx.policy, ro.prompt_ids, ro.response_ids, **lp_args)
        ref_logp = forward_logprobs(ctx.ref_policy, ro.prompt_ids, ro.response_ids, **lp_args)
    stats = StepStats.of_rollouts(ro)

    # 6. One update per mini-batch: RL rows and this mini-batch's share of the SFT anchor batch.
    sft_global = np.random.default_rng([ctx.cfg.run.seed, draw, 7]).choice(
        len(ctx.sft_examples), rl.sft_batch, replace=len(ctx.sft_examples) < rl.sft_batch).tolist() \
        if sft_weight > 0 else []
    first_group = 0
    for mb_index, mb_pos in enumerate(mb_positions):
        groups = range(first_group, first_group + len(mb_pos))
        first_group += len(mb_pos)
        mb = minibatch(ro, tok_adv, critical, old_logp, ref_logp, groups)
        sft_mb = [ctx.sft_examples[sft_global[p]] for p in
                  D.rank_slice(list(split_even(len(sft_global), rl.mini_batches)[mb_index]), info)]
        n_sft_local = sum(len(e[1]) for e in sft_mb)
        n_rl, n_sft = D.all_reduce_sum([float(mb.n_tokens), float(n_sft_local)], info.device)
        if n_rl + n_sft == 0:
            continue  # nothing anywhere in this mini-batch: no step, so AdamW's decay does not move the weights
        with timer("loss"):
            rows = mode_balanced_rows(mb.advantages, mb.old_logp, mb.ref_logp, n_sft_local, grpo_weight=grpo_weight,
                                      sft_weight=sft_weight, n_rl_global=n_rl, n_sft_global=n_sft, world=info.world)
            loss, pass_logp = loss_backward(ctx.policy, mb.prompts + [e[0] for e in sft_mb],
                                            mb.responses + [e[1] for e in sft_mb], rows, ctx.loss_settings,
                                            pad_id=ctx.pad_id, device=info.device, micro_batch=rl.micro_batch_size,
                                            critical=torch.cat([mb.critical, torch.zeros(n_sft_local, dtype=torch.bool)]))
        # the engine's log-probs against the trainer's for the same tokens and weights: a health check
        trainer_logp = pass_logp[:mb.n_tokens] if mb.old_logp is None else mb.old_logp
        dlogp = float((mb.engine_logp - trainer_logp).abs().sum()) if mb.n_tokens else 0.0
        with timer("optimizer"):
            global_loss = D.all_reduce_sum([loss.loss], info.device)[0]     # every rank refuses together
            stats.add_update(loss, optimizer_step(ctx.policy, ctx.optimizer, rl.grad_clip, loss=global_loss), dlogp)

    # 7. The engine samples the next step from the new weights.
    with timer("sync"):
        ctx.engine.sync()

    total = stats.reduce(info.device)
    failed = unsolved_prompts(ro)
    dt = time.perf_counter() - t0
    record = {"step": step_no, "phase": "rl", "stage": stage.name, "weight/grpo": grpo_weight,
              "weight/sft": sft_weight, **total.record(info.world), "acc/unsolved_prompts": len(failed) / len(batch),
              "throughput/tokens_per_s": total.tokens / dt, **timer.pop()}
    return StepResult(record, ro, failed)


def gather_rollout_log(ro: Rollouts, info) -> dict | None:
    """Every rank's rollouts of a step as one table's columns (on rank 0; None elsewhere)."""
    res = ro.result
    part = {"prompt_index": ro.prompt_index, "response": ro.texts, "label": ro.labels.tolist(),
            "reward": res.reward.tolist(), "fmt": res.fmt.tolist(), "cst": res.cst.tolist(),
            "logic": res.logic.tolist(), "y_dec": res.y_dec.tolist(), "y_hat": res.y_hat.tolist()}
    parts = D.all_gather_objects(part)
    return {k: [x for p in parts for x in p[k]] for k in part} if info.is_main else None


def train_rl(ctx: RLContext, difficulty_path, progress: dict, *, runlog, evaluate, checkpoint) -> None:
    """The curriculum (paper §3.6): stages built from the difficulty buckets, one step per batch of a
    stage, from `progress["phase_step"]` on. With rl.fold_failed_into_last_stage the last stage is
    scheduled only when it starts, with the prompts the earlier stages failed on added to it (they
    are kept in `progress`, so a resumed run schedules the same stage). Each step is logged (metrics
    and rollouts); every eval.every steps `evaluate()` runs, every run.checkpoint_every steps
    `checkpoint(optimizer)`."""
    cfg, rl = ctx.cfg, ctx.cfg.rl
    buckets = load_buckets(difficulty_path)
    bucket_of = {i: b for b, members in buckets.items() for i in members}
    stages = build_stages(buckets, rl.stages, cfg.run.seed, rl.random_order)
    epochs = [s.epochs for s in rl.stages]
    fold = rl.fold_failed_into_last_stage and len(stages) > 1
    failed = progress.setdefault("failed_prompts", [])
    plan = stage_schedule(stages[:-1] if fold else stages, rl.batch_prompts, epochs)
    limit = rl.max_steps or math.inf
    log.info("curriculum: %s; %d RL steps%s", [(s.name, s.composition) for s in stages],
             len(plan) + (len(stage_schedule(stages[-1:], rl.batch_prompts, epochs[-1:])) if fold else 0),
             " before the failed prompts join the last stage" if fold else "")
    # closed on an error too, so the trainer's error line starts on a line of its own
    with progress_bar(total=min(len(plan), limit), initial=progress["phase_step"], desc="rl",
                      enabled=ctx.info.is_main) as bar:
        t = progress["phase_step"]
        pending_last = fold            # the last stage still to be scheduled
        while True:
            if pending_last and t >= len(plan):
                pending_last = False
                stages[-1] = with_failed_prompts(stages[-1], failed, cfg.run.seed)
                last = stage_schedule(stages[-1:], rl.batch_prompts, epochs[-1:])
                plan += [(len(stages) - 1, j) for _, j in last]
                log.info("%s: %s", stages[-1].name, stages[-1].composition)
                bar.total = min(len(plan), limit)
            if t >= min(len(plan), limit):
                break
            stage_index, batch_index = plan[t]
            stage = stages[stage_index]
            out = step(ctx, stage, stage_batch(stage, batch_index, rl.batch_prompts), progress["step"] + 1, draw=t + 1)
            if stage_index < len(stages) - 1:
                failed[:] = sorted(set(failed) | set(out.failed_prompts))
            t += 1
            progress["step"], progress["phase_step"] = out.record["step"], t
            runlog.write({**out.record, **bucket_accuracy(out.rollouts, bucket_of, ctx.info.device)})
            rollouts = gather_rollout_log(out.rollouts, ctx.info)
            if rollouts is not None:
                runlog.write_rollouts(out.record["step"], rollouts)
            bar.update(1)
            bar.set_postfix(stage=stage.name, reward=f"{out.record['reward/mean']:.3f}")
            more = t < limit and (t < len(plan) or pending_last)
            if cfg.eval.every and t % cfg.eval.every == 0 and more:
                evaluate()
            if cfg.run.checkpoint_every and t % cfg.run.checkpoint_every == 0 and more:
                checkpoint(ctx.optimizer)
    if not plan:
        log.warning("no RL step ran: every difficulty bucket the stages draw from is empty")
