#!/usr/bin/env python3
"""Trains a small Moshi-structured model (moshi's LMModel, ttt_torch.moshi_designs) on the long-range
recall task of ttt_torch/recall.py, with one TTT design or without (the control), and measures recall
against distance (docs/training.md, "The proof: recall beyond the ring").

  train_recall.py train --design replace --out runs/ttt          # TTT model
  train_recall.py train --design none --out runs/control         # the control: same steps, seed, optimiser
  train_recall.py train ... --init runs/ttt --window --seq 32768 --batch 1 --out runs/ttt2   # a second stage
  train_recall.py eval --run runs/ttt [--run runs/control]       # recall table, PyTorch, fresh streams
  train_recall.py table --run runs/ttt --run runs/control        # the saved tables side by side

A run directory holds config.json (the engine's config), model.safetensors (export_state_dict: the
names `ttt-moshi` loads), ckpt.pt (model + optimiser + step, every --ckpt-every steps; `train` resumes
from it), log.tsv (step, loss, answer loss, answer accuracy short / long, seconds) and, after eval,
recall.json. Seeded: the model's initial weights from --seed (moshi's weights are drawn before the TTT
module's, so TTT model and control start from the same moshi weights), the batch of step i from
(--seed, i) ((--seed, i, --seq) in a run started from --init), so a resumed run sees the batches it
would have seen. --window computes moshi's attention over each frame's window of `context` keys
(ttt_torch.recall.use_windowed_attention), which makes sequences of tens of thousands of frames fit.
The exact commands of the shipped models: docs/training.md, "The proof: recall beyond the ring".
"""
import argparse
import json
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from ttt_torch import recall  # noqa: E402
from ttt_torch.moshi_designs import build_lm, export_state_dict  # noqa: E402


def save_safetensors(path, tensors):
    from safetensors.torch import save_file
    tmp = str(path) + ".tmp"
    save_file(tensors, tmp)
    os.replace(tmp, path)


def load_run(run):
    run = pathlib.Path(run)
    with open(run / "config.json") as f:
        cfg = json.load(f)
    lm = build_lm(cfg)
    from safetensors.torch import load_file
    lm.load_state_dict(load_file(str(run / "model.safetensors")), strict=True)
    lm.eval()
    return cfg, lm


