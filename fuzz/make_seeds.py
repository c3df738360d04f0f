#!/usr/bin/env python3
"""Write small valid qgate-capture/1 files as the fuzzer's seed corpus (stdlib only)."""
import json, struct, sys, os

def capture(tensors, meta):
    header, blobs, off = {"__metadata__": {"qgate.capture": json.dumps(meta)}}, [], 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data); off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)

def meta(v, dtype="f16", **kw):
    m = {"format": "qgate-capture/1", "label": "seed", "runtime": "seed", "dtype": dtype, "vocab_size": v}
    m.update(kw); return m

i64 = lambda xs: struct.pack(f"<{len(xs)}q", *xs)
i32 = lambda xs: struct.pack(f"<{len(xs)}i", *xs)
f32 = lambda xs: struct.pack(f"<{len(xs)}f", *xs)
f16 = lambda xs: struct.pack(f"<{len(xs)}e", *xs)
bf16 = lambda xs: b"".join(struct.pack("<f", x)[2:] for x in xs)

out = sys.argv[1]
V = 5
seeds = {
  "full_f16": capture([("seq.0.tokens", "I64", [3], i64([1, 2, 3])),
                       ("seq.0.logits", "F16", [3, V], f16([0.5 * k for k in range(15)])),
                       ("seq.0.rollout", "I64", [2], i64([4, 0]))], meta(V)),
  "full_f32_two_seqs": capture([("seq.0.tokens", "I32", [2], i32([1, 2])),
                       ("seq.0.logits", "F32", [1, V], f32([1, 2, 3, 4, 5])),
                       ("seq.1.tokens", "I64", [1], i64([3])),
                       ("seq.1.logits", "BF16", [1, V], bf16([5, 4, 3, 2, 1]))], meta(V, "f32")),
  "topk_argmax": capture([("seq.0.tokens", "I64", [2], i64([0, 1])),
                       ("seq.0.top_ids", "I64", [2, 2], i64([1, 2, 3, 4])),
                       ("seq.0.top_logits", "F32", [2, 2], f32([9, 8, 7, 6])),
                       ("seq.0.argmax", "I64", [2], i64([1, 3]))], meta(V, "f32")),
  "plan_only": capture([("seq.0.tokens", "I64", [4], i64([1, 2, 3, 4]))], meta(V, "none", extra={"k": [1]})),
}
os.makedirs(out, exist_ok=True)
for k, b in seeds.items():
    open(os.path.join(out, k), "wb").write(b)
