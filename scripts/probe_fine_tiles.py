#!/usr/bin/env python3
"""Probe (bench/NOTES.md 40): ATen's grouped GEMM with finer row tiles for short groups.

torch's at::_grouped_mm (CUTLASS, sm90) picks its tile from the mean group height
M / groups: 64 x 128 (ping-pong) when it is <= 128 rows, else 128 x 256 (cooperative). At
256 experts and top-6 over 16,384 tokens the groups are ~384 rows, so each group's last
128-row tile is ~1/3 empty on average. Handing the kernel S * (E - 1) + 1 groups, each real
group followed by S - 1 empty ones whose weight view overlaps the next (never read), lowers
the mean and selects the fine tile without copying a weight.

Prints forward and input-gradient times, both ways, for bench-1b's expert shapes
(D 1024, I 512) at 64 and 256 experts with balanced and skewed counts, checks that the
results agree, and times ATen's weight gradients (unchanged by the trick). Writes each case's
counts to COUNTS_DIR/counts-E-{bal,skew}.txt (one count a line) for
scripts/probe_wgmma_wgrad.cu, which times its own weight gradient on the same counts.
Usage: python3 scripts/probe_fine_tiles.py [--counts-dir DIR]
"""
import argparse
import statistics

import torch

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--counts-dir', default='/tmp', help='where the counts files go (default /tmp)')
args = parser.parse_args()
torch.manual_seed(0)
dev = 'cuda'
T, K_TOP, D, I = 16384, 6, 1024, 512
M = T * K_TOP


def counts_for(E, skew):
    g = torch.Generator().manual_seed(E + skew)
    if skew:  # the bench at initialization: a few experts take most rows
        w = torch.rand(E, generator=g) ** 8
    else:     # a fresh balanced router: mean M/E, sigma ~ sqrt(mean) * 2
        w = 1 + torch.randn(E, generator=g) * (2.0 / (M / E) ** 0.5)
    w = w.clamp_min(1e-3)
    c = (w / w.sum() * M).floor().long()
    c[0] += M - c.sum()
    return c


def fine_view(w_view, s):
    """[E, a, b] view of a contiguous [E, ...] weight -> [s(E-1)+1, a, b] with group stride / s."""
    e = w_view.size(0)
    st = w_view.stride()
    assert st[0] % (8 * s) == 0
    return w_view.as_strided((s * (e - 1) + 1, w_view.size(1), w_view.size(2)), (st[0] // s, st[1], st[2]))


def fine_offs(offs, s):
    e = offs.numel()
    return offs.repeat_interleave(s)[: s * (e - 1) + 1].contiguous()


def split_for(E):
    s = 1
    while M / (s * (E - 1) + 1) > 128:
        s *= 2
    return s


def timeit(fn, reps=40, batch=10):
    """Median ms of one call, timed over `batch` back-to-back calls so that Python's dispatch
    cannot idle the GPU between the events (NOTES.md 61: the times match one call's)."""
    for _ in range(5):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(batch):
            fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / batch)
    return statistics.median(ts)


rows = []
for E in (64, 256):
    for skew in (0, 1):
        c = counts_for(E, skew).to(dev)
        with open(f"{args.counts_dir}/counts-{E}-{'skew' if skew else 'bal'}.txt", 'w') as f:
            f.write('\n'.join(str(v) for v in c.tolist()) + '\n')
        offs = c.cumsum(0).to(torch.int32)
        s = split_for(E)
        offs_f = fine_offs(offs, s)
        w13 = torch.randn(E, 2 * I, D, device=dev, dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(E, D, I, device=dev, dtype=torch.bfloat16) * 0.02
        x = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
        h = torch.randn(M, I, device=dev, dtype=torch.bfloat16)
        dy = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
        dh = torch.randn(M, 2 * I, device=dev, dtype=torch.bfloat16)
        cases = {
            'fwd w13': (x, w13.transpose(-2, -1)),
            'fwd w2': (h, w2.transpose(-2, -1)),
            'dgrad w2': (dy, w2),
            'dgrad w13': (dh, w13),
        }
        for name, (a, b) in cases.items():
            ref = torch._grouped_mm(a, b, offs=offs)
            got = torch._grouped_mm(a, fine_view(b, s), offs=offs_f)
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            t0 = timeit(lambda: torch._grouped_mm(a, b, offs=offs))
            t1 = timeit(lambda: torch._grouped_mm(a, fine_view(b, s), offs=offs_f))
            t0b = timeit(lambda: torch._grouped_mm(a, b, offs=offs))
            rows.append((E, 'skew' if skew else 'bal', name, s, t0, t0b, t1, err))
        # the weight gradients for reference (unchanged by the trick)
        for name, (a, b) in {'wgrad w13': (dh, x), 'wgrad w2': (dy, h)}.items():
            tw = timeit(lambda: torch._grouped_mm(a.t(), b, offs=offs))
            rows.append((E, 'skew' if skew else 'bal', name, 1, tw, tw, tw, 0.0))

print(f"{'E':>4} {'counts':>5} {'gemm':>10} {'S':>3} {'128x256 ms':>10} {'again':>7} {'64x128 ms':>10} {'gain':>6} {'rel err':>8}")
for E, k, n, s, t0, t0b, t1, err in rows:
    print(f"{E:>4} {k:>5} {n:>10} {s:>3} {t0:>10.3f} {t0b:>7.3f} {t1:>10.3f} {t0 / t1:>6.3f} {err:>8.1e}")
