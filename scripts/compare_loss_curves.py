#!/usr/bin/env python3
"""Compare two training loss curves step by step (issue 9: the bf16 CUDA curve of
configs/tiny.yaml must track the fp32 CPU curve within noise).

Both runs see the same batches in the same order, so the curves differ only by
numerics. "Noise" is the reference curve's own step-to-step scatter: the standard
deviation of loss − its centred moving average. Passes when the moving averages of
the two curves stay within 3 σ of each other at every step.

usage: compare_loss_curves.py REFERENCE.jsonl CANDIDATE.jsonl [--window 11] [--key lm_loss]
"""
import argparse
import json
import statistics
import sys


def read_curve(path, key):
    curve = {}
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            if key in d and "step" in d:
                curve[int(d["step"])] = float(d[key])
    return curve


def moving_average(values, window):
    half = window // 2
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append(sum(values[lo:hi]) / (hi - lo))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference")
    ap.add_argument("candidate")
    ap.add_argument("--window", type=int, default=11, help="moving-average width in logged steps (odd)")
    ap.add_argument("--key", default="lm_loss")
    args = ap.parse_args()
    ref, cand = read_curve(args.reference, args.key), read_curve(args.candidate, args.key)
    steps = sorted(set(ref) & set(cand))
    if len(steps) < args.window:
        sys.exit(f"only {len(steps)} common logged steps with '{args.key}'")
    r = [ref[s] for s in steps]
    c = [cand[s] for s in steps]
    r_ma, c_ma = moving_average(r, args.window), moving_average(c, args.window)
    noise = statistics.pstdev([x - m for x, m in zip(r, r_ma)])
    diffs = [abs(a - b) for a, b in zip(r_ma, c_ma)]
    worst = max(range(len(steps)), key=lambda i: diffs[i])
    print(f"{args.key}: {len(steps)} common steps; reference noise σ = {noise:.4f}; moving average of {args.window}")
    print("| step | reference | candidate | |Δ| of moving averages |")
    print("| --- | --- | --- | --- |")
    marks = sorted({steps[0], *[steps[int(f * (len(steps) - 1))] for f in (0.1, 0.25, 0.5, 0.75)], steps[-1]})
    for s in marks:
        i = steps.index(s)
        print(f"| {s} | {r[i]:.4f} | {c[i]:.4f} | {diffs[i]:.4f} |")
    ok = diffs[worst] <= 3 * noise
    print(f"max |Δ| of moving averages {diffs[worst]:.4f} at step {steps[worst]} "
          f"{'<=' if ok else '>'} 3σ = {3 * noise:.4f}: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
