#!/usr/bin/env python3
"""The SASS instructions with the most warp-stall samples in an Nsight Compute source page.

  ncu ... --set full --import-source yes -o REPORT <program>
  ncu -i REPORT.ncu-rep --page source --print-source sass --csv > source.csv
  python3 scripts/ncu_stalls.py source.csv [--top 30]

Prints each instruction's share of all samples, how often it ran, its text and its stall
reasons (bench/NOTES.md 63 read the grouped GEMM's this way).
"""
import argparse
import csv
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="ncu --page source --print-source sass --csv output")
    ap.add_argument("--top", type=int, default=30, help="instructions to list (30)")
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.reader(f))
    # The first row names the kernel; the second is the header.
    header_at = next((i for i, r in enumerate(rows) if "Address" in r and "Source" in r), None)
    if header_at is None:
        sys.exit(f"{args.csv}: no 'Address'/'Source' header: not an ncu source page in CSV")
    hdr, data = rows[header_at], rows[header_at + 1:]
    samples = hdr.index("Warp Stall Sampling (All Samples)")
    executed = hdr.index("Instructions Executed")
    reasons = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]

    def count(r, i):
        return int(r[i]) if i < len(r) and r[i].isdigit() else 0

    total = sum(count(r, samples) for r in data)
    if total == 0:
        sys.exit(f"{args.csv}: no stall samples")
    if header_at > 0 and len(rows[0]) > 1:
        print(rows[0][1][:160])
    print(f"{len(data)} instructions, {total} samples")
    for r in sorted(data, key=lambda r: -count(r, samples))[: args.top]:
        why = ", ".join(f"{hdr[i][6:]} {r[i]}" for i in reasons if count(r, i) > 0)
        print(f"{r[0][-6:]} {100 * count(r, samples) / total:5.1f} % {count(r, executed):>9} "
              f"{r[1].strip()[:64]:<64} {why[:70]}")


if __name__ == "__main__":
    main()
