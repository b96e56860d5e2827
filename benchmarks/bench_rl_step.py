"""Time breakdown of one Mode-Balanced RL step of the demo model (pytest benchmarks/ --benchmark -s).

Runs the trainer through torchrun on the demo config, shortened (a brief SFT, 16 prompts of
difficulty, 3 RL steps of 4 prompts × G=8 rollouts plus 8 SFT rows), then reads the per-phase wall
times every RL step logs to metrics.jsonl and prints them: rollout (prefix-shared generation and
decoding to text), verify (the compiled verifier), advantages (group advantages and the stepwise
token weights from tokenizer offsets), log-probs (old policy and reference, forward-only vocabulary
pass), loss (fused loss forward+backward), optimizer (clip + AdamW), sync (weights to the engine).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "verify", "advantages", "logprobs", "loss", "optimizer", "sync")


@pytest.mark.benchmark
def test_rl_step_time_breakdown(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone",
           str(ROOT / "afrl_fast" / "train.py"), f"run.out_dir={tmp_path}", "sft.epochs=0.5",
           "difficulty.max_prompts=16", "difficulty.drop_unsolved=false", "rl.max_steps=3",
           "rl.stages.0.size=12", "eval.every=0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r.get("phase") == "rl" and "split" not in r]
    assert rl, "no RL step ran"
    print(f"\nRL step time breakdown, demo model (hidden 128, 2 layers, V=151,936), "
          f"{len(rl)} steps, {np.mean([r['response/len'] for r in rl]):.0f}-token responses on average")
    print(f"{'phase':<12}{'median s':>10}{'share':>8}")
    medians = {p: float(np.median([r.get(f'time/{p}', 0.0) for r in rl])) for p in PHASES}
    total = sum(medians.values())
    for p in PHASES:
        print(f"{p:<12}{medians[p]:>10.2f}{100 * medians[p] / total:>7.1f}%")
    print(f"{'total':<12}{total:>10.2f}   tokens/s {np.median([r['throughput/tokens_per_s'] for r in rl]):.0f}")
