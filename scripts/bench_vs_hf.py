#!/usr/bin/env python3
"""moetrain's training step vs transformers' DeepseekV3ForCausalLM on the same config, one card, one run.

  python3 scripts/bench_vs_hf.py configs/bench-1b.yaml [--moetrain build/app/moetrain]
                                 [--steps 20] [--warmup 5] [--out bench.json] [--skip-hf]

1. `moetrain bench FILE --steps N --warmup W` (its last stdout line is JSON).
2. The peer: `moetrain config show FILE --hf` gives the HF config.json of the same model;
   transformers builds DeepseekV3ForCausalLM from it (random init, fp32 master weights),
   and the script times the same step: bf16 autocast forward with labels (HF's own loss),
   backward, clip_grad_norm_(1.0), AdamW(fused=True), on the same batch shape of
   synthetic tokens, median of N steps after W warmup steps, each step ending in a sync.
Prints both results and the ratio; --out writes them as JSON. Needs torch with CUDA and
transformers (the GPU machines' python3 has both).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time


def run_moetrain(binary, config, steps, warmup, extra):
    cmd = [binary, "bench", config, "--steps", str(steps), "--warmup", str(warmup)] + extra
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    print(out, end="", file=sys.stderr)
    return json.loads(out.strip().splitlines()[-1])


def hf_config(binary, config):
    out = subprocess.run([binary, "config", "show", config, "--hf"], check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


def run_hf(cfg_json, batch, seq_len, steps, warmup, lr, clip, peak_tflops, flops_per_token):
    import torch
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**{k: v for k, v in cfg_json.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(1234)
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM._from_config(cfg, attn_implementation="sdpa", torch_dtype=torch.float32)
    experts = "eager"
    try:  # transformers 5: grouped_mm experts where supported (gpu.md: same speed as eager)
        model.set_experts_implementation("grouped_mm")
        experts = "grouped_mm"
    except Exception:
        pass
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    gen = torch.Generator().manual_seed(1234)
    batches = [torch.randint(cfg.vocab_size, (batch, seq_len), generator=gen).cuda() for _ in range(4)]
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        ids = batches[i % 4]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    tps = batch * seq_len / (ms / 1e3)
    tflops = flops_per_token * tps / 1e12
    return {"system": f"transformers {transformers.__version__} DeepseekV3ForCausalLM ({experts} experts, sdpa)",
            "tokens_per_s": tps, "step_ms": ms, "tflops": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9, "loss": loss.item(),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--moetrain", default="build/app/moetrain")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out")
    p.add_argument("--skip-hf", action="store_true", help="moetrain only")
    p.add_argument("--set", action="append", default=[], help="passed to moetrain (KEY=VALUE)")
    args = p.parse_args()

    extra = [x for kv in args.set for x in ("--set", kv)]
    ours = run_moetrain(args.moetrain, args.config, args.steps, args.warmup, extra)
    result = {"config": args.config, "moetrain": ours}
    if not args.skip_hf:
        cfg_json = hf_config(args.moetrain, args.config)
        # the batch shape moetrain used: tokens_per_step = global_batch * seq_len
        show = subprocess.run([args.moetrain, "config", "show", args.config] + extra, check=True,
                              stdout=subprocess.PIPE, text=True).stdout
        train = {}
        section = None
        for line in show.splitlines():
            if line and not line.startswith(" ") and line.endswith(":"):
                section = line[:-1]
            elif section in ("train", "optim") and ":" in line:
                k, v = line.strip().split(":", 1)
                train[f"{section}.{k.strip()}"] = v.strip()
        batch = int(train["train.global_batch"])
        seq_len = int(train["train.seq_len"])
        lr = float(train["optim.lr"])
        clip = float(train.get("optim.grad_clip", "1.0"))
        hf = run_hf(cfg_json, batch, seq_len, args.steps, args.warmup, lr, clip, ours.get("peak_tflops"),
                    ours["flops_per_token"])
        result["hf"] = hf
        result["ratio"] = ours["tokens_per_s"] / hf["tokens_per_s"]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    # peak GB: live tensors (reserved by the allocator): a CUDA-graph replay allocates nothing,
    # its activations stay reserved in the graph's pool, so compare the reserved peaks there
    print(f"\n| system | device | tokens/s | step ms | TFLOP/s | MFU | peak GB (reserved) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = [("moetrain", ours)] + ([(result["hf"]["system"], result["hf"])] if "hf" in result else [])
    for name, r in rows:
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
        print(f"| {name} | {r['device']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['tflops']:.1f} | {mfu} | "
              f"{r['peak_mem_gb']:.1f} ({r.get('peak_reserved_gb', float('nan')):.1f}) |")
    if "ratio" in result:
        print(f"moetrain / transformers = {result['ratio']:.2f}x")


if __name__ == "__main__":
    main()
