"""Write a qgate-capture/1 plan of N random token sequences of length T (for sharding benchmarks).

python bench/gpu/make_plan.py OUT N T VOCAB [SEED]
"""
import json
import sys

import numpy as np
from safetensors.numpy import save_file

out, n, t, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(int(sys.argv[5]) if len(sys.argv) > 5 else 0)
tensors = {f"seq.{i}.tokens": rng.integers(3, vocab, size=t, dtype=np.int64) for i in range(n)}
meta = {"format": "qgate-capture/1", "label": f"random-{n}x{t}", "runtime": "plan", "dtype": "none",
        "vocab_size": vocab}
save_file(tensors, out, metadata={"qgate.capture": json.dumps(meta)})
print(f"wrote {out}: {n} sequences of {t} tokens")
