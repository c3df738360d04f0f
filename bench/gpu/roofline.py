"""Roofline for one teacher-forced forward of a Qwen3.5 checkpoint over T tokens on a GPU.

python bench/gpu/roofline.py MODEL_DIR T DTYPE [HBM_TB_S] [PEAK_TFLOPS]
Weights bytes: every matrix the forward reads once (the tied head counted once), at DTYPE's width.
FLOPs: 2·T·(weights of every Linear incl. the head) + causal attention (2·T²·heads·head_dim per
full-attention layer, QKᵀ and PV, halved for causality ×2) + the chunked delta rule (per value head and
chunk of 64: the UT solve and six 64×128-sized products, ≈ 2·64·(6·Dk·Dv + 3·64·(Dk+Dv)) per chunk).
Defaults: H100 SXM — 3.35 TB/s HBM3; 989 TFLOP/s dense bf16/f16 tensor cores, 67 TFLOP/s f32 (no TF32).
"""
import json
import sys

cfg = json.load(open(f"{sys.argv[1]}/config.json"))
cfg = cfg.get("text_config", cfg)
t, dtype = int(sys.argv[2]), sys.argv[3]
bw = float(sys.argv[4]) if len(sys.argv) > 4 else 3.35
peak = float(sys.argv[5]) if len(sys.argv) > 5 else (67.0 if dtype == "f32" else 989.0)
h, v = cfg["hidden_size"], cfg["vocab_size"]
types = cfg.get("layer_types") or [
    "full_attention" if (i + 1) % cfg.get("full_attention_interval", 4) == 0 else "linear_attention"
    for i in range(cfg["num_hidden_layers"])]
nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
hk, hv, dk, dv = (cfg["linear_num_key_heads"], cfg["linear_num_value_heads"], cfg["linear_key_head_dim"],
                  cfg["linear_value_head_dim"])
ffn = 3 * h * cfg["intermediate_size"]
attn = h * nh * 2 * hd + 2 * h * nkv * hd + nh * hd * h
gdn = h * (2 * hk * dk + hv * dv) + h * hv * dv + 2 * h * hv + hv * dv * h
linear = sum((attn if k == "full_attention" else gdn) + ffn for k in types) + v * h
flops = 2 * t * linear
flops += sum(2 * t * t * nh * hd for k in types if k == "full_attention")
chunks = -(-t // 64)
flops += sum(hv * chunks * 2 * 64 * (6 * dk * dv + 3 * 64 * (dk + dv)) for k in types if k != "full_attention")
width = 4 if dtype == "f32" else 2
bytes_ = linear * width
t_mem, t_flop = bytes_ / (bw * 1e12), flops / (peak * 1e12)
print(json.dumps({"T": t, "dtype": dtype, "weights_gb": bytes_ / 1e9, "tflop": flops / 1e12,
                  "hbm_tb_s": bw, "peak_tflops": peak, "t_weights_ms": t_mem * 1e3, "t_flops_ms": t_flop * 1e3,
                  "roofline_ms": max(t_mem, t_flop) * 1e3, "roofline_tok_s": t / max(t_mem, t_flop)}))
