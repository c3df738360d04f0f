"""Compare two qgate captures of the same plan position by position (used on the GPU machine).

python bench/gpu/compare_captures.py CANDIDATE REFERENCE LABEL [TOL]
Prints max |Δlogit|, argmax agreement, argmax mismatches where the reference's top1−top2 gap ≥ 0.1, and
whether greedy rollouts agree; exits 1 when TOL is given and max |Δ| exceeds it or a confident argmax differs.
"""
import sys

from safetensors.torch import load_file

cand, ref, label = load_file(sys.argv[1]), load_file(sys.argv[2]), sys.argv[3]
tol = float(sys.argv[4]) if len(sys.argv) > 4 else None
n = len([k for k in ref if k.endswith(".tokens")])
rows = max_abs = mism = confident = roll_eq = rolls = 0
for i in range(n):
    a, b = cand[f"seq.{i}.logits"].float(), ref[f"seq.{i}.logits"].float()
    assert a.shape == b.shape, (a.shape, b.shape)
    max_abs = max(max_abs, (a - b).abs().max().item())
    top2 = b.topk(2, dim=-1).values
    differ = a.argmax(-1) != b.argmax(-1)
    mism += int(differ.sum())
    confident += int((differ & ((top2[:, 0] - top2[:, 1]) >= 0.1)).sum())
    rows += a.shape[0]
    if f"seq.{i}.rollout" in ref and f"seq.{i}.rollout" in cand:
        rolls += 1
        roll_eq += int(cand[f"seq.{i}.rollout"].tolist() == ref[f"seq.{i}.rollout"].tolist())
ok = tol is None or (max_abs <= tol and confident == 0)
print(f"{label}: {rows} rows, max|Δ| {max_abs:.3e}, argmax mismatches {mism} (confident {confident}), "
      f"rollouts equal {roll_eq}/{rolls}" + ("" if tol is None else f" [tol {tol:g}: {'PASS' if ok else 'FAIL'}]"))
sys.exit(0 if ok else 1)
