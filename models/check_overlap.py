"""Checks that no training row is a near-copy of a test row.

    python models/check_overlap.py [--data models/data] [--tests models/eval/*.jsonl]

A row's text is its canonical rendering (models/acge_input.py), lower-cased, split
into words; two rows are near-copies when the Jaccard similarity of their sets of word
5-grams is at least `--jaccard` (0.5). Rows shorter than five words are compared by
their word sets. Prints every near-copy pair and exits 1 if there is one.
"""
import argparse
import glob
import json
import os
import re
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import acge_input  # noqa: E402


def shingles(case, n=5):
    words = re.findall(r"[a-z0-9]+", acge_input.render(case).decode("utf-8", "replace").lower())
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def rows(paths):
    for path in paths:
        for k, line in enumerate(open(path, encoding="utf-8")):
            if line.strip():
                yield f"{os.path.relpath(path)}:{k + 1}", json.loads(line)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(here, "data"))
    ap.add_argument("--tests", nargs="*", default=sorted(glob.glob(os.path.join(here, "eval", "*.jsonl"))))
    ap.add_argument("--jaccard", type=float, default=0.5)
    args = ap.parse_args()

    train = [(where, shingles(c)) for where, c in rows(sorted(glob.glob(os.path.join(args.data, "*.jsonl"))))]
    index = defaultdict(list)
    for i, (_, s) in enumerate(train):
        for g in s:
            index[g].append(i)
    found = 0
    tests = 0
    for where, case in rows(args.tests):
        tests += 1
        s = shingles(case)
        shared = defaultdict(int)
        for g in s:
            for i in index.get(g, ()):
                shared[i] += 1
        for i, k in shared.items():
            jaccard = k / (len(s) + len(train[i][1]) - k)
            if jaccard >= args.jaccard:
                found += 1
                print(f"{where} ~ {train[i][0]}: Jaccard {jaccard:.2f}")
    print(f"{tests} test rows against {len(train)} training rows: {found} near-copies (word 5-gram Jaccard ≥ {args.jaccard})")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
