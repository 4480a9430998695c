#!/usr/bin/env python3
"""Plots of an ablation (moetrain ablate), from the runs' metrics.jsonl only.

usage: plot_ablation.py RUNS/<name>     (reads report.json for the run directories)
writes val_loss.png, maxvio_batch.png, expert_load.png, bias.png beside report.json.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir):
    train, evals = [], []
    with open(Path(run_dir) / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            (evals if rec.get("kind") == "eval" else train).append(rec)
    return train, evals


def smooth(values, window):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def main(root):
    root = Path(root)
    report = json.loads((root / "report.json").read_text())
    variants = [(v["name"], v["runs"]) for v in report["variants"]]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, runs) in enumerate(variants):
        for j, run in enumerate(runs):
            _, evals = read_metrics(run)
            ax.plot([e["tokens"] for e in evals], [e["val_loss"] for e in evals], color=colors[i % len(colors)],
                    alpha=1.0 if j == 0 else 0.5, label=name if j == 0 else None, marker="o", ms=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{report['name']}: validation loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "val_loss.png", dpi=110)

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, runs) in enumerate(variants):
        train, _ = read_metrics(runs[0])
        mv = [t["maxvio_batch"] for t in train]
        ax.plot([t["step"] for t in train], smooth(mv, max(1, len(mv) // 50)), color=colors[i % len(colors)], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio_batch (mean over MoE layers, smoothed)")
    ax.set_yscale("log")
    ax.set_title(f"{report['name']}: load imbalance per global batch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "maxvio_batch.png", dpi=110)

    n = len(variants)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for k, (name, runs) in enumerate(variants):
        train, _ = read_metrics(runs[0])
        load = train[-1]["expert_load"]
        rel = [[c / (sum(row) / len(row)) if sum(row) else 0.0 for c in row] for row in load]
        a = axes[k // cols][k % cols]
        im = a.imshow(rel, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, max(max(r) for r in rel)))
        a.set_title(name, fontsize=9)
        a.set_xlabel("expert")
        a.set_ylabel("MoE layer")
        fig.colorbar(im, ax=a, fraction=0.046)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("expert load / mean load at the last step")
    fig.tight_layout()
    fig.savefig(root / "expert_load.png", dpi=110)

    lf = [(name, runs) for name, runs in variants if "loss_free" in name or "lossfree" in name]
    fig, axes = plt.subplots(1, max(1, len(lf)), figsize=(5 * max(1, len(lf)), 3.5), squeeze=False)
    for k, (name, runs) in enumerate(lf):
        train, _ = read_metrics(runs[0])
        steps = [t["step"] for t in train]
        biases = [t["bias"][0] for t in train]  # first MoE layer
        for e in range(len(biases[0])):
            axes[0][k].plot(steps, [b[e] for b in biases], lw=0.8)
        axes[0][k].set_title(f"{name}: bias, first MoE layer", fontsize=9)
        axes[0][k].set_xlabel("step")
    if not lf:
        axes[0][0].text(0.5, 0.5, "no loss_free variant", ha="center")
    fig.tight_layout()
    fig.savefig(root / "bias.png", dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
