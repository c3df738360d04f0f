#!/usr/bin/env bash
# Layer-streamed oracle benchmark (BENCHMARKS.md, "Big models"). Usage:
#   /work/pyenv/bin/python bench/make_synthetic_checkpoint.py 27b DIR        # ≈ 8.1 GB, not committed
#   bench/streaming.sh DIR FULL_DEPTH [DTYPE] [ROLLOUT]                      # FULL_DEPTH: 64 (27B), 40 (35B-A3B)
#   PREFETCH=0 bench/streaming.sh ...      # without the weight prefetch thread (`--no-prefetch`), for comparison
#   COLD=1 bench/streaming.sh ...          # evict the checkpoint from the page cache before each run (as a
#                                          # checkpoint larger than RAM is read), else whatever is cached
# 1. the disk's read rate with O_DIRECT (dd, page cache bypassed), 2. the f32 GEMM rate, per-layer times and
# the ratio to max(read bound, GEMM bound) (examples/bench_streaming.rs), 3. the real CLI under
# /usr/bin/time: end-to-end seconds and peak RSS of `qgate oracle --stream`, writing the full capture.
set -euo pipefail
DIR=$1; DEPTH=$2; DT=${3:-f32}; ROLLOUT=${4:-0}
cd "$(dirname "$0")/.."
cargo build --release --example bench_streaming --bin qgate >/dev/null 2>&1
PLAN=$(ls "$DIR"/plan-*.safetensors | head -n 1)
BYTES=$(stat -c %s "$DIR/model.safetensors")
T0=$(date +%s.%N)
dd if="$DIR/model.safetensors" of=/dev/null bs=64M iflag=direct status=none
T1=$(date +%s.%N)
GBPS=$(python3 -c "print(f'{$BYTES / ($T1 - $T0) / 1e9:.3f}')")
echo "disk read (dd, O_DIRECT): $BYTES bytes in $(python3 -c "print(f'{$T1 - $T0:.1f}')") s = $GBPS GB/s"
# Drop the checkpoint's pages from the page cache (clean pages of a file we can read: no privileges needed).
evict() { python3 -c "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)" "$DIR/model.safetensors"; }
cached() { fincore -b -n -o RES "$DIR/model.safetensors" 2>/dev/null | awk '{printf "%.2f GB", $1/1e9}'; }
[ "${COLD:-0}" = 1 ] && evict
echo "checkpoint in the page cache before the run: $(cached)"
./target/release/examples/bench_streaming "$DIR" "$PLAN" "$GBPS" "$DEPTH" "$DT"
OUT=$(mktemp -d)
[ "${COLD:-0}" = 1 ] && evict
echo "checkpoint in the page cache before the CLI run: $(cached)"
/usr/bin/time -v ./target/release/qgate oracle --model "$DIR" --dtype "$DT" --plan "$PLAN" \
  --out "$OUT/o.capture.safetensors" --rollout "$ROLLOUT" --stream --max-memory 6GiB \
  $([ "${PREFETCH:-1}" = 0 ] && echo --no-prefetch) 2> "$OUT/time.txt"
grep -E "Elapsed|Maximum resident" "$OUT/time.txt" | sed 's/^\s*/qgate oracle --stream (CLI): /'
ls -la "$OUT/o.capture.safetensors" | awk '{print "capture bytes: " $5}'
rm -rf "$OUT"
