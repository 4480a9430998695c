#!/usr/bin/env python3
"""GPU time of a profiled step by the autograd node or forward op that launched it.

Reads the Chrome trace of `moetrain bench --profile 1 --trace FILE` (plain or .gz) and
attributes every kernel to the outermost `autograd::engine::evaluate_function: X`
(backward node X) or, in the forward pass, the outermost op around it, next to the
innermost ATen op. Prints the largest rows: ms, kernel count, node, op.

--gaps US lists instead where the GPU idled: every gap of more than US microseconds between
consecutive GPU activities (kernels, memsets, copies; all streams merged), with the kernel
before and after it and the CPU op running when the gap began.

usage: trace_breakdown.py TRACE.json[.gz] [--top N] [--gaps US]
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
    ap.add_argument("--gaps", type=float, default=None, metavar="US")
    args = ap.parse_args()
    ev = load(args.trace)
    if args.gaps is not None:
        return print_gaps(ev, args.gaps, args.top)
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


def print_gaps(ev, min_us, top):
    gpu = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")), key=lambda e: e["ts"])
    if not gpu:
        return print("no GPU activity in the trace")
    cpu = sorted((e for e in ev if e.get("cat") in ("cpu_op", "cuda_runtime", "user_annotation")), key=lambda e: e["ts"])
    gaps, busy_until, prev = [], gpu[0]["ts"], gpu[0]
    for e in gpu[1:]:
        if e["ts"] - busy_until > min_us:
            gaps.append((e["ts"] - busy_until, busy_until, prev, e))
        if e["ts"] + e["dur"] > busy_until:
            busy_until, prev = e["ts"] + e["dur"], e

    def cpu_at(ts):  # the shortest CPU event spanning ts: what the host was doing
        spans = [c for c in cpu if c["ts"] <= ts <= c["ts"] + c.get("dur", 0)]
        return min(spans, key=lambda c: c.get("dur", 0))["name"][:40] if spans else "-"

    span = busy_until - gpu[0]["ts"]
    idle = sum(g[0] for g in gaps)
    print(f"GPU span {span / 1e3:.2f} ms, {len(gaps)} gaps > {min_us:g} us idle {idle / 1e3:.2f} ms")
    print(f"{'us':>8} {'at ms':>8}  {'kernel before':40} {'kernel after':40} host at the start")
    for g, start, before, after in sorted(gaps, key=lambda x: -x[0])[:top]:
        print(f"{g:8.0f} {(start - gpu[0]['ts']) / 1e3:8.2f}  {before['name'][:40]:40} {after['name'][:40]:40} "
              f"{cpu_at(start)}")


if __name__ == "__main__":
    main()
