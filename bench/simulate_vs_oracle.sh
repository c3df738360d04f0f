#!/usr/bin/env bash
# Cost of the quantization simulator against the oracle of the same compute dtype (issue 5, Performance).
# Usage: bench/simulate_vs_oracle.sh PYTHON MODEL_DIR [T] [THREADS]
#   PYTHON: any python with safetensors + torch (writes the plan); MODEL_DIR: bench/make_bench_model.py output.
# Runs, end to end through the CLI (load, teacher-forced forward over one T-token sequence, capture write,
# no rollout): `qgate oracle --dtype f16`, `qgate simulate --compute f16` for int8lin, int4lin and the
# k-means `int8` (kmeans8-g32), printing wall seconds and the ratio to the oracle.
set -euo pipefail
PY=$1; MODEL=$2; T=${3:-128}; THREADS=${4:-2}
cd "$(dirname "$0")/.."
cargo build --release --bin qgate >/dev/null 2>&1
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$PY" - "$TMP/plan.safetensors" "$T" <<'PY'
import json, sys, torch
from safetensors.torch import save_file
g = torch.Generator().manual_seed(5)
ids = torch.randint(16, 248000, (int(sys.argv[2]),), generator=g, dtype=torch.int64)
save_file({"seq.0.tokens": ids}, sys.argv[1], metadata={"qgate.capture": json.dumps(
    {"format": "qgate-capture/1", "label": "plan", "runtime": "bench", "dtype": "none", "vocab_size": 248320})})
PY
Q=./target/release/qgate
# best of REPS wall times, and the CPU seconds (user+sys) of that run: CPU time is what to compare on a
# shared machine
REPS=${REPS:-2}
run() {
  local best="" cpu=""
  for _ in $(seq "$REPS"); do
    local s e u
    s=$(date +%s.%N)
    RAYON_NUM_THREADS=$THREADS /usr/bin/time -f "%U %S" -o "$TMP/cpu" "$@" >/dev/null 2>"$TMP/err" || { cat "$TMP/err"; exit 1; }
    e=$(echo "$(date +%s.%N) - $s" | bc)
    u=$(awk '{print $1 + $2}' "$TMP/cpu")
    if [ -z "$best" ] || [ "$(echo "$e < $best" | bc)" = 1 ]; then best=$e; cpu=$u; fi
  done
  echo "$best $cpu"
}
read -r OW OC <<<"$(run $Q oracle --model "$MODEL" --dtype f16 --plan "$TMP/plan.safetensors" --rollout 0 --out "$TMP/o.capture.safetensors")"
echo "oracle f16 T=$T threads=$THREADS: wall ${OW}s, cpu ${OC}s"
for S in int8lin int4lin int8; do
  read -r W C <<<"$(run $Q simulate --model "$MODEL" --scheme $S --compute f16 --plan "$TMP/plan.safetensors" --rollout 0 --out "$TMP/$S.capture.safetensors")"
  echo "simulate $S f16 T=$T threads=$THREADS: wall ${W}s (x$(echo "scale=2; $W / $OW" | bc)), cpu ${C}s (x$(echo "scale=2; $C / $OC" | bc)); $(tail -n 1 "$TMP/err" | sed 's/.*: \([0-9]* weights quantized in [0-9.]* s\).*/\1/')"
done
