"""Sum Nsight Compute's per-kernel durations by kernel name (what a forward spends its GPU time on).

Usage: python bench/gpu/ncu_summary.py NCU_CSV [FORWARDS]  (then the 12 longest single launches)
NCU_CSV: `ncu --metrics gpu__time_duration.sum --csv --log-file F …`. FORWARDS divides the totals (the
profiled program ran that many forwards of the same length). Prints the top kernels with their share.
"""
import csv
import collections
import sys

path = sys.argv[1]
forwards = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
tot = collections.Counter()
cnt = collections.Counter()
launches = []  # (ms, kernel, grid, block) of every launch
with open(path, newline="") as f:
    lines = [l for l in f if l.startswith('"')]
for row in csv.DictReader(lines):
    if row.get("Metric Name") != "gpu__time_duration.sum":
        continue
    unit = row.get("Metric Unit", "nsecond")
    v = float(row["Metric Value"].replace(",", ""))
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(unit, 1e-6)
    name = row["Kernel Name"].split("(")[0][:90]
    tot[name] += v * scale
    cnt[name] += 1
    launches.append((v * scale, name, row.get("Grid Size", "?"), row.get("Block Size", "?")))
all_ms = sum(tot.values())
print(f"kernels: {sum(cnt.values())} launches, {all_ms / forwards:.2f} ms GPU time per forward (sum of kernel durations)")
for name, ms in tot.most_common(30):
    print(f"{ms / forwards:9.2f} ms {100 * ms / all_ms:5.1f}%  {cnt[name] / forwards:8.0f}x  {name}")
print("longest single launches (all forwards):")
for ms, name, grid, block in sorted(launches, reverse=True)[:12]:
    print(f"{ms:9.3f} ms  grid {grid:>16} block {block:>12}  {name}")
# One layer's launches in order (from the 2nd to the 3rd launch of $LAYER_MARK, default the GDN conv):
# which ops a layer runs, e.g. where its copies come from.
mark = __import__("os").environ.get("LAYER_MARK", "qgate_gdn_conv_qkv")
idx = [i for i, l in enumerate(launches) if l[1] == mark]
if len(idx) >= 3:
    print(f"one layer's launches in order (between the 2nd and 3rd {mark}):")
    for ms, name, grid, block in launches[idx[1]:idx[2]]:
        print(f"{ms:9.3f} ms  grid {grid:>16} block {block:>12}  {name}")
