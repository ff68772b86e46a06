#!/usr/bin/env python3
"""PyTorch side of bench/moshi_cpu: the reference `moshi` package (0.2.13) running LMGen on
the CPU, on the same config and weights as the C++ engine.

Creates the model from a Kyutai-style config.json, writes its (seeded) weights to a
safetensors file for the C++ side (unless --weights is given, in which case it loads them),
then times LMGen.step per frame: warm-up, then the median of the timed frames.
"""
import argparse
import json
import statistics
import time

import torch
from safetensors.torch import load_file, save_file

from moshi.models.lm import LMGen, LMModel

LOADER_KEYS = {"moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type",
               "lm_gen_config", "tts_config", "stt_config", "model_id", "depformer_causal"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--weights", help="load these weights (else create seeded ones)")
    p.add_argument("--save-weights", help="write the model's weights here")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = json.load(open(a.config))
    kwargs = {k: v for k, v in cfg.items() if k not in LOADER_KEYS}
    model = LMModel(**kwargs, device="cpu", dtype=torch.float32).eval()
    if a.weights:
        model.load_state_dict(load_file(a.weights), strict=True)
    if a.save_weights:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.save_weights)
    gen = LMGen(model, use_sampling=True, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
    n_user = model.num_codebooks - model.dep_q - 1
    times = []
    with torch.no_grad(), gen.streaming(1):
        for i in range(a.warmup + a.frames):
            codes = torch.randint(0, model.card, (1, n_user, 1))
            t0 = time.perf_counter()
            gen.step(codes)
            dt = time.perf_counter() - t0
            if i >= a.warmup:
                times.append(dt)
    med = statistics.median(times)
    print(f"pytorch moshi {__import__('moshi').__version__} torch {torch.__version__} threads {a.threads}: "
          f"median {med * 1e3:.2f} ms/frame = {1 / med:.1f} frames/s over {a.frames} frames "
          f"(p90 {sorted(times)[int(0.9 * len(times))] * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
