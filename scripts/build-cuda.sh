#!/usr/bin/env bash
# Build qgate with the `cuda` feature on a machine with no CUDA toolkit and no GPU driver (issue 7).
#
#   scripts/build-cuda.sh            # -> target/cuda/release/qgate, .gpu/{qgate,bench_oracle,gpu_ops_check}.gz
#
# The toolkit comes from NVIDIA's PyPI wheels, every piece pinned to one CUDA 13.0 release (newer
# components emit PTX/cubins the H100's 580-series driver cannot load). libcuda.so is the driver: none is
# installed here, so we link against a generated stub with the right SONAME; the real one is found at run
# time on the GPU machine. Kernels are built for CUDA_COMPUTE_CAP=90 (Hopper) unless you set it.
#
# Run time on the GPU machine: the binary needs libcudart.so.13, libcublas(.Lt).so.13, libcurand.so.10,
# libnvrtc.so.13 (all in the `nvidia-*` cu13 wheels that PyTorch installs) and the driver's libcuda.so.1;
# `scripts/cuda-env.sh` puts the wheel folders on LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
TK=${QGATE_CUDA_TOOLKIT:-$HOME/.cache/qgate/cuda-13.0}
PY=${PYTHON:-python3}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

WHEELS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
)

if [ ! -x "$TK/bin/nvcc" ]; then
  echo "[build-cuda] fetching the CUDA 13.0 toolkit wheels into $TK" >&2
  rm -rf "$TK.tmp"; mkdir -p "$TK.tmp/wheels" "$TK.tmp/unpacked"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      -d "$TK.tmp/wheels" "${WHEELS[@]}"
  for w in "$TK.tmp"/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$TK.tmp/unpacked"; done
  # The cu13 wheels put everything under nvidia/cu13/{bin,include,lib,nvvm}: merge into one CUDA_HOME.
  mkdir -p "$TK.tmp/home"
  cp -a "$TK.tmp"/unpacked/nvidia/cu13/. "$TK.tmp/home/"
  chmod +x "$TK.tmp"/home/bin/* "$TK.tmp"/home/nvvm/bin/* 2>/dev/null || true
  # Unversioned names for the linker (the wheels ship only libX.so.N).
  ( cd "$TK.tmp/home/lib" && for f in lib*.so.*; do b=${f%%.so.*}.so; [ -e "$b" ] || ln -s "$f" "$b"; done )
  rm -rf "$TK"; mv "$TK.tmp/home" "$TK"; rm -rf "$TK.tmp"
fi

# libcuda stub: every cu* entry point cudarc declares, as an empty function, SONAME libcuda.so.1.
if [ ! -e "$TK/lib/stubs/libcuda.so" ]; then
  # cudarc's sources are in the cargo registry only once something downloaded them: on a fresh clone and a
  # fresh ~/.cargo nothing has, so fetch the locked dependencies first (unpacks them into registry/src).
  cargo fetch --locked
  # The cudarc version Cargo.lock pins (candle-core's cuda feature pulls it in).
  CUDARC_VERSION=$(awk '/^name = "cudarc"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)
  if [ -z "$CUDARC_VERSION" ]; then
    echo "[build-cuda] Cargo.lock names no cudarc: is the cuda feature's dependency tree locked?" >&2
    exit 2
  fi
  CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$CUDARC_VERSION" 2>/dev/null | tail -n 1)
  if [ -z "$CUDARC" ] || [ ! -f "$CUDARC/src/driver/sys/mod.rs" ]; then
    echo "[build-cuda] cudarc $CUDARC_VERSION sources not found under ${CARGO_HOME:-$HOME/.cargo}/registry/src after cargo fetch" >&2
    exit 2
  fi
  mkdir -p "$TK/lib/stubs"
  grep -hoE '^\s+fn cu[A-Za-z0-9_]+\(' "$CUDARC/src/driver/sys/mod.rs" | sed -E 's/^\s+fn //; s/\($//' \
    | sort -u | awk '{print "void " $1 "(void) {}"}' > "$TK/lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$TK/lib/stubs/libcuda.so" "$TK/lib/stubs/libcuda_stub.c"
fi

export CUDA_HOME=$TK CUDA_PATH=$TK CUDA_ROOT=$TK PATH=$TK/bin:$PATH
export LIBRARY_PATH=$TK/lib:$TK/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
nvcc --version | tail -n 2 >&2
# Own target folder: candle built with `cuda` must not evict the CPU build's artefacts.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
cargo build --release --features cuda --bin qgate --example bench_oracle --example gpu_ops_check "$@"
# Gzipped copies for the GPU machine (the device tool carries at most 64 MiB): .gpu/ is git-ignored.
mkdir -p .gpu
gzip -6 -c "$CARGO_TARGET_DIR/release/qgate" > .gpu/qgate.gz
gzip -6 -c "$CARGO_TARGET_DIR/release/examples/bench_oracle" > .gpu/bench_oracle.gz
gzip -6 -c "$CARGO_TARGET_DIR/release/examples/gpu_ops_check" > .gpu/gpu_ops_check.gz
ls -l .gpu/*.gz >&2
