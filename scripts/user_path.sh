#!/usr/bin/env bash
# The user's path, start to end, each stage's output the next stage's input (docs/results/user-path.md):
#
#   labelled pairs -> PIAR instructions (the teacher as the actor) -> traces synthesized by the served
#   teacher (best-of-N, verified against the labels) -> SFT -> RL -> a distilled student -> served
#   -> /v1/score on the held-out pairs
#
#   bash scripts/user_path.sh                         # the full CPU run (hours on 2 cores: docs/results/user-path.md)
#   USER_PATH_SIZE=small bash scripts/user_path.sh    # the same path in minutes (CI's slow tier runs it)
#   TEACHER=DIR LABELS=DIR OUT=runs/mine bash scripts/user_path.sh     # your teacher, your pairs
#
# TEACHER: an exported judge (a run's sft_model or final_model). Without it, stage 0 trains one
#   (`experiments teacher`, configs/teacher_cpu.yaml; the small size trains a tiny one).
# LABELS: a folder with train.parquet (labelled pairs; no traces needed), the held-out splits
#   industry.parquet and longtail.parquet, and optionally val.parquet (PIAR's validation pairs; without
#   it PIAR is skipped and synthesis prompts with the teacher's own text). Without LABELS, pairs of data
#   seed 1 stand in (labels the teacher, data seed 0, never saw; traces and step columns dropped),
#   with validation pairs of seed 2.
# CONTROL=1 (default for the full size) also trains the control of synthesis: the same pairs with the
#   generator's own traces, same recipe and steps as the SFT stage.
#
# Resumable: rerun the same command after a crash. A finished stage is skipped, a killed training run
# continues from its checkpoint, synthesis skips the pairs it finished. Each stage prints its wall time
# and appends it to $OUT/stages.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
# every stage runs `python`: the project's environment must be the active one
python -c 'import afrl_fast' 2>/dev/null || {
    echo "user_path: \`python\` cannot import afrl_fast; activate the project's environment first (. .venv/bin/activate)" >&2
    exit 2
}

SIZE=${USER_PATH_SIZE:-full}
LABELS_GIVEN=${LABELS:+1}
case "$SIZE" in
full)
    OUT=${OUT:-runs/user_path}
    N_LABELS=800; N_EVAL=800; N_VAL=400; SAMPLES=4; CONTROL=${CONTROL:-1}; PIAR_ROUNDS=4
    TEACHER_DIR=runs/teacher
    TEACHER_RUN=(--config configs/teacher_cpu.yaml)
    JUDGE=(configs/teacher_cpu.yaml)               # the student learns with the teacher's own recipe
    DISTILL=(configs/distill_demo.yaml)
    ;;
small)
    OUT=${OUT:-runs/user_path_small}
    N_LABELS=48; N_EVAL=32; N_VAL=16; SAMPLES=4; CONTROL=${CONTROL:-0}; PIAR_ROUNDS=1
    TINY=(data.n_train=96 data.n_eval=32 sft.epochs=12 sft.batch_size=8 difficulty.max_prompts=8
          difficulty.batch_prompts=8 rl.max_steps=2 rl.batch_prompts=2 rl.sft_batch=2 eval.every=0
          run.checkpoint_every=4)
    TEACHER_DIR=$OUT/teacher
    TEACHER_RUN=(--config configs/teacher_cpu.yaml "${TINY[@]}")
    JUDGE=(configs/teacher_cpu.yaml "${TINY[@]}")
    # a judge trained on a handful of pairs writes no trace the filter keeps: the student learns the
    # synthesized traces, with the RL judge's logits at every position
    DISTILL=(configs/distill_demo.yaml distill.epochs=1 distill.traces=data)
    ;;
*) echo "USER_PATH_SIZE must be full or small, got $SIZE" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
STAGES="$OUT/stages.tsv"
[ -f "$STAGES" ] || printf 'stage\tseconds\tfinished\n' > "$STAGES"

stage_done() { grep -q "^$1	" "$STAGES"; }
# run_stage NAME COMMAND...: skipped when finished before; its wall time printed and recorded
run_stage() {
    local name=$1; shift
    if stage_done "$name"; then echo "== $name: finished before, skipped"; return; fi
    echo "== $name: $*"
    local t0=$SECONDS
    "$@"
    printf '%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$(date -u +%FT%TZ)" >> "$STAGES"
    echo "== $name: done in $((SECONDS - t0)) s"
}
# train DIR SCRIPT CONFIG OVERRIDES...: a torchrun job that continues from its checkpoint when it has one
train() {
    local dir=$1 script=$2 config=$3; shift 3
    local state=--overwrite
    [ -f "$dir/checkpoints/latest.pt" ] && state=--resume
    python -m torch.distributed.run --nproc_per_node=1 --standalone "$script" --config "$config" "$state" run.out_dir="$dir" "$@"
}
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# serve MODEL LOG: a scoring server in the background on a free port; sets SERVER (pid) and URL
serve() {
    local port; port=$(free_port)
    python -m afrl_fast.serve --model "$1" --port "$port" > "$2" 2>&1 &
    SERVER=$!
    URL="http://127.0.0.1:$port"
    python - "$URL" "$SERVER" "$2" <<'PY'
import os, sys, time
import httpx
url, pid, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.TransportError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"the server exited; its log is {log}")
    time.sleep(1)
sys.exit(f"the server did not answer /health within 300 s; its log is {log}")
PY
}
SERVER=
stop_server() {
    [ -n "$SERVER" ] || return 0
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    SERVER=
}
trap stop_server EXIT

