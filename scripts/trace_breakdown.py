#!/usr/bin/env python3
"""GPU time of a profiled step by the autograd node or forward op that launched it.

Reads the Chrome trace of `moetrain bench --profile 1 --trace FILE` (plain or .gz) and
attributes every kernel to the outermost `autograd::engine::evaluate_function: X`
(backward node X) or, in the forward pass, the outermost op around it, next to the
innermost ATen op. Prints the largest rows: ms, kernel count, node, op.

usage: trace_breakdown.py TRACE.json[.gz] [--top N]
"""
import argparse
import gzip
import json
from collections import defaultdict


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        d = json.load(f)
    return d["traceEvents"] if isinstance(d, dict) else d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    ev = load(args.trace)
    ops = [e for e in ev if e.get("cat") == "cpu_op"]
    by_ext = {e["args"]["External id"]: e for e in ops if "External id" in e.get("args", {})}
    by_tid = defaultdict(list)
    for e in ops:
        by_tid[e["tid"]].append(e)
    for t in by_tid:
        by_tid[t].sort(key=lambda e: e["ts"])

    def enclosing(op):  # ops on the same thread around op, outermost first
        around = [o for o in by_tid[op["tid"]]
                  if o["ts"] <= op["ts"] and o["ts"] + o["dur"] >= op["ts"] + op["dur"]]
        return sorted(around, key=lambda o: -o["dur"])

    rows = defaultdict(lambda: [0.0, 0])
    total = 0.0
    for k in ev:
        if k.get("cat") not in ("kernel", "gpu_memset", "gpu_memcpy"):
            continue
        ms = k["dur"] / 1000.0
        total += ms
        op = by_ext.get(k.get("args", {}).get("External id"))
        if op is None:
            key = ("(no launching op recorded)", k["name"][:60])
        else:
            names = [o["name"] for o in enclosing(op)]
            node = next((n for n in names if n.startswith("autograd::engine::evaluate_function")), None)
            where = "bwd " + node.split(": ", 1)[-1] if node else "fwd " + (names[0] if names else op["name"])
            key = (where, op["name"])
        rows[key][0] += ms
        rows[key][1] += 1
    print(f"GPU time {total:.1f} ms")
    print(f"{'ms':>8} {'kernels':>7}  {'node / forward op':55} launching op")
    for (where, inner), (ms, n) in sorted(rows.items(), key=lambda r: -r[1][0])[: args.top]:
        print(f"{ms:8.2f} {n:7d}  {where[:55]:55} {inner[:50]}")


if __name__ == "__main__":
    main()
