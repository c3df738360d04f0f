"""Peer measurement on a GPU: teacher-forced HF transformers forward over T random tokens.

Prints one JSON line: the median of REPS timed forwards (each ended by torch.cuda.synchronize) after a
warm-up forward at the full length, tokens/s, torch's peak allocated / reserved GPU memory, the attention
implementation and whether flash-linear-attention (fla) ran the Gated DeltaNet layers. Usage:
python bench/gpu/hf_forward_gpu.py MODEL_DIR DTYPE T [REPS [ATTN]]   (ATTN: eager (default) or sdpa)
transformers uses fla's kernels by itself when `fla` is importable; the caller decides by PYTHONPATH.
"""
import importlib.util
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import Qwen3_5ForCausalLM

model_dir, dtype, t = sys.argv[1], sys.argv[2], int(sys.argv[3])
reps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
attn = sys.argv[5] if len(sys.argv) > 5 else "eager"
dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
# HF's own defaults: TF32 off for f32 matmuls (torch's default), eager attention.
model = Qwen3_5ForCausalLM.from_pretrained(model_dir, dtype=dt, attn_implementation=attn).eval().to("cuda")
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (1, t), generator=g).to("cuda")
times = []
with torch.no_grad():
    model(ids)  # warm-up at the full length (kernel selection, allocator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        t0 = time.perf_counter()
        out = model(ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del out
s = statistics.median(times)
print(json.dumps({"runtime": "transformers", "dtype": dtype, "T": t, "seconds": s, "tokens_per_s": t / s,
                  "gpu_peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
                  "gpu_peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
                  "torch": torch.__version__, "transformers": transformers.__version__, "reps": reps,
                  "attn": attn, "fla": importlib.util.find_spec("fla") is not None}))
