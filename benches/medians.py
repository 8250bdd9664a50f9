#!/usr/bin/env python3
"""The medians of wrk rounds (`wrk_round` in benches/lib.sh writes them: round, target,
requests/s, p50, p99, failed), as a markdown table against the first target.

    python3 benches/medians.py RESULTS "HEADER OF THE FIRST COLUMN" TARGET...
"""
import re
import statistics
import sys

results, column, *targets = sys.argv[1:]


def ms(s):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", s)
    v = float(m.group(1))
    return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]


rows = {}
for line in open(results):
    _, t, rps, p50, p99, failed = line.rstrip("\n").split("\t")
    rows.setdefault(t, []).append((float(rps), ms(p50), ms(p99), int(failed)))
base = statistics.median(r[0] for r in rows[targets[0]])
print(f"| {column} | requests/s (median) | p50 ms | p99 ms | vs {targets[0]} | failed |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for t in targets:
    v = rows[t]
    rps, p50, p99 = (statistics.median(r[i] for r in v) for i in range(3))
    print(f"| {t} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {rps / base:.2f}× | {sum(r[3] for r in v)} |")
