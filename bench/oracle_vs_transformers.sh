#!/usr/bin/env bash
# Oracle speed against transformers on the same machine, same invocation (issue: the oracle, §6).
# Usage: bench/oracle_vs_transformers.sh PYTHON MODEL_DIR [T] [THREADS] [REPS] [DTYPES]
#   REPS: timed forwards per side, the median reported (default 3); DTYPES: default "f32 bf16"
#   PYTHON: a python with transformers==5.23.0 and torch==2.15.0 (fixtures/gen/requirements.txt)
#   MODEL_DIR: made by `PYTHON bench/make_bench_model.py MODEL_DIR` (random weights, real 0.8B shapes)
set -euo pipefail
PY=$1; MODEL=$2; T=${3:-512}; THREADS=${4:-2}; REPS=${5:-3}; DTYPES=${6:-f32 bf16}
cd "$(dirname "$0")/.."
cargo build --release --example bench_oracle >/dev/null 2>&1
for DT in $DTYPES; do
  Q=$(RAYON_NUM_THREADS=$THREADS ./target/release/examples/bench_oracle "$MODEL" "$DT" "$T" cpu "$REPS")
  H=$(OMP_NUM_THREADS=$THREADS "$PY" bench/hf_forward.py "$MODEL" "$DT" "$T" "$THREADS" "$REPS" 2>/dev/null | tail -n 1)
  echo "$Q"; echo "$H"
  "$PY" - "$Q" "$H" <<'PY'
import json, sys
q, h = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{q['dtype']} T={q['T']}: qgate {q['tokens_per_s']:.1f} tok/s, transformers {h['tokens_per_s']:.1f} tok/s, "
      f"ratio {q['tokens_per_s']/h['tokens_per_s']:.2f}x; peak RSS qgate {q['peak_rss_gb']:.2f} GB vs {h['peak_rss_gb']:.2f} GB")
PY
done
