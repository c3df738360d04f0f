#!/usr/bin/env bash
# On the GPU machine: Nsight Compute's speed-of-light, occupancy and warp-stall sections for the kernels
# named by KERNELS (a regex), one launch each from the timed forward, bf16 T = 4,096 on the 0.8B shapes.
# Needs what profile.sh needs. Usage: KERNELS="qgate_chunk_scan|qgate_rms_norm" bash bench/gpu/ncu_detail.sh
set -uo pipefail
source "$(dirname "$0")/forward_setup.sh"
T=${T:-4096}; DT=${DT:-bf16}
# Skip the warm-up forward's launches of each kernel (24 layers' worth), then one launch per kernel name.
ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
    --clock-control none -k "regex:${KERNELS:-qgate_chunk_scan}" --launch-skip ${SKIP:-30} --launch-count ${COUNT:-4} \
    $Q/bench_oracle /tmp/bench-0.8b $DT $T cuda 1 > $OUT/ncu_detail.txt 2>>$OUT/ncu.err
grep -E "^  [a-z_0-9]+\(|qgate_|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Warp Cycles Per Issued|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Issue Slots|Stall|One or More" $OUT/ncu_detail.txt | head -${LINES_MAX:-120}
