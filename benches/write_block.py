#!/usr/bin/env python3
"""Replaces the block between `<!-- MARK:begin -->` and `<!-- MARK:end -->` in OUT (a
markdown file; the block is appended when absent) with the text of BLOCK_FILE. The load
scripts' one way of writing their figures into docs/performance.md.

    python3 benches/write_block.py OUT MARK BLOCK_FILE
"""
import os
import re
import sys

out, mark, block_file = sys.argv[1:]
block = f"<!-- {mark}:begin -->\n" + open(block_file).read().rstrip("\n") + f"\n<!-- {mark}:end -->"
text = open(out).read() if os.path.exists(out) else "# Performance\n"
if f"<!-- {mark}:begin -->" not in text:
    text += f"\n<!-- {mark}:begin -->\n<!-- {mark}:end -->\n"
text = re.sub(f"<!-- {re.escape(mark)}:begin -->.*?<!-- {re.escape(mark)}:end -->", lambda _: block, text, flags=re.S)
open(out, "w").write(text)
print(f"written to {out}")
