#!/usr/bin/env bash
# Cost of the sensitivity map with prefix reuse against the naive map (one full simulation per part),
# both in this one invocation (issue 16, Cost). Usage: bench/sensitivity.sh MODEL_DIR [T] [THREADS]
#   MODEL_DIR: bench/make_bench_model.py output (Qwen3.5-0.8B shapes: 24 layers, vocab 248320).
# Runs `qgate sweep --sensitivity int4` twice on one T-token sequence (bf16 oracle, cached after the first
# run; f16 compute), once with prefix reuse and once with `--sensitivity-naive`, reads the map's own
# timing (`ladder.sensitivity.seconds`: the residual streams / every part's simulation and judgement,
# without the oracle and the ladder) from each summary.json, checks that both maps hold the same numbers
# part by part, and prints both times, the ratio and the decoder-layer passes.
set -euo pipefail
MODEL=$1; T=${2:-256}; THREADS=${3:-2}
cd "$(dirname "$0")/.."
cargo build --release --bin qgate >/dev/null 2>&1
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
python3 - "$TMP/plan.safetensors" "$T" <<'PY'
import json, struct, sys
path, t = sys.argv[1], int(sys.argv[2])
s, toks = 5, []
for _ in range(t):
    s = (s * 6364136223846793005 + 1442695040888963407) % (1 << 64)
    toks.append(16 + (s >> 33) % 248000)
meta = {"format": "qgate-capture/1", "label": "plan", "runtime": "bench", "dtype": "none", "vocab_size": 248320}
b = struct.pack(f"<{t}q", *toks)
h = json.dumps({"__metadata__": {"qgate.capture": json.dumps(meta)},
                "seq.0.tokens": {"dtype": "I64", "shape": [t], "data_offsets": [0, len(b)]}}).encode()
h += b" " * (-len(h) % 8)
open(path, "wb").write(struct.pack("<Q", len(h)) + h + b)
PY
export QGATE_ORACLE_CACHE="$TMP/oracles" RAYON_NUM_THREADS=$THREADS
Q=./target/release/qgate
for mode in prefix naive; do
  extra=()
  [ "$mode" = naive ] && extra=(--sensitivity-naive)
  s=$(date +%s.%N)
  "$Q" --quiet sweep --model "$MODEL" --plan "$TMP/plan.safetensors" --oracle bf16 --schemes int8lin \
    --sensitivity int4 "${extra[@]}" --out "$TMP/$mode" --captures "$TMP/$mode-captures" --json \
    > "$TMP/$mode.json" 2> "$TMP/$mode.err" || { code=$?; [ $code -le 1 ] || { cat "$TMP/$mode.err"; exit 1; }; }
  echo "sweep ($mode map): wall $(echo "$(date +%s.%N) - $s" | bc) s (oracle, ladder and map)"
done
python3 - "$TMP/prefix.json" "$TMP/naive.json" "$T" "$THREADS" <<'PY'
import json, sys
p, n = (json.load(open(f))["ladder"]["sensitivity"] for f in sys.argv[1:3])
keys = ("introduced_confident_flips", "confident_flips", "tie_flips", "mean_kl", "min_cosine", "bytes_low")
same = all(a["label"] == b["label"] and all(a[k] == b[k] for k in keys) for a, b in zip(p["parts"], n["parts"]))
print(f"T={sys.argv[3]} threads={sys.argv[4]} parts={len(p['parts'])} layers={p['layers']}")
print(f"prefix reuse: {p['seconds']:.1f} s, {p['layer_passes']} layer passes")
print(f"naive (one full simulation per part): {n['seconds']:.1f} s, {n['layer_passes']} layer passes")
print(f"ratio prefix/naive: {p['seconds'] / n['seconds']:.3f} (target <= 0.7); identical numbers: {same}")
worst = max(p["parts"], key=lambda r: r["introduced_confident_flips"])
print(f"most flips: {worst['label']} ({worst['introduced_confident_flips']})")
PY
