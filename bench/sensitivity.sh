#!/usr/bin/env bash
# Cost of the sensitivity map with prefix reuse against the naive map (one full simulation per part),
# both in this one invocation (issue 16, Cost). Usage: bench/sensitivity.sh MODEL_DIR [T] [THREADS] [SAMPLE]
#   MODEL_DIR: bench/make_bench_model.py output (Qwen3.5-0.8B shapes: 24 layers, vocab 248320).
#   SAMPLE: the parts the naive baseline simulates (default: a DeltaNet, an MLP and an attention part at
#   the first, middle and last layers, and the head); `all` for every part (~50 full simulations).
# Runs `qgate sweep --sensitivity int4` twice on one T-token sequence (bf16 oracle, cached after the first
# run; f16 compute): the whole map with prefix reuse, then the naive map of SAMPLE (`--sensitivity-naive
# --sensitivity-parts`). Reads each map's own timing (`ladder.sensitivity.seconds`: residual streams, every
# part's load, forward, head and judgement; not the oracle or the ladder) from summary.json, checks that
# the sampled parts hold the same numbers in both maps, and prints the prefix-reuse time against the
# naive cost of every part (a naive part always loads and runs the whole model, so its mean over the
# sample × the number of parts is the naive map's cost).
set -euo pipefail
MODEL=$1; T=${2:-256}; THREADS=${3:-2}; SAMPLE=${4:-gdn@0,mlp@12,attn@23,head}
cd "$(dirname "$0")/.."
# QGATE=path: use that binary (else the release build)
[ -n "${QGATE:-}" ] || cargo build --release --bin qgate >/dev/null 2>&1
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
VOCAB=$(python3 -c "import json,sys; c=json.load(open(sys.argv[1])); print(c.get('text_config', c)['vocab_size'])" "$MODEL/config.json")
python3 - "$TMP/plan.safetensors" "$T" "$VOCAB" <<'PY'
import json, struct, sys
path, t, VOCAB = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s, toks = 5, []
for _ in range(t):
    s = (s * 6364136223846793005 + 1442695040888963407) % (1 << 64)
    toks.append(16 + (s >> 33) % (VOCAB - 320))
meta = {"format": "qgate-capture/1", "label": "plan", "runtime": "bench", "dtype": "none", "vocab_size": VOCAB}
b = struct.pack(f"<{t}q", *toks)
h = json.dumps({"__metadata__": {"qgate.capture": json.dumps(meta)},
                "seq.0.tokens": {"dtype": "I64", "shape": [t], "data_offsets": [0, len(b)]}}).encode()
h += b" " * (-len(h) % 8)
open(path, "wb").write(struct.pack("<Q", len(h)) + h + b)
PY
export QGATE_ORACLE_CACHE="$TMP/oracles" RAYON_NUM_THREADS=$THREADS
Q=${QGATE:-./target/release/qgate}
for mode in prefix naive; do
  extra=()
  if [ "$mode" = naive ]; then
    extra=(--sensitivity-naive)
    [ "$SAMPLE" = all ] || extra+=(--sensitivity-parts "$SAMPLE")
  fi
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
by = {r["label"]: r for r in p["parts"]}
same = all(all(by[b["label"]][k] == b[k] for k in keys) for b in n["parts"])
parts, k = len(p["parts"]), len(n["parts"])
naive_all = n["seconds"] / k * parts
print(f"T={sys.argv[3]} threads={sys.argv[4]} parts={parts} layers={p['layers']}")
print(f"prefix reuse, every part: {p['seconds']:.1f} s ({p['seconds'] / parts:.2f} s/part), {p['layer_passes']} layer passes")
print(f"naive, {k} sampled parts ({', '.join(r['label'] for r in n['parts'])}): {n['seconds']:.1f} s ({n['seconds'] / k:.2f} s/part)")
print(f"naive cost of every part ({parts} x {n['seconds'] / k:.2f} s): {naive_all:.1f} s, {p['layer_passes_naive']} layer passes")
print(f"ratio prefix/naive: {p['seconds'] / naive_all:.3f} (target <= 0.7); sampled parts identical in both maps: {same}")
worst = max(p["parts"], key=lambda r: r["introduced_confident_flips"])
print(f"most flips: {worst['label']} ({worst['introduced_confident_flips']})")
PY
