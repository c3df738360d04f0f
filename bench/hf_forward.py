"""Peer measurement: one teacher-forced HF transformers forward (eager, CPU) over T random tokens.

Prints one JSON line: tokens/s (the median of REPS timed forwards, default 1) after a warm-up call, and
peak RSS. Usage: python bench/hf_forward.py MODEL_DIR DTYPE T THREADS [REPS]
"""
import json
import resource
import sys
import time

import torch
from transformers import Qwen3_5ForCausalLM

model_dir, dtype, t, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
reps = int(sys.argv[5]) if len(sys.argv) > 5 else 1
torch.set_num_threads(threads)
dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
model = Qwen3_5ForCausalLM.from_pretrained(model_dir, dtype=dt, attn_implementation="eager").eval()
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (1, t), generator=g)
with torch.no_grad():
    model(ids[:, :16])  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - t0)
    dt_s = sorted(times)[len(times) // 2]
rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
print(json.dumps({"runtime": "transformers", "dtype": dtype, "T": t, "seconds": dt_s, "tokens_per_s": t / dt_s,
                  "peak_rss_gb": rss_gb, "torch": torch.__version__, "reps": reps}))
