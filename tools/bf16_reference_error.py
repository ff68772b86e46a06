#!/usr/bin/env python3
"""How far the reference moshi package itself moves in bf16: LMModel.forward in bfloat16
(CPU) against the fp32 fixture, per case. This is the 'bf16 noise' our bf16 paths are
judged against (docs/perf.md, tests/test_cuda_moshi.cpp). Needs moshi==0.2.13 and torch."""
import json
import sys

import torch
from safetensors.torch import load_file

from moshi.models.lm import LMModel

LOADER_KEYS = {"moshi_name", "mimi_name", "tokenizer_name", "model_type", "lm_gen_config", "ttt"}
root = sys.argv[1] if len(sys.argv) > 1 else "tests/data/fixtures/moshi"
for case in ["moshi_small_defaults", "moshi_7b_structure"]:
    cfg = {k: v for k, v in json.load(open(f"{root}/{case}/config.json")).items() if k not in LOADER_KEYS}
    model = LMModel(**cfg, device="cpu", dtype=torch.bfloat16).eval()
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in load_file(f"{root}/{case}/model.safetensors").items()})
    codes = load_file(f"{root}/{case}/codes.safetensors")["codes"]
    ref = load_file(f"{root}/{case}/out.safetensors")
    with torch.no_grad():
        out = model(codes)
    for name, m in [("logits", "mask"), ("text_logits", "text_mask")]:
        a = getattr(out, name).float()
        b = ref[name]
        mask = ref[m].bool()
        d = (a - b).abs()[mask]
        print(f"{case:22s} {name:12s} pytorch bf16 vs fp32 fixture: max abs {d.max().item():.3e}  "
              f"mean abs {d.mean().item():.3e}  (max |logit| {b[mask].abs().max().item():.2f})")
