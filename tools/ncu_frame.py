#!/usr/bin/env python3
"""Where one Moshi frame's time goes, from Nsight Compute's per-kernel CSV.

Input: `ncu --csv --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum`
over an eager `ttt-moshi bench --no-graph` run (tools/gpu_profile.sh frame). The frames repeat the
same kernel sequence, so the last frame is the smallest period P (>= --min-kernels) that the tail's
last three blocks of P kernels share. Its kernels are grouped by name (template arguments cut) and
grid, and each group gets its time, bytes and bandwidth (bytes / time), so the kernels far from the
copy bandwidth stand out.

    python3 tools/ncu_frame.py ncu_frame.csv [--bandwidth-tbs 4.2] [--top 30]
"""
import argparse
import csv
import re
import sys
from collections import defaultdict


def short(name):
    """A kernel name without its template arguments and parameter list."""
    out, depth = [], 0
    for ch in name:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    s = "".join(out).strip()
    s = re.sub(r"^(void|ttt::\S*::)\s*", "", s)
    return s.split("::")[-1] or name[:60]


def as_float(text):
    return float(text.replace(",", "")) if text not in ("", "n/a") else 0.0


def read(path):
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # skip ncu's ==PROF== lines
    rows = list(csv.DictReader(lines))
    units = rows[0] if rows and not rows[0].get("ID") else {}
    rows = [r for r in rows if r.get("ID")]
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}
    tscale = scale.get(units.get("gpu__time_duration.sum", "nsecond"), 1e-3)
    bscale = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}
    out = []
    for r in rows:
        b = 0.0
        for m in ("dram__bytes_read.sum", "dram__bytes_write.sum"):
            if m in r:
                b += as_float(r[m]) * bscale.get(units.get(m, "byte"), 1.0)
        out.append({"name": r["Kernel Name"], "grid": r.get("Grid Size", ""), "us":
                    as_float(r["gpu__time_duration.sum"]) * tscale, "bytes": b})
    return out


def last_frame(ks, min_kernels):
    names = [k["name"] for k in ks]
    n = len(names)
    for p in range(min_kernels, n // 3 + 1):
        if names[n - p:] == names[n - 2 * p:n - p] == names[n - 3 * p:n - 2 * p]:
            return ks[n - p:]
    sys.exit(f"no repeating frame of >= {min_kernels} kernels in {n} kernels (need >= 3 identical frames)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--min-kernels", type=int, default=200)
    ap.add_argument("--bandwidth-tbs", type=float, default=0.0, help="copy bandwidth for the floor column")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    frame = last_frame(read(a.csv), a.min_kernels)
    groups = defaultdict(lambda: [0, 0.0, 0.0])
    for k in frame:
        g = groups[(short(k["name"]), k["grid"])]
        g[0] += 1
        g[1] += k["us"]
        g[2] += k["bytes"]
    total_us = sum(k["us"] for k in frame)
    total_b = sum(k["bytes"] for k in frame)
    print(f"frame: {len(frame)} kernels, {total_us / 1e3:.3f} ms of kernel time (caches flushed per kernel), "
          f"{total_b / 1e9:.2f} GB of DRAM traffic, {total_b / total_us / 1e6:.2f} TB/s on average")
    if a.bandwidth_tbs:
        print(f"floor for those bytes at {a.bandwidth_tbs} TB/s: {total_b / a.bandwidth_tbs / 1e9:.3f} ms")
    print(f"{'kernel':48} {'grid':>14} {'calls':>5} {'total us':>9} {'% time':>6} {'MB':>9} {'TB/s':>5}"
          + (f" {'x floor':>7}" if a.bandwidth_tbs else ""))
    for (name, grid), (c, us, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:a.top]:
        line = (f"{name[:48]:48} {grid[:14]:>14} {c:5d} {us:9.1f} {100 * us / total_us:6.1f} {b / 1e6:9.1f} "
                f"{b / us / 1e6 if us else 0:5.2f}")
        if a.bandwidth_tbs:
            floor_us = b / a.bandwidth_tbs / 1e6
            line += f" {us / floor_us if floor_us else 0:7.2f}"
        print(line)
    by_name = defaultdict(lambda: [0, 0.0, 0.0])
    for k in frame:
        g = by_name[short(k["name"])]
        g[0] += 1
        g[1] += k["us"]
        g[2] += k["bytes"]
    print("\nby kernel:")
    for name, (c, us, b) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        print(f"{name[:60]:60} {c:5d} {us:9.1f} us {100 * us / total_us:5.1f}% {b / us / 1e6 if us else 0:5.2f} TB/s")


if __name__ == "__main__":
    main()