def lr_at(step, steps, lr, warmup):
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def cmd_train(a):
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    design = None if a.design == "none" else a.design
    cfg = recall.model_config(design, kind=a.kind, layer=a.layer, dim=a.dim, num_layers=a.layers,
                              num_heads=a.heads, context=a.context, ttt_heads=a.ttt_heads, mini_batch=a.mini_batch,
                              base_lr=a.base_lr, rope_theta=a.rope_theta)
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    torch.manual_seed(a.seed)
    lm = build_lm(cfg)
    if a.lr_gate_bias is not None:  # start the TTT's learnable lr gate σ(u·w + β) nearly closed: β = this
        with torch.no_grad():
            for n, p in lm.named_parameters():
                if n.endswith("learnable_ttt_lr_bias"):
                    p.fill_(a.lr_gate_bias)
    opt = torch.optim.AdamW(lm.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=a.weight_decay)
    if a.window:
        recall.use_windowed_attention(lm)
    step = 0
    ck = out / "ckpt.pt"
    if a.init and not ck.exists():  # a second stage: the weights of an earlier run, a fresh optimiser
        src = pathlib.Path(a.init)
        with open(src / "config.json") as f:
            if json.load(f) != cfg:
                raise SystemExit(f"--init {src}: its config.json differs from this run's model")
        lm.load_state_dict(torch.load(src / "ckpt.pt", weights_only=False)["model"])
        print(f"weights from {src}/ckpt.pt", flush=True)
    if ck.exists():
        s = torch.load(ck, weights_only=False)
        lm.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        step = s["step"]
        print(f"resumed from {ck} at step {step}", flush=True)
    rf = recall.receptive_field(cfg)
    n_par = sum(p.numel() for p in lm.parameters())
    print(f"{cfg['moshi_name']}: {n_par:,} parameters, dim {a.dim}, {a.layers} layers, context {a.context} "
          f"(attention reaches {rf} frames back); batch {a.batch} x {a.seq} frames, distances {a.dmin}-{a.dmax}, "
          f"{a.steps} steps, lr {a.lr}, seed {a.seed}, {torch.get_num_threads()} threads", flush=True)
    log = open(out / "log.tsv", "a")
    if step == 0:
        log.write("step\tloss\tans_loss\tacc_short\tacc_long\tseconds\n")
    lm.train()
    t0 = time.time()
    t_start = time.time()
    window = []
    while step < a.steps:
        # The batch of step i: from (seed, i), or (seed, i, seq) in a run started from --init, so a
        # second stage does not replay the first stage's streams.
        rng = np.random.default_rng([a.seed, step] + ([a.seq] if a.init else []))
        codes, queries = recall.make_codes(rng, a.batch, a.seq, a.dmin, a.dmax)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
        out_ = lm(codes)
        loss, ans, _ = recall.loss_terms(out_, codes, queries)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), a.clip)
        opt.step()
        step += 1
        with torch.no_grad():
            ok = recall.answers_correct(out_.text_logits.detach(), codes, queries)
            d = queries[:, 2].numpy()
        window.append((loss.item(), ans.item(), ok[d <= rf], ok[d > rf]))
        if step % a.log_every == 0 or step == a.steps:
            n = len(window)
            L = sum(w[0] for w in window) / n
            A = sum(w[1] for w in window) / n
            s_ok = np.concatenate([w[2] for w in window])
            l_ok = np.concatenate([w[3] for w in window])
            el = time.time() - t_start
            print(f"step {step:5d}  loss {L:.4f}  answer loss {A:.4f}  acc d<={rf} {s_ok.mean():.3f}  "
                  f"d>{rf} {l_ok.mean():.3f}  ({n / (time.time() - t0):.2f} steps/s, {el:.0f} s)", flush=True)
            log.write(f"{step}\t{L:.5f}\t{A:.5f}\t{s_ok.mean():.4f}\t{l_ok.mean():.4f}\t{el:.1f}\n")
            log.flush()
            window, t0 = [], time.time()
        if step % a.ckpt_every == 0 or step == a.steps:
            tmp = str(ck) + ".tmp"
            torch.save({"model": lm.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, ck)
            save_safetensors(out / "model.safetensors", export_state_dict(lm))
    print(f"trained {step} steps -> {out}/model.safetensors", flush=True)


def evaluate(lm, cfg, seed, streams, T, dmin, dmax, chunk):
    """Recall of fresh streams (teacher-forced, PyTorch): distances, correct per query."""
    rng = np.random.default_rng([seed, 10**6])
    ds, oks = [], []
    with torch.no_grad():
        for i in range(0, streams, chunk):
            codes, queries = recall.make_codes(rng, min(chunk, streams - i), T, dmin, dmax, balanced=True)
            out = lm(codes)
            oks.append(recall.answers_correct(out.text_logits, codes, queries))
            ds.append(queries[:, 2].numpy())
    return np.concatenate(ds), np.concatenate(oks)


def print_table(names, tables, rf):
    print(f"recall accuracy by distance (frames between the codeword and its query); chance {recall.CHANCE:.4f} "
          f"(1/{recall.V}); attention alone reaches {rf} frames")
    print("| distance | " + " | ".join(f"{n} (n)" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    keys = sorted({(r[0], r[1]) for t in tables for r in t})
    for lo, hi in keys:
        cells = []
        for t in tables:
            r = [x for x in t if (x[0], x[1]) == (lo, hi)]
            cells.append(f"{r[0][3]:.3f} ({r[0][2]})" if r else "-")
        print(f"| {lo}-{hi} | " + " | ".join(cells) + " |")


def cmd_eval(a):
    tables, names, rf = [], [], None
    for run in a.run:
        cfg, lm = load_run(run)
        if a.window:
            recall.use_windowed_attention(lm)
        rf = recall.receptive_field(cfg)
        t0 = time.time()
        d, ok = evaluate(lm, cfg, a.seed, a.streams, a.seq, a.dmin, a.dmax or a.seq - 8, a.chunk)
        rows = recall.recall_table(d, ok)
        with open(pathlib.Path(run) / "recall.json", "w") as f:
            json.dump({"seq": a.seq, "streams": a.streams, "seed": a.seed, "queries": int(len(d)),
                       "beyond_ring": float(ok[d > rf].mean()) if (d > rf).any() else None,
                       "within_ring": float(ok[d <= rf].mean()) if (d <= rf).any() else None,
                       "table": rows}, f, indent=1)
        print(f"{run}: {len(d)} queries in {time.time() - t0:.0f} s; accuracy d<={rf}: {ok[d <= rf].mean():.3f}, "
              f"d>{rf}: {ok[d > rf].mean():.3f}", flush=True)
        tables.append(rows)
        names.append(cfg["moshi_name"])
    print_table(names, tables, rf)


def cmd_table(a):
    tables, names, rf = [], [], None
    for run in a.run:
        with open(pathlib.Path(run) / "config.json") as f:
            cfg = json.load(f)
        with open(pathlib.Path(run) / "recall.json") as f:
            tables.append([tuple(r) for r in json.load(f)["table"]])
        names.append(cfg["moshi_name"])
        rf = recall.receptive_field(cfg)
    print_table(names, tables, rf)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--design", default="replace", choices=["replace", "after_attention", "kv_memory", "none"])
    t.add_argument("--kind", default="linear", choices=["linear", "mlp"])
    t.add_argument("--layer", type=int, default=1)
    t.add_argument("--dim", type=int, default=128)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--context", type=int, default=16)
    t.add_argument("--ttt-heads", type=int, default=2)
    t.add_argument("--mini-batch", type=int, default=16)
    t.add_argument("--base-lr", type=float, default=None)
    t.add_argument("--rope-theta", type=float, default=None)
    t.add_argument("--lr-gate-bias", type=float, default=None,
                   help="initial learnable_ttt_lr_bias (default 0: the gate starts half open)")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--seq", type=int, default=512)
    t.add_argument("--dmin", type=int, default=1)
    t.add_argument("--dmax", type=int, default=480)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--ckpt-every", type=int, default=50)
    t.add_argument("--window", action="store_true",
                   help="attention over each frame's window of `context` keys (O(T context); same math as moshi's)")
    t.add_argument("--init", help="start from this run's weights (ckpt.pt; same model): a second stage")
    t.add_argument("--out", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--run", action="append", required=True)
    e.add_argument("--seq", type=int, default=2048)
    e.add_argument("--streams", type=int, default=32)
    e.add_argument("--chunk", type=int, default=4)
    e.add_argument("--dmin", type=int, default=1)
    e.add_argument("--dmax", type=int, default=None)
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--window", action="store_true", help="windowed attention (long --seq)")
    tb = sub.add_parser("table")
    tb.add_argument("--run", action="append", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    {"train": cmd_train, "eval": cmd_eval, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
