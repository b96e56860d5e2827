"""Time breakdown of one Mode-Balanced RL step of the demo model (pytest benchmarks/ --benchmark -s).

Runs the trainer through torchrun on the demo config, shortened (a brief SFT, 16 prompts of
difficulty, 3 RL steps of 4 prompts × G=8 rollouts plus 8 SFT rows), then reads the per-phase wall
times every RL step logs to metrics.jsonl and prints them: rollout (prefix-shared generation and
decoding to text), verify (the compiled verifier), advantages (group advantages and the stepwise
token weights from tokenizer offsets), log-probs (old policy and reference, forward-only vocabulary
pass; the old-policy pass is skipped on-policy), loss (fused loss forward+backward), optimizer (clip + AdamW), sync (weights to the engine).

Quick mode (AFRL_BENCH_QUICK=1, see benchmarks/_quick.py): the same trainer through torchrun on a
tiny model (hidden 32, 1 layer, the real vocabulary) and tiny sizes (8 training rows, 2 prompts of
difficulty, 2 RL steps of 2 prompts × G=2 and 4-token responses), and only the run with the
old-policy forward recomputed (the one with every phase; the shortcut is tests/test_rl_step.py's).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _quick import QUICK, choose, quick_note

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "verify", "advantages", "logprobs", "loss", "optimizer", "sync")
STEPS = choose(3, 2)
SETTINGS = choose(
    ["sft.epochs=0.5", "difficulty.max_prompts=16", "difficulty.drop_unsolved=false", "rl.stages.0.size=12"],
    ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
     "model.head_dim=16", "model.intermediate_size=64", "data.n_train=8", "data.n_eval=2",
     "sft.epochs=0.25", "sft.batch_size=2", "difficulty.max_prompts=2", "difficulty.group_size=2",
     "difficulty.easy_min=2", "difficulty.medium_min=1", "difficulty.drop_unsolved=false", "rl.group_size=2",
     "rl.batch_prompts=2", "rl.sft_batch=2", "rl.max_new_tokens=4", "rl.stages.0.size=2", "eval.max_rows=2"])
MODEL = choose("demo model (hidden 128, 2 layers, V=151,936)", "tiny model (hidden 32, 1 layer, V=151,936)")


def run_steps(out_dir: Path, on_policy_shortcut: bool) -> list[dict]:
    """Run the shortened trainer and return its RL metrics lines."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone",
           str(ROOT / "afrl_fast" / "train.py"), f"run.out_dir={out_dir}", *SETTINGS, f"rl.max_steps={STEPS}",
           "eval.every=0", f"rl.on_policy_shortcut={str(on_policy_shortcut).lower()}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r.get("phase") == "rl" and "split" not in r]
    assert rl, "no RL step ran"
    return rl


@pytest.mark.benchmark
def test_rl_step_time_breakdown(tmp_path):
    # The old-policy forward is what the on-policy shortcut removes: run the step with it recomputed
    # (the path several mini-batches take) and with the shortcut (one update per rollout batch).
    runs = {"recomputed": run_steps(tmp_path / "recomputed", False)}
    if not QUICK:
        runs["on-policy"] = run_steps(tmp_path / "on_policy", True)
    lens = np.mean([r["response/len"] for rl in runs.values() for r in rl])
    print(f"\nRL step time breakdown, {MODEL}, {STEPS} steps per run, "
          f"{lens:.0f}-token responses on average; median seconds (share){quick_note()}")
    print(f"{'phase':<12}" + "".join(f"{name:>20}" for name in runs))
    medians = {name: {p: float(np.median([r.get(f'time/{p}', 0.0) for r in rl])) for p in PHASES}
               for name, rl in runs.items()}
    totals = {name: sum(m.values()) for name, m in medians.items()}
    for p in PHASES:
        print(f"{p:<12}" + "".join(f"{m[p]:>12.2f} ({100 * m[p] / totals[n]:4.1f}%)" for n, m in medians.items()))
    print(f"{'total':<12}" + "".join(f"{totals[n]:>20.2f}" for n in runs))
    print(f"{'tokens/s':<12}" + "".join(f"{np.median([r['throughput/tokens_per_s'] for r in rl]):>20.0f}"
                                          for rl in runs.values()))
