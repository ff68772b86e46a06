#!/usr/bin/env python3
"""The anchor of bench_ttt_train: ttt-lm-pytorch's own TTTLinear / TTTMLP, forward + backward
(autograd), tokens per second on CUDA, at issue 15's shape (C 4096, 32 heads of 128, mini-batch 16,
L 8192, batch 1, bf16 parameters and activations, training mode, no scan checkpointing: its default).

ttt.py is read from --ttt-py (a checkout of github.com/test-time-training/ttt-lm-pytorch; nothing
of it is in this repository); Hugging Face transformers, which it imports for config plumbing
only, is stood in for where absent (examples/pytorch/tools/compare_ttt_lm_pytorch.py). Timing: CUDA
events around forward + backward of the sum(y * dy) loss, after --warmup steps, the median of
--runs. Prints one line per kind:

  anchor ttt-lm-pytorch linear: fwd+bwd 1234.5 ms (median of 3), 6.6k tokens/s
  ANCHOR linear 6634.2          (the same number, for bench_ttt_train --anchor-linear)

  python3 bench/ttt_train_pytorch.py --ttt-py PATH [--kind linear|mlp|both] [--seq 8192] [--runs 3]
"""
import argparse
import importlib.util
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples", "pytorch", "tools"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ttt-py", required=True, help="path to ttt-lm-pytorch's ttt.py")
    ap.add_argument("--kind", default="both", choices=["linear", "mlp", "both"])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    args = ap.parse_args()
    if not os.path.isfile(args.ttt_py):
        print(f"bench/ttt_train_pytorch.py: --ttt-py {args.ttt_py}: no such file", file=sys.stderr)
        return 2
    import torch
    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device for torch")
        return 77
    try:
        import transformers  # noqa: F401
    except ImportError:
        from compare_ttt_lm_pytorch import stub_transformers
        stub_transformers()
    spec = importlib.util.spec_from_file_location("ttt_lm_pytorch_ttt", args.ttt_py)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dev = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, C {args.hidden}, heads {args.heads}, "
          f"L {args.seq}, batch {args.batch}, {args.dtype}")
    kinds = ["linear", "mlp"] if args.kind == "both" else [args.kind]
    for kind in kinds:
        torch.manual_seed(0)
        cfg = ref.TTTConfig(hidden_size=args.hidden, num_attention_heads=args.heads, mini_batch_size=16,
                            ttt_layer_type=kind, ttt_base_lr=1.0 if kind == "linear" else 0.1, pre_conv=False,
                            share_qk=False, use_gate=False, max_position_embeddings=args.seq)
        layer = (ref.TTTLinear if kind == "linear" else ref.TTTMLP)(cfg, layer_idx=0).to(dev, dtype).train()
        x = torch.randn(args.batch, args.seq, args.hidden, device=dev, dtype=dtype, requires_grad=True)
        dy = torch.randn(args.batch, args.seq, args.hidden, device=dev, dtype=dtype)
        pos = torch.arange(args.seq, device=dev).unsqueeze(0).expand(args.batch, args.seq)

        def step():
            x.grad = None
            for p in layer.parameters():
                p.grad = None
            y = layer(x, position_ids=pos)
            (y * dy).sum().backward()

        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.runs):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        ms = statistics.median(times)
        tok = args.batch * args.seq / (ms * 1e-3)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"anchor ttt-lm-pytorch {kind}: fwd+bwd {ms:.1f} ms (median of {args.runs}; runs "
              f"{', '.join(f'{t:.1f}' for t in times)}), {tok / 1e3:.2f}k tokens/s, peak {peak:.1f} GiB", flush=True)
        print(f"ANCHOR {kind} {tok:.1f}", flush=True)  # for tools/gpu_check.sh
        del layer, x, dy
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return 0


if __name__ == "__main__":
    sys.exit(main())
