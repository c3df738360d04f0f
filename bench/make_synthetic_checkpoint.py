"""Write a random bf16 checkpoint with the real Qwen3.5-27B or Qwen3.5-35B-A3B shapes but only a few layers,
for the layer-streaming benchmark (BENCHMARKS.md, "Big models"). Not committed: 27B × 4 layers ≈ 8.2 GB,
35B-A3B × 4 layers ≈ 7.5 GB.

    /work/pyenv/bin/python bench/make_synthetic_checkpoint.py 27b OUT_DIR [--layers 4]
    /work/pyenv/bin/python bench/make_synthetic_checkpoint.py 35b-a3b OUT_DIR [--layers 4]

Shapes from the reference §9 (hidden, heads, linear heads, FFN / experts, vocab 248320, untied, rope θ 1e7,
partial rotary 0.25); layer l is full attention when l % 4 == 3. Tensors are streamed into one
`model.safetensors` (never all in memory): values are slices of one pool of N(0, 0.02²) bf16 numbers;
norm offsets 0, the GDN norm weight 1, A_log log(U(1, 16)), dt_bias 1. A plan of random token ids is
written too (`OUT_DIR/plan-<T>.safetensors`, `--plan-len`, default 1024 as one sequence).
"""
import argparse
import json
import os
import struct

import numpy as np

SHAPES = {
    "27b": dict(hidden=5120, heads=24, kv=4, head_dim=256, lk=16, lv=48, dk=128, dv=128, ffn=17408),
    "35b-a3b": dict(hidden=2048, heads=16, kv=2, head_dim=256, lk=16, lv=32, dk=128, dv=128,
                    experts=256, top_k=8, moe_ffn=512, shared_ffn=512),
}
VOCAB = 248320


def tensors(s, layers):
    h = s["hidden"]
    out = [("model.embed_tokens.weight", [VOCAB, h], "normal")]
    for l in range(layers):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", [h], "zeros"),
                (p + "post_attention_layernorm.weight", [h], "zeros")]
        if l % 4 == 3:
            a = p + "self_attn."
            hd = s["head_dim"]
            out += [(a + "q_proj.weight", [s["heads"] * 2 * hd, h], "normal"),
                    (a + "k_proj.weight", [s["kv"] * hd, h], "normal"),
                    (a + "v_proj.weight", [s["kv"] * hd, h], "normal"),
                    (a + "o_proj.weight", [h, s["heads"] * hd], "normal"),
                    (a + "q_norm.weight", [hd], "zeros"),
                    (a + "k_norm.weight", [hd], "zeros")]
        else:
            g = p + "linear_attn."
            c = 2 * s["lk"] * s["dk"] + s["lv"] * s["dv"]
            out += [(g + "in_proj_qkv.weight", [c, h], "normal"),
                    (g + "in_proj_z.weight", [s["lv"] * s["dv"], h], "normal"),
                    (g + "in_proj_b.weight", [s["lv"], h], "normal"),
                    (g + "in_proj_a.weight", [s["lv"], h], "normal"),
                    (g + "conv1d.weight", [c, 1, 4], "normal"),
                    (g + "A_log", [s["lv"]], "alog"),
                    (g + "dt_bias", [s["lv"]], "ones"),
                    (g + "norm.weight", [s["dv"]], "ones"),
                    (g + "out_proj.weight", [h, s["lv"] * s["dv"]], "normal")]
        m = p + "mlp."
        if "experts" in s:
            e, i, sh = s["experts"], s["moe_ffn"], s["shared_ffn"]
            out += [(m + "gate.weight", [e, h], "normal"),
                    (m + "experts.gate_up_proj", [e, 2 * i, h], "normal"),
                    (m + "experts.down_proj", [e, h, i], "normal"),
                    (m + "shared_expert.gate_proj.weight", [sh, h], "normal"),
                    (m + "shared_expert.up_proj.weight", [sh, h], "normal"),
                    (m + "shared_expert.down_proj.weight", [h, sh], "normal"),
                    (m + "shared_expert_gate.weight", [1, h], "normal")]
        else:
            f = s["ffn"]
            out += [(m + "gate_proj.weight", [f, h], "normal"),
                    (m + "up_proj.weight", [f, h], "normal"),
                    (m + "down_proj.weight", [h, f], "normal")]
    out += [("model.norm.weight", [h], "zeros"), ("lm_head.weight", [VOCAB, h], "normal")]
    return out


def bf16(x):
    return (np.asarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--plan-len", type=int, default=1024)
    ap.add_argument("--plan-seqs", type=int, default=1)
    args = ap.parse_args()
    s = SHAPES[args.kind]
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(0)
    pool = bf16(rng.standard_normal(1 << 24, dtype=np.float32) * 0.02)  # 16 Mi values

    specs = tensors(s, args.layers)
    header, off = {}, 0
    for name, shape, _ in specs:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    path = os.path.join(args.out, "model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for name, shape, init in specs:
            n = int(np.prod(shape))
            if init == "normal":
                left, start = n, int(rng.integers(0, len(pool)))
                while left:
                    take = min(left, len(pool) - start)
                    f.write(pool[start:start + take].tobytes())
                    left -= take
                    start = 0
            elif init == "zeros":
                f.write(bf16(np.zeros(n)).tobytes())
            elif init == "ones":
                f.write(bf16(np.ones(n)).tobytes())
            elif init == "alog":
                f.write(bf16(np.log(rng.uniform(1, 16, n))).tobytes())

    layer_types = ["full_attention" if l % 4 == 3 else "linear_attention" for l in range(args.layers)]
    cfg = {
        "architectures": ["Qwen3_5MoeForCausalLM" if "experts" in s else "Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_moe_text" if "experts" in s else "qwen3_5_text",
        "vocab_size": VOCAB, "hidden_size": s["hidden"], "num_hidden_layers": args.layers,
        "layer_types": layer_types, "num_attention_heads": s["heads"], "num_key_value_heads": s["kv"],
        "head_dim": s["head_dim"], "linear_num_key_heads": s["lk"], "linear_num_value_heads": s["lv"],
        "linear_key_head_dim": s["dk"], "linear_value_head_dim": s["dv"], "linear_conv_kernel_dim": 4,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "eos_token_id": 248044,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    }
    if "experts" in s:
        cfg.update(num_experts=s["experts"], num_experts_per_tok=s["top_k"],
                   moe_intermediate_size=s["moe_ffn"], shared_expert_intermediate_size=s["shared_ffn"])
    else:
        cfg["intermediate_size"] = s["ffn"]
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    # A plan: `seq.{i}.tokens` I64 with the qgate-capture metadata.
    seqs = [rng.integers(0, VOCAB, args.plan_len // args.plan_seqs, dtype=np.int64)
            for _ in range(args.plan_seqs)]
    meta = {"format": "qgate-capture/1", "label": "bench-plan", "runtime": "synthetic", "dtype": "f32",
            "vocab_size": VOCAB}
    ph, off = {}, 0
    for i, t in enumerate(seqs):
        ph[f"seq.{i}.tokens"] = {"dtype": "I64", "shape": [len(t)], "data_offsets": [off, off + 8 * len(t)]}
        off += 8 * len(t)
    ph["__metadata__"] = {"qgate.capture": json.dumps(meta)}
    hb = json.dumps(ph, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(os.path.join(args.out, f"plan-{args.plan_len}.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for t in seqs:
            f.write(t.tobytes())
    print(f"wrote {path} ({off and os.path.getsize(path) / 2**30:.2f} GiB) and the plan")


if __name__ == "__main__":
    main()
