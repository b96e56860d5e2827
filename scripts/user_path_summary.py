"""What the user's path (scripts/user_path.sh) did: each stage's wall time, what synthesis kept,
every model of the path on the same held-out pairs (the served student scored through /v1/score),
and the paired changes along it (synthesized-trace SFT vs its control, RL vs its SFT start, the
student vs its teacher) with intervals over the pairs.

    python scripts/user_path_summary.py runs/user_path [--out results/user_path]
    python scripts/user_path_summary.py results/user_path/run --out results/user_path   # the committed copy

Reads only the files the stages wrote (stages.tsv, synth/report.json, each run's results.json,
served/*.json); writes summary.json and summary.md beside them (or into --out).
"""
import argparse
import csv
import json
import sys
from pathlib import Path

from afrl_fast.experiment_results import answers_right
from afrl_fast.metrics import paired_bootstrap

SPLITS = ("industry", "longtail")
METRICS = (("5-ACC", "acc5"), ("Pair-ACC", "pair_acc"), ("Macro-F1", "macro_f1"))


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def run_row(path: Path, pick):
    """The metrics row of a results.json: `pick` names the model (SFT, student, teacher) or, for
    "last", the row written last (an RL run's RL row)."""
    data = read_json(path / "results.json")
    if data is None:
        return None
    rows = {k: v for k, v in data["results"].items() if k != "majority-class"}
    return rows[list(rows)[-1]] if pick == "last" else rows.get(pick)


def models(out: Path) -> dict:
    def by_split(folder):
        rows = {s: read_json(out / folder / f"{s}.json") for s in SPLITS}
        return rows if all(rows.values()) else None
    found = {
        "teacher": by_split("teacher_eval"),
        "SFT on synthesized traces": run_row(out / "sft", "SFT"),
        "SFT on the generator's traces (control)": run_row(out / "control_sft", "SFT"),
        "RL from that SFT": run_row(out / "rl", "last"),
        "distilled student": run_row(out / "student", "student"),
        "distilled student, served (/v1/score)": by_split("served"),
    }
    return {k: v for k, v in found.items() if v is not None}


# The path's paired comparisons, each (name, model a, model b) with a model as (run folder, row):
# a − b in 5-ACC on the same held-out pairs.
CONTRASTS = (
    ("synthesized-trace SFT minus its control", ("sft", "SFT"), ("control_sft", "SFT")),
    ("RL minus its SFT start", ("rl", "last"), ("sft", "SFT")),
    ("distilled student minus its teacher (the RL judge)", ("student", "student"), ("student", "teacher")),
)


def paired_changes(out: Path, labels: Path) -> dict:
    """Model a's 5-ACC minus model b's per held-out split, with a 95 % interval from resampling the
    pairs: both models answered the same pairs, so the pairing removes the pairs' shared difficulty.
    A contrast whose runs are missing is left out."""
    changes = {}
    for name, a, b in CONTRASTS:
        rows = [run_row(out / folder, pick) for folder, pick in (a, b)]
        if not all(rows):
            continue
        change = {}
        for split in SPLITS:
            right = answers_right(labels / f"{split}.parquet", [row.get(split, {}).get("answers") for row in rows])
            if right is not None:
                change[split] = paired_bootstrap(before=right[1], after=right[0])   # a − b
        if change:
            changes[name] = change
    return changes


def yield_per_rule(labels: Path, kept: Path) -> dict | None:
    """Pairs and verified traces per generator rule, when the labelled pairs carry a `rule` column
    (the synthetic generator's; the teacher never sees it)."""
    import pyarrow.parquet as pq

    pairs = pq.read_table(labels)
    if "rule" not in pairs.column_names or not kept.is_file():
        return None
    kept_keys = set(zip(*(pq.read_table(kept, columns=["query_id", "doc_id"]).column(c).to_pylist()
                          for c in ("query_id", "doc_id"))))
    out = {}
    for rule, q, d in zip(*(pairs.column(c).to_pylist() for c in ("rule", "query_id", "doc_id"))):
        row = out.setdefault(rule, {"pairs": 0, "with_trace": 0})
        row["pairs"] += 1
        row["with_trace"] += (q, d) in kept_keys
    return dict(sorted(out.items()))


def synthesis(out: Path, labels: Path):
    report = read_json(out / "synth" / "report.json")
    if report is None:
        return None
    keep = ("pairs", "pairs_with_trace", "yield", "samples", "samples_kept", "hard_pairs", "rejections",
            "yield_per_grade", "requests", "prompt_tokens", "completion_tokens", "wall_s_this_invocation")
    summary = {k: report[k] for k in keep if k in report}
    summary["yield_per_rule"] = yield_per_rule(labels / "train.parquet", out / "synth" / "train.parquet")
    return summary


