#!/usr/bin/env python3
"""Write the fuzz targets' seed corpora (stdlib only): `python3 make_seeds.py [SEEDS_DIR]` fills
SEEDS_DIR/<target>/ (default: seeds/ beside this script) for every target. Seeds are small valid
inputs, built here or copied from the committed fixtures."""
import io, json, os, shutil, struct, sys, zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

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

V = 5
capture_seeds = {
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
  "oracle_rollout_margin": capture([("seq.0.tokens", "I64", [2], i64([1, 2])),
                       ("seq.0.logits", "F32", [2, V], f32([0.5 * k for k in range(10)])),
                       ("seq.0.rollout", "I64", [3], i64([4, 0, 1])),
                       ("seq.0.rollout_margin", "F32", [3, 2], f32([0.9, 3.0, 0.05, 0.2, 0.5, 1.5]))],
                      meta(V, "f32")),
}


# --- numpy ---------------------------------------------------------------------------------------
def npy(descr, shape, data, fortran=False):
    """A version-1.0 .npy file: magic, header dict padded to 64 bytes, raw data."""
    shp = "(%d,)" % shape[0] if len(shape) == 1 else "(" + ", ".join(map(str, shape)) + ")"
    h = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, shp)
    pad = 64 - (10 + len(h) + 1) % 64
    h = h + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h.encode() + data


def npz(arrays, compressed=False):
    buf = io.BytesIO()
    mode = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", mode) as z:
        for name, blob in arrays:
            z.writestr(name + ".npy", blob)
    return buf.getvalue()


npz_seeds = {
  "full_f16.npz": npz([("seq0_tokens", npy("<i8", [3], i64([1, 2, 3]))),
                       ("seq0_logits", npy("<f2", [3, V], f16([0.5 * k for k in range(15)]))),
                       ("seq0_rollout", npy("<i8", [2], i64([4, 0])))]),
  "full_f32_deflate.npz": npz([("seq0_tokens", npy("<i4", [2], i32([1, 2]))),
                               ("seq0_logits", npy("<f4", [1, 2, V], f32(range(10)))),
                               ("seq1_tokens", npy("|u1", [1], bytes([3]))),
                               ("seq1_logits", npy(">f8", [1, V], struct.pack(">5d", 5, 4, 3, 2, 1)))],
                              compressed=True),
  "topk_argmax.npz": npz([("seq0_tokens", npy("<i8", [2], i64([0, 1]))),
                          ("seq0_top_ids", npy("<i8", [2, 2], i64([1, 2, 3, 4]))),
                          ("seq0_top_logits", npy("<f4", [2, 2], f32([9, 8, 7, 6]))),
                          ("seq0_argmax", npy("<u2", [2], struct.pack("<2H", 1, 3)))]),
  "tokens_only.npz": npz([("seq0_tokens", npy("<i8", [4], i64([1, 2, 3, 4])))]),
  # bare .npy logits for the target's 16-token plan
  "plan_logits.npy": npy("<f2", [16, 4], f16([0.25 * k for k in range(64)])),
  "plan_logits_batch.npy": npy("<f4", [1, 15, 2], f32(range(30))),
}


# --- JSON / TOML ---------------------------------------------------------------------------------
GATE_TRANSCRIPT = {
    "result": "PASS", "arch": "qwen3.5", "bundle": "qwen3_5_0_8b_decode_int8hu_block32_sym",
    "protocol": {"prompt": "The capital of France is", "max_new_tokens": 4, "greedy": True},
    "input_ids": [760, 6511, 314, 9338, 369],
    "oracle": {"gen_ids": [11751, 13, 198, 760], "gen_text": " Paris.\nThe",
               "top2_margins": [0.03, 0.16, 0.19, 0.15]},
    "engine": {"gen_text": " Paris.\nThe"},
    "match": {"exact_prefix": 4, "of": 4, "first_divergence": None},
    "schema": "coreai-gate-transcript/1", "generated_at": "2026-07-28T04:31:00+00:00",
}
GATE_FAIL = dict(GATE_TRANSCRIPT, result="FAIL", engine={"gen_text": " Lyon.", "gen_ids": [55, 13]})
GATE_NO_IDS = {k: v for k, v in GATE_TRANSCRIPT.items() if k != "input_ids"}
VERIFY_TRANSCRIPT = {
    "schema": "coreai-verify-transcript/1", "generated_at": "2026-07-30T10:00:00+00:00",
    "prompt": "The alphabet begins", "margin_floor": 0.1, "input_ids": [1, 2, 3],
    "oracle_ids": [8, 9, 10, 9, 15], "oracle_text": " G, H,", "bundle_text": " G, H, I",
    "margins": [0.99, 0.98, 0.97, 0.96, 0.95], "result": "PASS",
}
transcript_seeds = {
    "gate_pass.json": json.dumps(GATE_TRANSCRIPT).encode(),
    "gate_fail_ids.json": json.dumps(GATE_FAIL).encode(),
    "gate_prompt_only.json": json.dumps(GATE_NO_IDS).encode(),
    "verify.json": json.dumps(VERIFY_TRANSCRIPT).encode(),
}

release = open(os.path.join(ROOT, "gates/release.toml"), "rb").read()
policy_seeds = {
    "release.toml": release,
    "logit_list.toml": b"""schema = "qgate-gate/1"
margin_space = "logit"
margin_floor = 1.5
max_introduced_confident_flips = 2
rollout_prefix = 8
positions = "last"
sequences = [0, 2]
require_confident_prompt = true
""",
    "minimal.toml": b"""schema = "qgate-gate/1"
margin_space = "prob"
margin_floor = 0.0
max_introduced_confident_flips = 0
rollout_prefix = "off"
positions = "all"
sequences = "all"
""",
}


def copy_fixtures(pattern_dir, names):
    return {n.replace("/", "_"): open(os.path.join(ROOT, pattern_dir, n), "rb").read() for n in names}


llm_runner_seeds = copy_fixtures("fixtures/llm-runner", [
    "raw-full-f16.json", "raw-full-f32-x86.json", "raw-top5.json", "generation-full.json"])
config_seeds = copy_fixtures("fixtures/models", [
    "dense-gva-untied/config.json", "dense-vl-tied/config.json", "moe-experts/config.json",
    "moe-fused/config.json", "dense-gva-untied/generation_config.json"])

ALL = {
    "capture_reader": capture_seeds,
    "npz_reader": npz_seeds,
    "llm_runner_reader": llm_runner_seeds,
    "transcript_reader": transcript_seeds,
    "policy_reader": policy_seeds,
    "config_reader": config_seeds,
}

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "seeds")
    for target, seeds in ALL.items():
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        for k, b in seeds.items():
            open(os.path.join(d, k), "wb").write(b)
        print(f"{d}: {len(seeds)} seeds")
