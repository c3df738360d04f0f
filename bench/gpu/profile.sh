#!/usr/bin/env bash
# On the GPU machine: where a teacher-forced forward spends its GPU time (Nsight Compute, kernel durations
# summed by kernel name), for the 0.8B shapes. Needs .gpu/bench_oracle.gz (scripts/build-cuda.sh) and
# .whl/transformers-5.23.0 (to write the random bench model). Usage: T=4096 DT=bf16 bash bench/gpu/profile.sh
set -uo pipefail
source "$(dirname "$0")/forward_setup.sh"
for dt in ${DT:-bf16}; do
  for T in ${T:-4096}; do
    $Q/bench_oracle /tmp/bench-0.8b $dt $T cuda 3
    ncu --metrics gpu__time_duration.sum --csv --clock-control none --cache-control none \
        --log-file $Q/ncu.$dt.$T.csv $Q/bench_oracle /tmp/bench-0.8b $dt $T cuda 1 > /dev/null 2>>$OUT/ncu.err
    echo "== ncu $dt T=$T (the profiled program runs 3 forwards: full-length warm-up, 1 timed, hidden_states + logits)"
    python3 bench/gpu/ncu_summary.py $Q/ncu.$dt.$T.csv 3 | tee $OUT/ncu.$dt.$T.txt
  done
done
