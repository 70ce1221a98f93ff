#!/usr/bin/env bash
# One lent-GPU call of the EAGLE-3 training plan (`scripts/device-run.sh spec-eagle-train` /
# `spec-eagle`; rehearsed on CPU by scripts/eagle_rehearsal.sh), run in the repository root:
#
#   MODEL=DIR JOB=spec-eagle-train|spec-eagle [ELAPSED=s] bash scripts/eagle_call.sh
#
# The head trains by self-distillation in $HEAD (out/eagle3-smollm2-v3), then (spec-eagle)
# batch-1 decode with the head vs without, graphs on and off (`spec_eager`).
# Across calls, on a fresh machine too: the trainer's state (state.json + state-NN.safetensors,
# ~20 MB for SmolLM2: the head's trainable weights, core/speculative/eagle_state.py) is copied
# to $OUT/eagle-state/ (device-run.sh keeps it out of its archive) and the next call carries it
# as out/eagle-state ($EAGLE_CARRIED); the later of it and a warm machine's own $HEAD wins.
# Each call is a new data round (EAGLE_NEW_DATA=1: the last round's data removed, new prompts):
# EAGLE_SAMPLES (16384) answers of the engine at 512 requests at once, at most EAGLE_DATA_MIN
# (2.5) minutes, 64 held-out prompts answered greedily; EAGLE_NEW_DATA=0 on a warm machine
# trains on the last round's data again (no generation). Training gets EAGLE_TRAIN_MIN minutes
# of this call, data included (spec-eagle-train: 9; spec-eagle: 5), cut so that the call ends
# within CALL_S (570) seconds counted from ELAPSED; 0: no training. Its LR schedule ends after
# EAGLE_PLAN_MIN (10) training minutes of all calls together.
# EAGLE_DTYPE (bfloat16), EAGLE_DEVICE (auto); EAGLE_BENCH_S (180): the benchmark's time limit;
# EAGLE_ARGS / BENCH_ARGS: extra arguments of the
# trainer / bench_speculative.py (they win over the defaults: the rehearsal's small sizes).
set -u
: "${MODEL:?the target model directory}" "${JOB:?spec-eagle-train or spec-eagle}"
OUT=${OUT:-/tmp/out}
HEAD=${EAGLE_HEAD:-out/eagle3-smollm2-v3}
CARRIED=${EAGLE_CARRIED:-out/eagle-state}
HERE=$(cd "$(dirname "$0")" && pwd)
PB=${PB:-python3 -m pegboard.core.cli.main}
DTYPE=${EAGLE_DTYPE:-bfloat16} DEVICE=${EAGLE_DEVICE:-auto}
SECONDS=${ELAPSED:-0}
mkdir -p "$HEAD" "$OUT/eagle-state"
step() { python3 -c 'import json, os, sys
p = os.path.join(sys.argv[1], "state.json")
print(json.load(open(p))["step"] if os.path.exists(p) else -1)' "$1"; }
if [ "$(step "$CARRIED")" -gt "$(step "$HEAD")" ]; then
  rm -f "$HEAD"/state-*.safetensors "$HEAD/model.safetensors"
  cp "$CARRIED/state.json" "$CARRIED"/state-*.safetensors "$HEAD/"
  echo "eagle: resuming from the carried state (step $(step "$HEAD"))"
fi
[ "${EAGLE_NEW_DATA:-1}" = 1 ] && rm -f "$HEAD/data.jsonl" "$HEAD/data_done.json"
bench=$([ "$JOB" = spec-eagle ] && echo 200 || echo 0)  # seconds kept for the benchmark
train_s=$(( ${EAGLE_TRAIN_MIN:-$([ "$JOB" = spec-eagle ] && echo 5 || echo 9)} * 60 ))
left=$(( ${CALL_S:-570} - SECONDS - bench - 45 ))
[ $train_s -gt $left ] && train_s=$left
if [ $train_s -gt 0 ]; then
  # shellcheck disable=SC2086  # PB and EAGLE_ARGS are word lists
  timeout $(( train_s + 30 )) $PB spec train-eagle3 --model "$MODEL" --out "$HEAD" \
    --dtype "$DTYPE" --device "$DEVICE" --num-samples "${EAGLE_SAMPLES:-16384}" --heldout-prompts 64 \
    --max-new-tokens 384 --max-len 448 --temperature 0.7,1.0 --gen-batch 512 \
    --gen-chunk 2048 --data-minutes "${EAGLE_DATA_MIN:-2.5}" --batch-size 16 --ttt-steps 7 \
    --lr "${EAGLE_LR:-5e-4}" --warmup-steps 100 --steps 1000000 \
    --train-minutes "${EAGLE_PLAN_MIN:-10}" --save-every 200 \
    --max-minutes "$(python3 -c "print($train_s / 60)")" ${EAGLE_ARGS:-} \
    >"$OUT/spec-eagle-train.log" 2>&1
  echo "eagle: trainer exit $?"
  grep -E '^data: \{|resumed|captured|heldout|stopped' "$OUT/spec-eagle-train.log" | tail -8
  tail -2 "$OUT/spec-eagle-train.log"; echo
fi
if [ -f "$HEAD/state.json" ] && [ ! -f "$HEAD/model.safetensors" ]; then  # carried, not trained
  python3 -c 'import sys; from pegboard.core.speculative.train_eagle3 import export_state as e
print("eagle: head exported from the state of step", e(*sys.argv[1:]))' "$MODEL" "$HEAD" \
    "$DTYPE" "$DEVICE"
fi
if [ -f "$HEAD/state.json" ]; then  # what the next call carries (outside device-run's archive)
  rm -f "$OUT/eagle-state"/*
  cp "$HEAD/state.json" "$HEAD"/state-*.safetensors "$OUT/eagle-state/" && du -b "$OUT/eagle-state"/*
fi
[ -f "$HEAD/train_log.jsonl" ] && tail -1 "$HEAD/train_log.jsonl"
cp "$HEAD/train_log.jsonl" "$HEAD/config.json" "$OUT/" 2>/dev/null
if [ "$JOB" = spec-eagle ]; then
  # shellcheck disable=SC2086
  timeout ${EAGLE_BENCH_S:-180} python3 "$HERE/bench_speculative.py" --model "$MODEL" \
    --speculative-algorithm EAGLE3 --speculative-draft-model-path "$HEAD" \
    --speculative-num-steps 4 --cuda-graph-max-bs 1 --max-tokens 256 --compare-eager \
    ${BENCH_ARGS:-} >"$OUT/spec-eagle.json" 2>"$OUT/spec-eagle.err"
  echo "eagle: bench exit $?"
  tail -45 "$OUT/spec-eagle.json"
fi
