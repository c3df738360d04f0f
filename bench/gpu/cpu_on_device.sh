#!/usr/bin/env bash
# The CPU oracle against transformers on the GPU machine's host CPU (an AVX-512 one, unlike the dev box):
# the same 0.8B-shaped model, T tokens, THREADS threads (pinned to the first THREADS cores), median of
# REPS forwards on both sides, one after the other in this call. Uses the CUDA build's bench_oracle with
# `cpu` as device (the kernel set it picks is printed). Needs .gpu/bench_oracle.gz and .whl/transformers.
#   T=512 THREADS=2 REPS=3 bash bench/gpu/cpu_on_device.sh
# QBINS="label=path ...": other bench_oracle builds timed in the same call (e.g. an older commit's).
set -uo pipefail
T=${T:-512}; THREADS=${THREADS:-2}; REPS=${REPS:-3}
Q=/tmp/qgate-gpu; mkdir -p $Q
gunzip -c ${QGZ:-.gpu/bench_oracle.gz} > $Q/bench_oracle && chmod +x $Q/bench_oracle
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/transformers-*.whl \
  && export PYTHONPATH=/tmp/site
source "$(dirname "$0")/cuda_libs.sh"
grep -m1 "model name" /proc/cpuinfo; echo "cores: $(nproc); AVX-512F: $(grep -c -w -m1 avx512f /proc/cpuinfo), AVX-512-BF16: $(grep -c -w -m1 avx512_bf16 /proc/cpuinfo)"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
[ -d /tmp/bench-0.8b ] || python3 bench/make_bench_model.py /tmp/bench-0.8b >/dev/null
CPUS=0-$((THREADS - 1))
for DT in ${DTS:-f32 bf16}; do
  Hj=$(OMP_NUM_THREADS=$THREADS taskset -c $CPUS python3 bench/hf_forward.py /tmp/bench-0.8b $DT $T $THREADS $REPS 2>/dev/null | tail -n 1)
  echo "$Hj"
  for lb in "qgate=$Q/bench_oracle" ${QBINS:-}; do
    Qj=$(RAYON_NUM_THREADS=$THREADS taskset -c $CPUS ${lb#*=} /tmp/bench-0.8b $DT $T cpu $REPS | tail -n 1)
    echo "$Qj"
    python3 - "${lb%%=*}" "$Qj" "$Hj" <<'PY'
import json, sys
name, q, h = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"{q['dtype']} T={q['T']} threads={q['threads']}: {name} {q['tokens_per_s']:.1f} tok/s, transformers {h['tokens_per_s']:.1f} tok/s, "
      f"ratio {q['tokens_per_s']/h['tokens_per_s']:.2f}x; peak RSS {q['peak_rss_gb']:.2f} GB vs {h['peak_rss_gb']:.2f} GB")
PY
  done
done
