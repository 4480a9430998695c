#!/usr/bin/env python3
"""Validation loss of an exported directory in transformers, windowed like moetrain's trainer.

  python hf_val_loss.py --load DIR --val VAL_BIN --dtype uint16|uint32 --seq-len T --windows N

Loads DIR with AutoModelForCausalLM.from_pretrained (fp32, eager attention; any
missing, unexpected or mismatched tensor fails) and scores the validation split the
way data/dataset.h defines it: window w (w = 0..N-1) is the seq_len + 1 tokens
starting at (w mod W)·seq_len with W = (len(val) - 1) // seq_len; its loss is
transformers' labels=input_ids loss (mean over its seq_len targets), and the result
is the mean over windows. Prints one JSON object {"loss", "windows"}.

Used by tests/test_eval.cpp. Needs torch and transformers==5.17.0.
"""

import argparse
import json
import sys

try:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
except ImportError as e:
    print(f"hf_val_loss.py: missing Python package: {e}", file=sys.stderr)
    sys.exit(3)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--load", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--dtype", required=True, choices=["uint16", "uint32"])
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--windows", type=int, required=True)
    args = p.parse_args()

    model, info = AutoModelForCausalLM.from_pretrained(
        args.load, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        sys.exit(f"hf_val_loss.py: loading {args.load}: {problems}")
    model.eval()
    val = np.fromfile(args.val, dtype="<u2" if args.dtype == "uint16" else "<u4").astype(np.int64)
    t = args.seq_len
    n_windows = (len(val) - 1) // t
    losses = []
    with torch.no_grad():
        for w in range(args.windows):
            start = (w % n_windows) * t
            ids = torch.from_numpy(val[start:start + t + 1]).view(1, -1)
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    print(json.dumps({"loss": sum(losses) / len(losses), "windows": len(losses)}))


if __name__ == "__main__":
    main()
