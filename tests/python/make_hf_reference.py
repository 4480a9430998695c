#!/usr/bin/env python3
"""Builds a small random Hugging Face DeepseekV3ForCausalLM and dumps a reference.

Writes into --out:
  config.json, model.safetensors (or model-0000N-of-0000M.safetensors + index)
      via save_pretrained, i.e. exactly what transformers writes;
  reference.safetensors with
      input_ids  int64 [B, T]
      logits     fp32  [B, T, V]
      loss       fp32  []        (labels = input_ids, HF's internal shift)
      hidden.{k} fp32  [B, T, D] (HF's output_hidden_states, for debugging:
                 hidden.0 = embeddings, hidden.k = output of layer k-1,
                 the last one after the final norm)
    and metadata {"transformers_version", "torch_version", "config", "routing_stats"}.

With --mtp, also one multi-token-prediction module: transformers 5.17's MtpLayer
(modeling_layers.py; the one speculative decoding uses) with random weights, written
into model.safetensors under DeepSeek-V3's on-disk names (model.layers.{L}.enorm,
hnorm, eh_proj, shared_head.norm, the decoder-layer names with fused experts, and
the embed_tokens / shared_head.head copies), config.json's num_nextn_predict_layers
set to 1, and reference.safetensors gains
      mtp_logits fp32 [B, T-1, V]  lm_head(MtpLayer(Emb(ids[:, 1:]), h[:, :-1])) with
                 h the main model's final-normed hidden states, positions 0..T-2.

Second mode, for the export direction: --load DIR --input REF loads a checkpoint
that moetrain wrote (save_hf_checkpoint) with from_pretrained, failing on any
missing, unexpected or mismatched tensor, runs REF's input_ids through it and
writes DIR/logits.safetensors {"logits"}.

Used by tests/test_hf_parity.cpp. Needs torch and transformers==5.17.0 (CPU, fp32).

  python make_hf_reference.py --out DIR [--config '{"n_group": 4}' | @file.json] [--seed 0]
      [--std 0.08] [--batch 2] [--seq 12] [--max-shard-size 200KB] [--fused-experts]
  python make_hf_reference.py --load DIR --input DIR0/reference.safetensors
"""

import argparse
import json
import os
import sys

try:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
except ImportError as e:  # the C++ test reports this line
    print(f"make_hf_reference.py: missing Python package: {e}", file=sys.stderr)
    sys.exit(3)

EXPECTED_TRANSFORMERS = "5.17.0"

