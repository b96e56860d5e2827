#!/usr/bin/env bash
# The synthesis demo (docs/results/synthesis.md): a trained demo model serves as the teacher.
#   1. the demo's synthetic training pairs with their labels only (trace and step columns dropped)
#      -> python -m afrl_fast.synthesize against `python -m afrl_fast.serve --model TEACHER`
#   2. a fresh demo model SFT-trained on the synthesized traces, evaluated from the first token
#   3. NovelEval (real graded pairs, grades 0/1/2 mapped to 0/2/4) through the same teacher: yield only
# Usage: bash scripts/synthesize_demo.sh [RUN_DIR of a finished demo run (default runs/demo)] [N samples (default 4)]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo}
N=${2:-4}
OUT=runs/synth_demo
PORT=${PORT:-8765}
mkdir -p "$OUT"
python - "$RUN" "$OUT" <<'PY'
import sys
import pyarrow.parquet as pq
from afrl_fast.data import PAIR_COLUMNS, write_table
run, out = sys.argv[1:]
write_table(pq.read_table(f"{run}/data/train.parquet").select(list(PAIR_COLUMNS)), f"{out}/train_labels.parquet")
PY
python -m afrl_fast.data trec --qrels data/noveleval/qrels.txt --corpus data/noveleval/corpus.tsv \
    --queries data/noveleval/queries.tsv --grade-map 0:0,1:2,2:4 --out "$OUT/noveleval.parquet"
python -m afrl_fast.serve --model "$RUN/final_model" --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do sleep 1; kill -0 $SERVER; done
# 200 tokens: the generator's traces are at most 133 tokens; concurrent requests decode together in the server
COMMON=(--teacher-endpoint "http://127.0.0.1:$PORT" --teacher-model final_model --n "$N" --temperature 1.0 --max-tokens 200
        --instructions short --concurrency 16)
RESUME=()
[ -f "$OUT/synth/synthesis.json" ] && RESUME=(--resume)
python -m afrl_fast.synthesize --pairs "$OUT/train_labels.parquet" --out "$OUT/synth" "${COMMON[@]}" "${RESUME[@]}" \
    --eval industry="$RUN/data/industry.parquet" --eval longtail="$RUN/data/longtail.parquet"
RESUME=()
[ -f "$OUT/noveleval_synth/synthesis.json" ] && RESUME=(--resume)
python -m afrl_fast.synthesize --pairs "$OUT/noveleval.parquet" --out "$OUT/noveleval_synth" "${COMMON[@]}" "${RESUME[@]}"
kill $SERVER; wait $SERVER 2>/dev/null || true; trap - EXIT
torchrun --nproc_per_node=1 afrl_fast/train.py run.out_dir="$OUT/sft_on_synth" data.dir="$OUT/synth" \
    run.stop_after=sft --overwrite
python - "$RUN" "$OUT" <<'PY'
import json, sys
run, out = sys.argv[1:]
for name in ("synth", "noveleval_synth"):
    r = json.load(open(f"{out}/{name}/report.json"))
    print(f"{name}: {r['pairs_with_trace']} of {r['pairs']} pairs got a trace (yield {r['yield']:.1%}); "
          f"samples kept {r['samples_kept']} of {r['samples']}; per grade "
          + ", ".join(f"{k}: {v['with_trace']}/{v['pairs']}" for k, v in r["yield_per_grade"].items())
          + "; rejections " + json.dumps(r["rejections"]))
rows = [("SFT on the generator's traces", f"{run}/results.json"), ("SFT on synthesized traces", f"{out}/sft_on_synth/results.json")]
print(f"{'model':34}{'split':10}{'5-ACC':>8}{'Pair-ACC':>10}{'Macro-F1':>10}")
for label, path in rows:
    res = json.load(open(path))["results"]["SFT"]
    for split in ("industry", "longtail"):
        m = res[split]
        print(f"{label:34}{split:10}{100*m['acc5']:8.2f}{100*m['pair_acc']:10.2f}{100*m['macro_f1']:10.2f}")
PY
