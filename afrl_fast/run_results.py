"""What a finished training run reports: SFT and RL beside the majority baseline, RL's change over SFT
with its uncertainty, results.json and the plots.
"""
from __future__ import annotations

import json

import numpy as np

from . import dist as D
from .evaluate import majority_baseline, results_table
from .files import atomic_write_text
from .metrics import paired_bootstrap
from .observe import log
from .report import draw_report

RL_NAMES = {"grpo": "GRPO", "stepwise_grpo": "Stepwise-GRPO", "mode_balanced": "Mode-Balanced RL"}


def rl_name(rl: dict) -> str:
    """The results row of the RL model, named after what trained it (paper Table 3's names)."""
    return RL_NAMES[rl["mode"]] + (" (random order)" if rl.get("random_order") else "")


def rl_change(history: dict, tables: dict, eval_names) -> dict:
    """RL's change in 5-ACC over its SFT start per evaluation split, with a paired bootstrap interval:
    one RL run at this scale moves 5-ACC by several points either way, so the change is only worth
    reading beside its uncertainty."""
    out = {}
    for split in eval_names:
        sft, rl = (history.get(k, {}).get(split, {}).get("answers") for k in ("sft", "rl"))
        if not sft or not rl or len(sft) != len(rl):
            continue
        labels = np.asarray(tables[split].column("label").to_pylist())[:len(sft)]
        right = [np.array([int(c) for c in answers]) == labels for answers in (sft, rl)]
        out[split] = paired_bootstrap(*right)
    return out


def finish(run_dir, progress, tables, eval_names, info, runlog) -> int:
    """Print SFT vs RL vs the majority baseline, save results.json and draw the plots."""
    if info.is_main:
        rows = {"majority-class": majority_baseline(tables["train"], tables, eval_names)}
        sft_name = "SFT" if progress["config"]["sft"]["target"] == "trace" else "Standard scoring"
        for key, name in (("sft", sft_name), ("rl", rl_name(progress["config"]["rl"]))):
            if key in progress["history"]:
                rows[name] = progress["history"][key]
        print(results_table(rows, eval_names))
        for key in ("sft_traces", "rl_traces"):
            if key in progress["history"]:
                print(f"{key}: {progress['history'][key]}")
        change = rl_change(progress["history"], tables, eval_names)
        for split, c in change.items():
            print(f"RL - SFT, 5-ACC on {split}: {100 * c['diff']:+.1f} points (95 % CI {100 * c['lo']:+.1f} to "
                  f"{100 * c['hi']:+.1f}; paired bootstrap over the {c['n']} pairs, {c['n_boot']} resamples)")
        atomic_write_text(run_dir / "results.json", json.dumps(
            {"results": rows, **{k: v for k, v in progress["history"].items() if k.endswith("traces")},
             **({"rl_minus_sft_acc5": change} if change else {})}, indent=2, default=float))
        runlog.close()
        try:
            files = draw_report(run_dir)
            print(f"plots: {', '.join(str(f) for f in files)}")
        except Exception as e:  # plots are a convenience; a plotting problem must not fail a finished run
            log.warning("report failed: %s", e)
    D.cleanup()
    return 0
