#!/usr/bin/env bash
# CPU rehearsal of the GPU training plan (scripts/eagle_call.sh, what `device-run.sh
# spec-eagle-train` / `spec-eagle` run) with a tiny random Llama (tied embeddings, as SmolLM2),
# each call on a "bare machine" (its own empty directory) that gets only what a lent call would
# carry: out/eagle-state copied from the previous call's $OUT/eagle-state.
#
#   bash scripts/eagle_rehearsal.sh [DIR]      # python3 must import this checkout's pegboard
#
# 1. spec-eagle-train: data, training, state; 2. spec-eagle on a fresh directory: resumes from
# the carried state (a new data round, new AdamW), trains on, serves the head with EAGLE3 and
# checks greedy completions equal plain ones; 3. spec-eagle with EAGLE_TRAIN_MIN=0 on another
# fresh directory: the head exported from the carried state alone, served, equal to plain;
# 4. spec-eagle-train again in 2's directory (a warm machine): its optimizer state resumes.
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
R=${1:-$(mktemp -d /tmp/eagle-rehearsal.XXXX)}
mkdir -p "$R"
python3 -c 'import sys; sys.path.insert(0, sys.argv[1] + "/tests")
from fixtures import build_tiny_model
build_tiny_model(sys.argv[2], "llama", tie_word_embeddings=True)' "$REPO" "$R/model"
small="--num-samples 24 --heldout-prompts 4 --max-new-tokens 24 --max-len 64 --gen-batch 16
  --gen-chunk 8 --batch-size 4 --ttt-steps 3 --warmup-steps 2 --save-every 5 --lr 3e-3
  --prefill-tokens 512"
call() { # $1: the machine's directory, $2: its OUT, $3: the job, $4: the carried state or "",
  # $5: "warm" keeps the machine's directory (a call on the still-warm machine)
  [ "${5:-}" = warm ] || rm -rf "$1"
  rm -rf "$2" "$1/out/eagle-state"; mkdir -p "$1/out" "$2"
  if [ -n "$4" ]; then cp -r "$4" "$1/out/eagle-state"; fi
  (cd "$1" && MODEL=$R/model JOB=$3 OUT=$2 EAGLE_DTYPE=float32 EAGLE_DEVICE=cpu \
     BENCH_ARGS="--device cpu --dtype float32 --max-tokens 24" bash "$REPO/scripts/eagle_call.sh")
  ls "$2/eagle-state"
}
check() { python3 - "$@" <<'PY'
import json, sys
out, step = sys.argv[1], int(sys.argv[2])
state = json.load(open(f"{out}/eagle-state/state.json"))
assert state["step"] == step, state
import os
files = sorted(os.listdir(f"{out}/eagle-state"))
assert files == sorted(["state.json", *state["shards"]]), files  # nothing else travels
if len(sys.argv) > 3:
    res = json.load(open(f"{out}/spec-eagle.json"))
    for name in ("spec", "spec_eager"):
        same, n = res[name]["identical_completions"].split("/")
        print(name, res[name]["identical_completions"], "identical;", res[name]["speculation"])
        assert same == n == str(res["prompts"]), f"{name}: greedy completions differ from plain"
print("ok:", out, "step", state["step"], "shards", state["shards"])
PY
}
EAGLE_ARGS="$small --steps 10" call "$R/m1" "$R/out1" spec-eagle-train ""
check "$R/out1" 10
EAGLE_ARGS="$small --steps 20" call "$R/m2" "$R/out2" spec-eagle "$R/out1/eagle-state"
grep -q "resumed at step 10 (optimizer state new" "$R/out2/spec-eagle-train.log"
check "$R/out2" 20 bench
EAGLE_TRAIN_MIN=0 call "$R/m3" "$R/out3" spec-eagle "$R/out2/eagle-state"
check "$R/out3" 20 bench
# 4. the warm machine of 2 again, carrying its own returned state: the optimizer state resumes
EAGLE_ARGS="$small --steps 25" call "$R/m2" "$R/out4" spec-eagle-train "$R/out2/eagle-state" warm
grep -q "resumed at step 20 (optimizer state resumed)" "$R/out4/spec-eagle-train.log"
check "$R/out4" 25
echo "rehearsal passed: $R"
