#!/usr/bin/env bash
# On the GPU machine: qgate against transformers eager and transformers + fla + sdpa at 27B widths
# (`bench/make_synthetic_checkpoint.py 27b`, LAYERS layers), bf16, T tokens, median of REPS after a
# full-length warm-up, in one call, with the roofline. Needs .gpu/bench_oracle.gz and .whl/ (transformers
# 5.23.0, fla). Usage: LAYERS=4 T=4096 REPS=3 bash bench/gpu/wide.sh
set -uo pipefail
LAYERS=${LAYERS:-4}; T=${T:-4096}; REPS=${REPS:-3}
Q=/tmp/qgate-gpu; mkdir -p $Q
gunzip -c .gpu/bench_oracle.gz > $Q/bench_oracle && chmod +x $Q/bench_oracle
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-tf .whl/transformers-*.whl \
  && export PYTHONPATH=/tmp/site-tf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-fla \
  .whl/fla_core-*.whl .whl/flash_linear_attention-*.whl
source "$(dirname "$0")/cuda_libs.sh"
M=/tmp/s27-$LAYERS
[ -d $M ] || python3 bench/make_synthetic_checkpoint.py 27b $M --layers $LAYERS >/dev/null
peak() {  # run "$@" while sampling the device's used memory every 20 ms; print the peak MiB
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 > $Q/mem.txt &
  local pid=$!; "$@"; kill $pid 2>/dev/null; wait $pid 2>/dev/null
  echo "GPU peak MiB: $(sort -n $Q/mem.txt | tail -n 1)"
}
peak $Q/bench_oracle $M bf16 $T cuda $REPS 2>&1 | tail -n 2
peak python3 bench/gpu/hf_forward_gpu.py $M bf16 $T $REPS eager 2>/dev/null | tail -n 2
PYTHONPATH=/tmp/site-fla:$PYTHONPATH peak python3 bench/gpu/hf_forward_gpu.py $M bf16 $T $REPS sdpa 2>/dev/null | tail -n 2
python3 bench/gpu/roofline.py $M $T bf16 4.8 989
