#!/usr/bin/env python3
"""PyTorch side of the Mimi benchmark (`bench_mimi`): Kyutai's moshi 0.2.13 Mimi streaming one
frame at a time, on the same config (and, with --save-weights, the same weights as the C++
side). Times encode and decode of one frame per call: warm-up, then the median of the timed
frames; on CUDA with the package's own CUDA graphs (as moshi's server runs it) and events.

  python3 bench/mimi_pytorch.py [--config C] [--device cpu|cuda] [--dtype float32|bfloat16]
                                [--batch B] [--frames N] [--threads T] [--save-weights W]
Prints one line: `pytorch mimi ... encode X ms decode Y ms` (what bench_mimi reads as anchors).
"""
import argparse
import json
import statistics
import time

import torch
from safetensors.torch import save_file

from moshi.models import loaders


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", help="moshi _mimi_config JSON (default: Kyutai's Mimi)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-weights", help="write the model's (seeded) weights here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = json.load(open(a.config)) if a.config else None
    n_cb = 8
    if cfg is not None:
        n_cb = cfg.pop("num_codebooks", 8)
    mimi = loaders.get_mimi(None, cfg, device=a.device, num_codebooks=n_cb)
    dtype = getattr(torch, a.dtype)
    mimi = mimi.to(dtype=dtype).eval()
    if a.save_weights:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in mimi.state_dict().items()}, a.save_weights)
    fs = mimi.frame_size
    cuda = a.device.startswith("cuda")

    def clock(fn):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            r = fn()
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e), r
        t0 = time.perf_counter()
        r = fn()
        return (time.perf_counter() - t0) * 1e3, r

    enc, dec = [], []
    with torch.no_grad(), mimi.streaming(a.batch):
        for i in range(a.warmup + a.frames):
            pcm = torch.randn(a.batch, 1, fs, device=a.device, dtype=dtype) * 0.1
            te, codes = clock(lambda: mimi.encode(pcm))
            td, _ = clock(lambda: mimi.decode(codes))
            if i >= a.warmup:
                enc.append(te)
                dec.append(td)
    import moshi
    print(f"pytorch mimi moshi {moshi.__version__} torch {torch.__version__} device {a.device} dtype {a.dtype} "
          f"batch {a.batch} threads {a.threads}: encode {statistics.median(enc):.3f} ms "
          f"decode {statistics.median(dec):.3f} ms per frame (median of {a.frames})")


if __name__ == "__main__":
    main()
