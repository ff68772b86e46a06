#!/usr/bin/env python3
"""PyTorch side of `ttt-moshi bench --max-streams` (issue 13, goal 4): Kyutai's moshi package
(0.2.13, LMGen with its CUDA graphs) searched the same way -- the largest batch whose frame stays
<= --limit-ms (median of the timed frames) with every temporal KV ring full, and that fits.

Each tried batch gets a new streaming session whose temporal attention caches are filled as
`LmGen::fill_as_after(context)` fills ours: random keys and values in every slot, the ring's end
offset and the transformer's position offsets at `context`, so each frame attends to `context`
keys per layer (as at frame >= context of a real conversation). The batch doubles from 1 until
a batch is too slow or does not fit (torch.OutOfMemoryError), then bisects. The last line is a
`max-streams result:` line in the C++ tool's format, for tools/gpu_check.sh's table.

  python3 bench/moshi_pytorch_streams.py --config bench/configs/moshi_7b.json --device cuda --dtype bfloat16
  python3 bench/moshi_pytorch_streams.py --config examples/configs/small.json --device cpu --dtype float32 \
      --context-frames 300 --limit-ms 200        (a quick check on the CPU)

--batches 1,8 times just those batches instead of searching (the anchor of `ttt-moshi bench`,
which tools/gpu_check.sh bench measures in the same run: --context-frames 110 --frames 100
--warmup 10 is what `ttt-moshi bench --frames 100 --warmup 10` attends to) and prints one
`pytorch frame result: batch=B p50=MS p99=MS gib=G` line per batch.
"""
import argparse
import gc
import json
import math
import statistics
import time

import torch

from moshi.models.lm import LMGen, LMModel
from moshi.modules.transformer import StreamingMultiheadAttention, StreamingTransformer

LOADER_KEYS = {"moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type",
               "lm_gen_config", "tts_config", "stt_config", "model_id", "depformer_causal"}


def fill_as_after(model: LMModel, context: int) -> int:
    """Fills the temporal transformer's streaming state as `context` frames leave it; returns
    the number of attention caches filled."""
    n = 0
    for m in model.transformer.modules():
        st = getattr(m, "_streaming_state", None)
        if st is None:
            continue
        if isinstance(m, StreamingTransformer):
            st.offsets.fill_(context)
        elif isinstance(m, StreamingMultiheadAttention) and st.kv_cache is not None:
            kv = st.kv_cache
            kv.cache.normal_()
            kv.end_offset.fill_(context)
            st.offset.fill_(context)
            st.offset_cpu = context
            n += 1
    return n


def used_gib(device: torch.device) -> float:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (total - free) / 2**30
    return 0.0


def time_batch(gen: LMGen, model: LMModel, batch: int, context: int, warmup: int, frames: int,
               device: torch.device):
    """(p50 ms, p99 ms, GiB in use) of `frames` steps after `warmup`, or raises OOM."""
    n_user = model.num_codebooks - model.dep_q - 1
    times = []
    with torch.no_grad(), gen.streaming(batch):
        filled = fill_as_after(model, context)
        assert filled > 0, "no temporal attention cache to fill (is the config streaming?)"
        for i in range(warmup + frames):
            codes = torch.randint(0, model.card, (batch, n_user, 1), device=device)
            if device.type == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                gen.step(codes)
                stop.record()
                stop.synchronize()
                ms = start.elapsed_time(stop)
            else:
                t0 = time.perf_counter()
                gen.step(codes)
                ms = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(ms)
        gib = used_gib(device)
    times.sort()
    p99 = times[math.ceil(0.99 * len(times)) - 1]  # nearest rank, as ttt-moshi bench
    return statistics.median(times), p99, gib


def release(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="Kyutai-style config.json (bench/configs/moshi_7b.json)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--limit-ms", type=float, default=80.0)
    p.add_argument("--context-frames", type=int, help="frames of context to fill (default: the config's)")
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--label", default="pytorch")
    p.add_argument("--batches", help="comma-separated batches to time (no search), e.g. 1,8")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    cfg = json.load(open(a.config))
    context = a.context_frames or cfg.get("context")
    if not context:
        raise SystemExit(f"{a.config}: no context in the config; pass --context-frames")
    torch.manual_seed(0)
    kwargs = {k: v for k, v in cfg.items() if k not in LOADER_KEYS}
    model = LMModel(**kwargs, device=device, dtype=dtype).eval()
    gen = LMGen(model, use_sampling=True, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
    release(device)
    model_gib = used_gib(device)
    import moshi
    print(f"pytorch max-streams: moshi {moshi.__version__} torch {torch.__version__} on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {a.dtype}, "
          f"frame <= {a.limit_ms:.1f} ms (median of {a.frames} frames after {a.warmup} warm-up) with {context} "
          f"frames of context; model {model_gib:.2f} GiB in use", flush=True)

    if a.batches:
        for batch in (int(v) for v in a.batches.split(",")):
            release(device)
            p50, p99, gib = time_batch(gen, model, batch, context, a.warmup, a.frames, device)
            print(f"pytorch frame result: batch={batch} p50={p50:.3f} p99={p99:.3f} gib={gib:.2f}", flush=True)
        return

    tried = {}

    def run(batch):
        if batch in tried:
            return tried[batch]
        release(device)
        try:
            p50, p99, gib = time_batch(gen, model, batch, context, a.warmup, a.frames, device)
            r = ("ok" if p50 <= a.limit_ms else "slow", p50, p99, gib)
        except torch.OutOfMemoryError:
            r = ("oom", 0.0, 0.0, 0.0)
            # An OOM inside LMGen.streaming()'s own set-up leaves the modules reached so far
            # streaming (its exit callback is registered only after them): stop them all.
            gen._stop_streaming()
            model._stop_streaming()
        release(device)
        tried[batch] = r
        state, p50, p99, gib = r
        desc = "does not fit" if state == "oom" else f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, {gib:.2f} GiB in use" + \
            ("" if state == "ok" else " (too slow)")
        print(f"  batch {batch}: {desc}", flush=True)
        return r

    good, bad = 0, None
    b = 1
    while b <= a.max_batch:
        if run(b)[0] == "ok":
            good = b
            b *= 2
        else:
            bad = b
            break
    if bad is not None:
        lo, hi = good, bad
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if run(mid)[0] == "ok":
                lo = mid
            else:
                hi = mid
        good, bad = lo, hi
    if good == 0:
        print(f"max-streams result: label={a.label} backend={device.type} dtype={a.dtype} streams=0 "
              f"next=1 next_state={tried[1][0]}")
        return
    _, p50, p99, gib = tried[good]
    print(f"pytorch: {good} streams at p50 {p50:.2f} ms (p99 {p99:.2f} ms), {gib:.2f} GiB in use; "
          + ("no larger batch tried (--max-batch)" if bad is None else
             f"batch {bad} {'does not fit' if tried[bad][0] == 'oom' else 'too slow'}"))
    nxt = f" next={bad} next_state={tried[bad][0]}" if bad is not None else ""
    print(f"max-streams result: label={a.label} backend={device.type} dtype={a.dtype} streams={good} "
          f"p50={p50:.2f} p99={p99:.2f} gib={gib:.2f}{nxt}")


if __name__ == "__main__":
    main()