def piar(out: Path):
    """PIAR's curve: the validation metrics of the starting text, then each round's candidate and
    decision."""
    history = read_json(out / "piar" / "history.json")
    if history is None:
        return None
    rounds = [{"round": r["round"], "accepted": r["accepted"], "reason": r["reason"],
               **({"acc5": r["candidate"]["acc5"], "pair_acc": r["candidate"]["pair_acc"]} if "candidate" in r else {}),
               "diagnosed": r.get("attribution", {}).get("diagnosed")} for r in history["rounds"]]
    return {"start": {k: history["start"][k] for k in ("acc5", "pair_acc")},
            "best": {k: history["best"][k] for k in ("acc5", "pair_acc")}, "rounds": rounds}


def markdown(summary: dict) -> str:
    lines = ["**Stages** (wall time on this machine)", "", "| stage | seconds | finished |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['seconds']} | {s['finished']} |" for s in summary["stages"]]
    pr = summary.get("piar")
    if pr:
        pct = lambda x: "n/a" if x is None else f"{100 * x:.2f}"   # noqa: E731
        lines += ["", "**PIAR** (validation pairs, %; the teacher as actor, evaluator and refiner)", "",
                  "| round | 5-ACC | Pair-ACC | decision |", "|---|---|---|---|",
                  f"| 0 (start) | {pct(pr['start']['acc5'])} | {pct(pr['start']['pair_acc'])} | — |"]
        lines += [f"| {r['round']} | {pct(r.get('acc5'))} | {pct(r.get('pair_acc'))} | "
                  f"{'accepted' if r['accepted'] else 'rejected'}: {r['reason']} |" for r in pr["rounds"]]
    syn = summary["synthesis"]
    if syn:
        lines += ["", f"**Synthesis**: {syn['pairs_with_trace']} of {syn['pairs']} pairs got a verified trace "
                      f"(yield {100 * syn['yield']:.1f} %); {syn['samples_kept']} of {syn['samples']} samples kept; "
                      f"{syn['hard_pairs']} hard pairs.", "",
                  "| grade | pairs | with a trace |", "|---|---|---|"]
        lines += [f"| {g} | {v['pairs']} | {v['with_trace']} |" for g, v in syn.get("yield_per_grade", {}).items()]
        if syn.get("yield_per_rule"):
            lines += ["", "| generator rule | pairs | with a trace |", "|---|---|---|"]
            lines += [f"| {r} | {v['pairs']} | {v['with_trace']} |" for r, v in syn["yield_per_rule"].items()]
        lines += ["", f"Requests {syn.get('requests')}, prompt tokens {syn.get('prompt_tokens')}, completion "
                      f"tokens {syn.get('completion_tokens')}."]
        lines += ["", "Rejections (first failing check per sample): "
                  + ", ".join(f"{k} {v}" for k, v in syn["rejections"].items())]
    head = " | ".join(f"{s} {m}" for s in SPLITS for m, _ in METRICS)
    lines += ["", "**Models** (first-token metrics on the held-out pairs, %)", "", f"| model | {head} |",
              "|---|" + "---|" * (len(SPLITS) * len(METRICS))]
    for name, row in summary["models"].items():
        cells = [f"{100 * row[s][k]:.2f}" if s in row and k in row[s] else "" for s in SPLITS for _, k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    changes = summary.get("paired_changes")
    if changes:
        lines += ["", "**Paired changes** (5-ACC points, a − b on the same held-out pairs, 95 % interval from "
                      "resampling the pairs; one training seed each)", "",
                  "| comparison | " + " | ".join(SPLITS) + " |", "|---|" + "---|" * len(SPLITS)]
        for name, change in changes.items():
            cells = [f"{100 * c['diff']:+.2f} [{100 * c['lo']:+.2f}, {100 * c['hi']:+.2f}]" if (c := change.get(s))
                     else "" for s in SPLITS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="the user's path output folder (OUT of scripts/user_path.sh)")
    p.add_argument("--labels", type=Path, default=None,
                   help="the labelled pairs folder (default: RUN/labels, the path's own)")
    p.add_argument("--out", type=Path, default=None, help="where summary.json/.md go (default: the run folder)")
    args = p.parse_args(argv)
    if not (args.run / "stages.tsv").is_file():
        print(f"error: {args.run}: no stages.tsv; not a scripts/user_path.sh output folder", file=sys.stderr)
        return 2
    with open(args.run / "stages.tsv", encoding="utf-8") as f:
        stages = [{**r, "seconds": int(r["seconds"])} for r in csv.DictReader(f, delimiter="\t")]
    labels = args.labels or args.run / "labels"
    summary = {"stages": stages, "piar": piar(args.run), "synthesis": synthesis(args.run, labels),
               "models": models(args.run), "paired_changes": paired_changes(args.run, labels)}
    out = args.out or args.run
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    text = markdown(summary)
    (out / "summary.md").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
