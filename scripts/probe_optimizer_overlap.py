#!/usr/bin/env python3
"""Probe (bench/NOTES.md 31): how much of an AdamW step (memory-bound) hides behind a
forward-like stream of GEMMs, attention and grouped GEMMs when it runs on a side stream.

Prints the forward alone, AdamW alone (torch._fused_adamw_ over 1.256B fp32 parameters, 128
tensors), both concurrently, and both with the optimizer in 13 pieces that the forward's
layers wait for. Needs a CUDA GPU with ~25 GB free; bench-1b's shapes (16384 tokens, D 1024,
64 experts, top-6). Usage: python3 scripts/probe_optimizer_overlap.py
"""
import argparse

import torch
import torch.nn.functional as F

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
torch.manual_seed(0)
d = 'cuda'
N, D, I, E, K = 16384, 1024, 512, 64, 6
x = torch.randn(N, D, device=d, dtype=torch.bfloat16)
wq = torch.randn(D, 16 * 96, device=d, dtype=torch.bfloat16) * 0.02
wo = torch.randn(16 * 64, D, device=d, dtype=torch.bfloat16) * 0.02
w13 = torch.randn(E, D, 2 * I, device=d, dtype=torch.bfloat16) * 0.02
w2 = torch.randn(E, I, D, device=d, dtype=torch.bfloat16) * 0.02
rows = N * K
offs = torch.arange(1, E + 1, device=d, dtype=torch.int32) * (rows // E)
xp = torch.randn(rows, D, device=d, dtype=torch.bfloat16)
def layer(h):
    q = h @ wq
    qh = q.view(8, 2048, 16, 96).transpose(1, 2)
    o = F.scaled_dot_product_attention(qh, qh, qh[..., :64], is_causal=True)
    h = h + o.transpose(1, 2).reshape(N, 1024) @ wo
    h = F.rms_norm(h, (D,))
    g = torch._grouped_mm(xp, w13, offs=offs)
    a = F.silu(g[:, :I]) * g[:, I:]
    y = torch._grouped_mm(a, w2, offs=offs)
    return h + y.view(N, K, D).sum(1)
def fwd():
    h = x
    for _ in range(12):
        h = layer(h)
    return h
P = 1_256_000_000
chunks = [P // 128] * 128
params = [torch.randn(c, device=d) for c in chunks]
grads = [torch.randn(c, device=d) for c in chunks]
m = [torch.zeros(c, device=d) for c in chunks]
v = [torch.zeros(c, device=d) for c in chunks]
steps = [torch.tensor(1.0, device=d) for _ in chunks]
def adam(lo=0, hi=128):
    torch._fused_adamw_(params[lo:hi], grads[lo:hi], m[lo:hi], v[lo:hi], [], steps[lo:hi], lr=1e-4, beta1=0.9,
                        beta2=0.95, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)
side = torch.cuda.Stream()
def timeit(fn, n=5):
    for _ in range(2): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort(); return ts[len(ts) // 2]
def both():
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        adam()
    fwd()
    torch.cuda.current_stream().wait_stream(side)
def both_layered():  # the optimizer in 13 pieces, the forward's layer k waits for piece k
    side.wait_stream(torch.cuda.current_stream())
    evs = []
    with torch.cuda.stream(side):
        for k in range(13):
            adam(k * 128 // 13, (k + 1) * 128 // 13)
            ev = torch.cuda.Event(); ev.record(side); evs.append(ev)
    h = x
    for k in range(12):
        torch.cuda.current_stream().wait_event(evs[k])
        h = layer(h)
    torch.cuda.current_stream().wait_event(evs[12])
with torch.no_grad():
    tf = timeit(fwd); ta = timeit(adam); tb = timeit(both); tl = timeit(both_layered)
print(f"forward {tf:.2f} ms | adamw {ta:.2f} ms | sum {tf+ta:.2f} | concurrent {tb:.2f} | layered {tl:.2f}")
print(f"hidden: concurrent {tf+ta-tb:.2f} ms, layered {tf+ta-tl:.2f} ms of {ta:.2f}")
