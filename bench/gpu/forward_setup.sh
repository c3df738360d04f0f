# Sourced by profile.sh and ncu_detail.sh on the GPU machine: unpack the qgate bench binary to $Q, install
# the carried transformers wheel (to write the random bench model), the CUDA libraries, the 0.8B-shaped
# bench model in /tmp/bench-0.8b, and $OUT.
OUT=${OUT:-/tmp/qgate-gpu-out}; mkdir -p "$OUT"
Q=/tmp/qgate-gpu; mkdir -p $Q
gunzip -c .gpu/bench_oracle.gz > $Q/bench_oracle && chmod +x $Q/bench_oracle
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/transformers-*.whl \
  && export PYTHONPATH=/tmp/site
source "$(dirname "${BASH_SOURCE[0]}")/cuda_libs.sh"
[ -d /tmp/bench-0.8b ] || python3 bench/make_bench_model.py /tmp/bench-0.8b >/dev/null
