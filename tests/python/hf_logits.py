#!/usr/bin/env python3
"""Loads a directory written by `moetrain export` with transformers and runs it.

  python hf_logits.py --load DIR --ids "1 2 3 ..." --out FILE [--text TEXT]

Loads DIR with AutoModelForCausalLM.from_pretrained (fp32, eager attention),
failing (exit 1) on any missing, unexpected or mismatched tensor; runs the ids as
one batch row and writes FILE (safetensors) with
  logits  fp32 [1, T, V]
  bias.{i} the loaded e_score_correction_bias of MoE layer i (its dtype as loaded)
and metadata {"transformers_version", "bos_token_id", "eos_token_id"} from the
loaded config and generation config. With --text, also loads DIR's tokenizer
with AutoTokenizer and stores its encoding of TEXT as `text_ids` int64 [N].

Used by tests/test_export.cpp. Needs torch and transformers==5.17.0.
"""

import argparse
import sys

try:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig
except ImportError as e:  # the C++ test reports this line
    print(f"hf_logits.py: missing Python package: {e}", file=sys.stderr)
    sys.exit(3)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--load", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--text")
    args = p.parse_args()

    model, info = AutoModelForCausalLM.from_pretrained(
        args.load, attn_implementation="eager", dtype=getattr(torch, args.dtype), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        sys.exit(f"hf_logits.py: loading {args.load}: {problems}")
    model.eval()
    ids = torch.tensor([[int(x) for x in args.ids.split()]], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    out = {"logits": logits}
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "e_score_correction_bias"):
            out[f"bias.{i}"] = gate.e_score_correction_bias.detach().clone().contiguous()
    gen = GenerationConfig.from_pretrained(args.load)
    meta = {
        "transformers_version": transformers.__version__,
        "model_type": model.config.model_type,
        "bos_token_id": str(model.config.bos_token_id),
        "eos_token_id": str(model.config.eos_token_id),
        "gen_bos_token_id": str(gen.bos_token_id),
        "gen_eos_token_id": str(gen.eos_token_id),
    }
    if args.text is not None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.load)
        out["text_ids"] = torch.tensor(tok(args.text)["input_ids"], dtype=torch.long)
        meta["tokenizer_class"] = type(tok).__name__
        meta["decoded"] = tok.decode(out["text_ids"].tolist())
    save_file(out, args.out, metadata=meta)
    print(f"hf_logits.py: loaded {args.load} with transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
