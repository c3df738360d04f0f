#!/usr/bin/env bash
# Issue 7, on the GPU machine: (1) the GPU oracle against the CPU oracle (same binary, --device cpu) and
# against HF's committed fixture captures; (2) the benchmark against transformers eager on the same GPU.
# Needs .gpu/{qgate,bench_oracle}.gz from scripts/build-cuda.sh and .whl/ with transformers==5.23.0
# (the machine's own transformers may lack or differ from the pinned version). Writes logs under $OUT.
#   STEPS="check bench" bash bench/gpu/run-on-device.sh
set -uo pipefail
OUT=${OUT:-/tmp/qgate-gpu-out}; mkdir -p "$OUT"
STEPS=${STEPS:-"check bench"}
Q=/tmp/qgate-gpu; mkdir -p $Q
# Each binary that was carried (step check needs qgate, step bench bench_oracle).
for b in qgate bench_oracle; do
  [ -f .gpu/$b.gz ] && gunzip -c .gpu/$b.gz > $Q/$b && chmod +x $Q/$b
done
# transformers alone on the path: fla (if carried) goes into its own folder below, for the second peer only.
# (Until 2026-11-30 every carried wheel went into /tmp/site, so the "eager" peer had fla's GDN kernels too.)
if ls .whl/transformers-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-tf .whl/transformers-*.whl \
    && export PYTHONPATH=/tmp/site-tf
fi
source "$(dirname "$0")/cuda_libs.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
ldd $Q/qgate | grep -E "not found|cublas|cuda|nvrtc|curand" || true

if [[ " $STEPS " == *" check "* ]]; then
  echo "== GPU oracle vs CPU oracle and vs HF (fixtures)"
  fail=0
  # The kernels op by op against their host implementations (shapes the fixtures do not reach).
  if [ -f .gpu/gpu_ops_check.gz ]; then
    gunzip -c .gpu/gpu_ops_check.gz > $Q/gpu_ops_check && chmod +x $Q/gpu_ops_check
    $Q/gpu_ops_check cuda:0 > $OUT/ops.log 2>&1 || fail=1
    grep -v PASS $OUT/ops.log; tail -n 1 $OUT/ops.log
  else
    echo "gpu_ops_check: .gpu/gpu_ops_check.gz missing (scripts/build-cuda.sh builds it)"; fail=1
  fi
  for m in ${CHECK_MODELS:-dense-vl-tied dense-gva-untied moe-fused moe-experts trained-dense trained-moe}; do
    for dt in ${CHECK_DTYPES:-f32 bf16 f16}; do
      hf=fixtures/hf/$m.$dt.capture.safetensors; [ -f "$hf" ] || continue
      for dev in cpu cuda; do
        $Q/qgate oracle --device $dev --model fixtures/models/$m --dtype $dt --plan $hf --rollout 16 \
          --out $Q/$m.$dt.$dev.st 2>>$OUT/check.log || { echo "$m $dt $dev: oracle failed"; fail=1; }
      done
      tol=""; [ $dt = f32 ] && tol=1e-4
      python3 bench/gpu/compare_captures.py $Q/$m.$dt.cuda.st $Q/$m.$dt.cpu.st "$m $dt gpu-vs-cpu-oracle" $tol || fail=1
      python3 bench/gpu/compare_captures.py $Q/$m.$dt.cuda.st $hf "$m $dt gpu-vs-hf" $tol || { [ $dt = f32 ] && fail=1; }
    done
  done
  # Streaming on the GPU (one layer on the device at a time) vs the in-memory GPU run.
  # (With prefetch, the default: the next block loads and uploads on the prefetch thread.)
  for m in ${STREAM_MODELS-dense-gva-untied moe-experts}; do
    for dt in ${STREAM_DTYPES:-f32 bf16 f16}; do
      [ -f fixtures/hf/$m.$dt.capture.safetensors ] && [ -f $Q/$m.$dt.cuda.st ] || continue
      $Q/qgate oracle --device cuda --stream --model fixtures/models/$m --dtype $dt --plan fixtures/hf/$m.$dt.capture.safetensors \
        --rollout 16 --out $Q/$m.$dt.cuda-stream.st 2>>$OUT/check.log || { echo "$m $dt stream failed"; fail=1; }
      python3 bench/gpu/compare_captures.py $Q/$m.$dt.cuda-stream.st $Q/$m.$dt.cuda.st "$m $dt gpu-streamed-vs-gpu-in-memory" 1e-4 || fail=1
    done
  done
  # The main command on the GPU (gate run) and a simulated quantization.
  QGATE_ORACLE_CACHE=$Q/oracles $Q/qgate run --device cuda --bundle fixtures/hf/dense-gva-untied.f16.capture.safetensors \
    --oracle f32 --model fixtures/models/dense-gva-untied --out $Q/report >$OUT/run.log 2>&1; echo "qgate run --device cuda: exit $?"
  for dev in cpu cuda; do
    $Q/qgate simulate --device $dev --model fixtures/models/dense-gva-untied --plan fixtures/hf/dense-gva-untied.f32.capture.safetensors \
      --scheme int4lin --compute f16 --out $Q/sim.$dev.st 2>>$OUT/check.log
  done
  python3 bench/gpu/compare_captures.py $Q/sim.cuda.st $Q/sim.cpu.st "simulate int4lin f16 gpu-vs-cpu"
  echo "checks: $([ $fail = 0 ] && echo PASS || echo FAIL)"
