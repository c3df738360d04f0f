#!/usr/bin/env bash
# On a machine with 2 GPUs: `qgate oracle --device cuda:0,cuda:1` (a shard per GPU, merged) against one GPU,
# and `--shard 0/2` + `--shard 1/2` + `qgate merge` against the unsharded run: the tensors must be
# bit-identical; prints the throughput of each. Needs .gpu/qgate.gz and .whl/transformers (bench model).
set -uo pipefail
OUT=${OUT:-/tmp/qgate-gpu-out}; mkdir -p "$OUT"
Q=${QDIR:-/tmp/qgate-gpu}; mkdir -p $Q
[ -x $Q/qgate ] || { gunzip -c .gpu/qgate.gz > $Q/qgate && chmod +x $Q/qgate; }
echo "outputs in $Q: $(df -h --output=fstype,size,avail $Q | tail -n 1)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/transformers-*.whl \
  && export PYTHONPATH=/tmp/site
source "$(dirname "$0")/cuda_libs.sh"
nvidia-smi --query-gpu=index,name --format=csv,noheader
[ -d /tmp/bench-0.8b ] || python3 bench/make_bench_model.py /tmp/bench-0.8b >/dev/null
N=${N:-8}; T=${T:-2048}; DT=${DT:-bf16}
python3 bench/gpu/make_plan.py $Q/plan.st $N $T 248320
export QGATE_PROGRESS_INTERVAL=1000
run() { local t0=$(date +%s.%N); "$@" 2>>$OUT/shards.err; local rc=$?; local t1=$(date +%s.%N);
        python3 -c "print(f'{$t1-$t0:.2f}')"; return $rc; }
S1=$(run $Q/qgate oracle --model /tmp/bench-0.8b --dtype $DT --plan $Q/plan.st --rollout 4 --device cuda:0 --out $Q/one.st)
NGPU=$(nvidia-smi -L | wc -l)
echo "one GPU: ${S1}s ($N sequences x $T tokens, $DT, rollout 4, capture $(du -h $Q/one.st | cut -f1))"
if [ "$NGPU" -ge 2 ]; then
  S2=$(run $Q/qgate oracle --model /tmp/bench-0.8b --dtype $DT --plan $Q/plan.st --rollout 4 --device cuda:0,cuda:1 --out $Q/two.st)
  echo "two GPUs (cuda:0,cuda:1, one process): ${S2}s; speed-up $(python3 -c "print(f'{$S1/$S2:.2f}')")x"
  python3 bench/gpu/compare_captures.py $Q/two.st $Q/one.st "two GPUs vs one GPU" 0
  # Shard jobs (as a job array would run them), one per GPU, + merge vs the unsharded run.
  CUDA_VISIBLE_DEVICES=0 $Q/qgate oracle --model /tmp/bench-0.8b --dtype $DT --plan $Q/plan.st --rollout 4 --device cuda --shard 0/2 --out $Q/p0.st 2>>$OUT/shards.err &
  CUDA_VISIBLE_DEVICES=1 $Q/qgate oracle --model /tmp/bench-0.8b --dtype $DT --plan $Q/plan.st --rollout 4 --device cuda --shard 1/2 --out $Q/p1.st 2>>$OUT/shards.err &
  wait
else
  echo "one GPU on this machine: the two-GPU run is skipped; shard jobs run one after the other on cuda:0"
  for i in 0 1; do
    $Q/qgate oracle --model /tmp/bench-0.8b --dtype $DT --plan $Q/plan.st --rollout 4 --device cuda --shard $i/2 --out $Q/p$i.st 2>>$OUT/shards.err
  done
fi
$Q/qgate merge $Q/p1.st $Q/p0.st --out $Q/merged.st 2>>$OUT/shards.err
cmp $Q/merged.st $Q/one.st && echo "shard jobs 0/2 + 1/2 merged: byte-identical to the one-GPU run" \
  || python3 bench/gpu/compare_captures.py $Q/merged.st $Q/one.st "merged shards vs one GPU" 0
tail -5 $OUT/shards.err