# 0. the teacher --------------------------------------------------------------------------------
if [ -z "${TEACHER:-}" ]; then
    # exit 1 = trained, but below the teacher gate (the small size's tiny teacher always is)
    teacher_stage() { python -m afrl_fast.experiments teacher --out "$TEACHER_DIR" "${TEACHER_RUN[@]}" || [ $? -eq 1 ]; }
    run_stage teacher teacher_stage
    TEACHER="$TEACHER_DIR/$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["model"])' "$TEACHER_DIR/teacher.json")"
fi
echo "teacher: $TEACHER"

# 1. the labelled pairs -------------------------------------------------------------------------
if [ -z "${LABELS:-}" ]; then
    LABELS="$OUT/labels"
    labels_stage() {
        python -m afrl_fast.data synth --n "$N_LABELS" --n-industry "$N_EVAL" --n-longtail "$N_EVAL" \
            --seed 1 --no-reasons --labels-only --out "$LABELS" --no-progress
        # PIAR's validation pairs: a third seed, neither trained on nor held out for the final scores
        python -m afrl_fast.data synth --n "$N_VAL" --seed 2 --no-reasons --labels-only --out "$OUT/val_synth" \
            --no-progress
        cp "$OUT/val_synth/train.parquet" "$LABELS/val.parquet"
    }
    run_stage labels labels_stage
fi

# 1b. PIAR: the instruction text refined on the validation pairs, the teacher as the actor --------
# (one server plays actor, evaluator and refiner: no model here writes attributions or rewrites
# instructions well, so the mechanics run and every round's decision is kept; a candidate is only
# accepted when it grades the validation pairs better)
INSTRUCTIONS=$TEACHER
if [ -f "$LABELS/val.parquet" ]; then
    piar_stage() {
        rm -rf "$OUT/piar"                 # PIAR starts over rather than resumes
        serve "$TEACHER" "$OUT/serve_piar.log"
        python -m afrl_fast.piar --pairs "$LABELS/val.parquet" --actor-endpoint "$URL" --evaluator-endpoint "$URL" \
            --refiner-endpoint "$URL" --instructions "$TEACHER" --rounds "$PIAR_ROUNDS" --patience "$PIAR_ROUNDS" \
            --refiner-max-tokens 512 --out "$OUT/piar"
        stop_server
    }
    run_stage piar piar_stage
    INSTRUCTIONS=$OUT/piar/instructions.txt
fi

# 2. synthesis: the teacher served, N samples per pair at T = 1, the verified best kept -----------
synthesize_stage() {
    serve "$TEACHER" "$OUT/serve_teacher.log"
    local resume=()
    [ -f "$OUT/synth/synthesis.json" ] && resume=(--resume)
    # PIAR's best text (the teacher's own prompt unless a round beat it); synthesis writes it to
    # synth/instructions.txt and every later stage trains under it.
    # 200 tokens: the traces without reason sentences are at most ~133 tokens
    python -m afrl_fast.synthesize --pairs "$LABELS/train.parquet" --teacher-endpoint "$URL" \
        --n "$SAMPLES" --temperature 1.0 --max-tokens 200 --concurrency 16 --instructions "$INSTRUCTIONS" \
        --eval industry="$LABELS/industry.parquet" --eval longtail="$LABELS/longtail.parquet" \
        --out "$OUT/synth" "${resume[@]}"
    stop_server
}
run_stage synthesize synthesize_stage

# 3. SFT on the synthesized traces (with the Acc@8 difficulty RL needs) ----------------------------
run_stage sft train "$OUT/sft" afrl_fast/train.py "${JUDGE[@]}" data.dir="$OUT/synth" \
    data.instructions="$OUT/synth/instructions.txt" run.stop_after=difficulty

# 3b. the control: the same pairs with the generator's traces, the same recipe -------------------
if [ "$CONTROL" = 1 ] && [ -z "$LABELS_GIVEN" ]; then
    control_stage() {
        python -m afrl_fast.data synth --n "$N_LABELS" --n-industry "$N_EVAL" --n-longtail "$N_EVAL" --seed 1 \
            --no-reasons --out "$OUT/generator" --no-progress
        python scripts/synthesis_control.py --synth "$OUT/synth" --generator "$OUT/generator" --out "$OUT/control"
        train "$OUT/control_sft" afrl_fast/train.py "${JUDGE[@]}" data.dir="$OUT/control" \
            data.instructions="$OUT/synth/instructions.txt" run.stop_after=sft
    }
    run_stage control control_stage
fi

# 4. RL from the SFT model -------------------------------------------------------------------------
run_stage rl train "$OUT/rl" afrl_fast/train.py "${JUDGE[@]}" data.dir="$OUT/synth" \
    data.instructions="$OUT/synth/instructions.txt" run.init_from="$OUT/sft"

# 5. distillation of the RL judge into a half-width student --------------------------------------
run_stage distil train "$OUT/student" afrl_fast/distill.py "${DISTILL[@]}" teacher.path="$OUT/rl/final_model" \
    data.dir="$OUT/synth"

# 6. the student served; the held-out pairs scored through /v1/score (the teacher offline, for reference)
score_stage() {
    serve "$OUT/student/student_model" "$OUT/serve_student.log"
    for split in industry longtail; do
        python -m afrl_fast.evaluate --model "$TEACHER" --pairs "$LABELS/$split.parquet" \
            --out "$OUT/teacher_eval/$split.json" --no-progress
        python -m afrl_fast.evaluate --endpoint "$URL" --pairs "$LABELS/$split.parquet" \
            --out "$OUT/served/$split.json" --no-progress
    done
    stop_server
}
run_stage serve_and_score score_stage

python scripts/user_path_summary.py "$OUT" --labels "$LABELS"