fi

# Run "$@" while nvidia-smi samples the GPU's used memory every 20 ms; the peak (MiB, whole device,
# CUDA context included) goes to $Q/peak.txt. The same probe for qgate and transformers.
with_gpu_peak() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 > $Q/mem.txt &
  local pid=$!; "$@"; local rc=$?; kill $pid 2>/dev/null; wait $pid 2>/dev/null
  sort -n $Q/mem.txt | tail -n 1 > $Q/peak.txt; return $rc
}

if [[ " $STEPS " == *" bench "* ]]; then
  echo "== benchmark: 0.8B shapes, teacher-forced forward; qgate, transformers eager (torch GDN fallback: fla not importable) and"
  echo "   transformers + flash-linear-attention + sdpa, same GPU, same call; warm-up at full length, median of REPS"
  [ -d /tmp/bench-0.8b ] || python3 bench/make_bench_model.py /tmp/bench-0.8b >/dev/null
  # fla into its own folder: on PYTHONPATH only for the second peer.
  if ls .whl/fla_core-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-fla \
      .whl/fla_core-*.whl .whl/flash_linear_attention-*.whl
  fi
  for T in ${TS:-512 4096 16384}; do
    for dt in ${DTS:-bf16 f32}; do
      with_gpu_peak $Q/bench_oracle /tmp/bench-0.8b $dt $T cuda ${REPS:-5} > $Q/q.json 2>>$OUT/bench.err
      Qj=$(tail -n 1 $Q/q.json); Qpeak=$(cat $Q/peak.txt)
      with_gpu_peak python3 bench/gpu/hf_forward_gpu.py /tmp/bench-0.8b $dt $T ${REPS:-5} eager > $Q/h.json 2>>$OUT/bench.err
      Hj=$(tail -n 1 $Q/h.json); Hpeak=$(cat $Q/peak.txt)
      Fj='{}'; Fpeak=0
      if [ -d /tmp/site-fla ]; then
        PYTHONPATH=/tmp/site-fla:$PYTHONPATH with_gpu_peak python3 bench/gpu/hf_forward_gpu.py /tmp/bench-0.8b $dt $T ${REPS:-5} sdpa > $Q/f.json 2>>$OUT/bench.err
        Fj=$(tail -n 1 $Q/f.json); Fpeak=$(cat $Q/peak.txt)
      fi
      Rj=$(python3 bench/gpu/roofline.py /tmp/bench-0.8b $T $dt ${HBM_TB_S:-4.8})
      echo "$Qj"; echo "$Hj"; echo "$Fj"; echo "$Rj"
      python3 - "$Qj" "$Hj" "$Fj" "$Rj" "$Qpeak" "$Hpeak" "$Fpeak" <<'PY'
import json, sys
try:
    q, h, f, r = (json.loads(x) for x in sys.argv[1:5])
except Exception as e:
    print("could not parse a result:", e); sys.exit(0)
qp, hp, fp = sys.argv[5:8]
fr = f"{q['tokens_per_s']/f['tokens_per_s']:.2f}x" if f.get("tokens_per_s") else "n/a"
ft = f"{f['tokens_per_s']:.0f}" if f.get("tokens_per_s") else "n/a"
print(f"ROW {q['dtype']} T={q['T']}: qgate {q['tokens_per_s']:.0f} tok/s | eager (fla importable: {h.get('fla')}) {h['tokens_per_s']:.0f} ({q['tokens_per_s']/h['tokens_per_s']:.2f}x) "
      f"| fla+sdpa {ft} ({fr}) | GPU peak MiB qgate {qp} eager {hp} fla {fp} | roofline {r['roofline_tok_s']:.0f} tok/s "
      f"(weights {r['t_weights_ms']:.2f} ms, FLOPs {r['t_flops_ms']:.2f} ms; {r['tflop']:.2f} TFLOP): qgate at {q['tokens_per_s']/r['roofline_tok_s']:.1%}")
PY
    done
  done
fi
