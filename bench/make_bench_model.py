"""Write a random-weight checkpoint with the real Qwen3.5-0.8B shapes (bf16 on disk) for benchmarks.

Not committed (≈1.6 GB). Usage: python bench/make_bench_model.py OUT_DIR
"""
import sys

import torch
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

out = sys.argv[1]
torch.manual_seed(0)
cfg = Qwen3_5TextConfig(
    vocab_size=248320, hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
    head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, intermediate_size=3584, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
    rms_norm_eps=1e-6, eos_token_id=248044,
)
model = Qwen3_5ForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out)
print(f"wrote {out}")