# A tiny shape in which every routing feature matters: 8 experts in 4 groups,
# 2 groups kept, top-2, scaling 2.5, one dense layer, q compression on.
DEFAULTS = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    first_k_dense_replace=1,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    rope_interleave=True,
    tie_word_embeddings=False,
    num_nextn_predict_layers=0,  # transformers builds no MTP module
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output directory (created)")
    p.add_argument("--load", help="check mode: a checkpoint directory to load")
    p.add_argument("--input", help="check mode: reference.safetensors holding input_ids")
    p.add_argument("--config", default="{}",
                   help="JSON object of DeepseekV3Config overrides, or @file.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.08, help="std of the random weights")
    p.add_argument("--bias-low", type=float, default=-1.5, help="e_score_correction_bias ~ U(low, high)")
    p.add_argument("--bias-high", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=12)
    p.add_argument("--max-shard-size", default=None,
                   help='force sharding, e.g. "200KB" (default: one model.safetensors)')
    p.add_argument("--fused-experts", action="store_true",
                   help="save_original_format=False: fused mlp.experts.gate_up_proj / down_proj")
    p.add_argument("--mtp", action="store_true", help="add one MTP module (transformers' MtpLayer)")
    args = p.parse_args()
    if (args.out is None) == (args.load is None) or (args.load is not None) != (args.input is not None):
        p.error("give either --out, or --load with --input")
    return args


def build_config(overrides):
    kw = dict(DEFAULTS)
    kw.update(overrides)
    # MLA has one KV head per query head; transformers' default (128) would make
    # num_key_value_groups 0 for a small model.
    kw.setdefault("num_key_value_heads", kw["num_attention_heads"])
    if "rope_parameters" not in kw and "rope_theta" not in kw and "rope_scaling" not in kw:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    return DeepseekV3Config(**kw)


@torch.no_grad()
def randomize(model, args, gen):
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            # RMSNorm gains around 1, but not 1, so a missed norm shows.
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(args.std * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            # Sigmoid scores lie in (0, 1); a bias down to -1.5 makes some biased
            # scores negative, which matters for group scores and the -inf mask.
            b.copy_(args.bias_low + (args.bias_high - args.bias_low) * torch.rand(b.shape, generator=gen))


def routing_stats(model, input_ids):
    """Fractions of tokens whose expert choice depends on group-limited routing
    and on masking dropped groups with -inf (not 0), so a test can show that the
    case exercises them."""
    cfg = model.config
    inputs = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if i >= cfg.first_k_dense_replace:
            hooks.append(layer.mlp.gate.register_forward_hook(
                lambda mod, a, o, i=i: inputs.__setitem__(i, a[0].detach())))
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    for h in hooks:
        h.remove()
    stats = []
    for i, x in sorted(inputs.items()):
        gate = model.model.layers[i].mlp.gate
        s = torch.sigmoid(x.reshape(-1, x.shape[-1]).float() @ gate.weight.float().T)
        b = s + gate.e_score_correction_bias
        e, g, k = b.shape[1], cfg.n_group, cfg.num_experts_per_tok
        gs = b.view(-1, g, e // g).topk(min(2, e // g), -1)[0].sum(-1)
        keep = torch.zeros_like(gs).scatter_(1, gs.topk(cfg.topk_group, -1)[1], 1).bool()
        keep = keep.repeat_interleave(e // g, 1)
        pick_inf = b.masked_fill(~keep, float("-inf")).topk(k, -1)[1].sort(-1)[0]
        pick_zero = b.masked_fill(~keep, 0.0).topk(k, -1)[1].sort(-1)[0]
        pick_plain = b.topk(k, -1)[1].sort(-1)[0]
        stats.append(dict(layer=i, negative=round((b < 0).float().mean().item(), 3),
                          grouped_vs_plain=round((pick_inf != pick_plain).any(-1).float().mean().item(), 3),
                          inf_vs_zero_mask=round((pick_inf != pick_zero).any(-1).float().mean().item(), 3)))
    return stats


@torch.no_grad()
def add_mtp(model, args, gen, input_ids, hidden, tensors):
    """Builds transformers' MtpLayer for depth 1, randomizes it, appends its weights to
    model.safetensors under DeepSeek's names and its logits to `tensors`."""
    from safetensors.torch import load_file
    from transformers.modeling_layers import MtpModel

    cfg = model.config
    L = cfg.num_hidden_layers
    mtp = MtpModel(model, 1)
    mtp.eval()
    layer = mtp.layers[0]
    for name, p in layer.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(args.std * torch.randn(p.shape, generator=gen))
    for name, b in layer.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(args.bias_low + (args.bias_high - args.bias_low) * torch.rand(b.shape, generator=gen))

    B, T = input_ids.shape
    emb = model.model.embed_tokens(input_ids[:, 1:])
    pos = torch.arange(T - 1).unsqueeze(0).expand(B, -1)
    pe = model.model.rotary_emb(emb, position_ids=pos)
    mask = torch.full((T - 1, T - 1), torch.finfo(torch.float32).min).triu(1)[None, None].expand(B, 1, -1, -1)
    h = layer(emb, hidden[:, :-1], position_embeddings=pe, attention_mask=mask, position_ids=pos,
              past_key_values=None)
    tensors["mtp_logits"] = model.lm_head(h).float().contiguous()

    path = os.path.join(args.out, "model.safetensors")
    weights = load_file(path)
    prefix = f"model.layers.{L}."
    for name, t in layer.state_dict().items():
        if name.startswith("mtp_block."):
            name = name[len("mtp_block."):]
        elif name == "post_norm.weight":
            name = "shared_head.norm.weight"
        weights[prefix + name] = t.contiguous()
    weights[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight.contiguous()
    weights[prefix + "shared_head.head.weight"] = model.lm_head.weight.contiguous()
    save_file(weights, path, metadata={"format": "pt"})
    with open(os.path.join(args.out, "config.json")) as f:
        config = json.load(f)
    config["num_nextn_predict_layers"] = 1
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def check_load(args):
    from safetensors.torch import load_file

    model, info = DeepseekV3ForCausalLM.from_pretrained(
        args.load, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        sys.exit(f"make_hf_reference.py: loading {args.load}: {problems}")
    model.eval()
    input_ids = load_file(args.input)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits.float().contiguous()
    save_file({"logits": logits}, os.path.join(args.load, "logits.safetensors"))
    print(f"make_hf_reference.py: loaded {args.load} with transformers {transformers.__version__}")


def main():
    args = parse_args()
    if args.load is not None:
        check_load(args)
        return
    if transformers.__version__ != EXPECTED_TRANSFORMERS:
        print(f"make_hf_reference.py: warning: transformers {transformers.__version__}, "
              f"reference written for {EXPECTED_TRANSFORMERS}", file=sys.stderr)
    text = args.config
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    overrides = json.loads(text)
    if not isinstance(overrides, dict):
        sys.exit("make_hf_reference.py: --config must be a JSON object")

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    config = build_config(overrides)
    model = DeepseekV3ForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    randomize(model, args, gen)

    os.makedirs(args.out, exist_ok=True)
    save_kw = dict(save_original_format=not args.fused_experts)
    if args.max_shard_size is not None:
        save_kw["max_shard_size"] = args.max_shard_size
    model.save_pretrained(args.out, **save_kw)

    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen, dtype=torch.int64)
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=input_ids, output_hidden_states=True, use_cache=False)
    tensors = {
        "input_ids": input_ids.contiguous(),
        "logits": out.logits.float().contiguous(),
        "loss": out.loss.float().reshape(()).contiguous(),
    }
    for k, h in enumerate(out.hidden_states):
        tensors[f"hidden.{k}"] = h.float().contiguous()
    if args.mtp:
        if args.max_shard_size is not None or args.fused_experts:
            sys.exit("make_hf_reference.py: --mtp writes into a single model.safetensors")
        add_mtp(model, args, gen, input_ids, out.hidden_states[-1], tensors)
    stats = routing_stats(model, input_ids)
    meta = {
        "routing_stats": json.dumps(stats),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "config": json.dumps(overrides, sort_keys=True),
    }
    save_file(tensors, os.path.join(args.out, "reference.safetensors"), metadata=meta)
    print(f"make_hf_reference.py: wrote {args.out} (loss {out.loss.item():.6f}, "
          f"{len(out.hidden_states)} hidden states)")
    for st in stats:
        print(f"  layer {st['layer']}: biased scores < 0: {st['negative']:.2f}; tokens whose experts change "
              f"with group limiting: {st['grouped_vs_plain']:.2f}, with a 0 (not -inf) group mask: "
              f"{st['inf_vs_zero_mask']:.2f}")


if __name__ == "__main__":
    main()
