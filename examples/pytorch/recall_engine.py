#!/usr/bin/env python3
"""Runs a recall model trained by train_recall.py through the C++ engine (`ttt-moshi`) and checks it
against PyTorch (docs/training.md, "The proof: recall beyond the ring"):

  1. logits: `ttt-moshi forward` on a fresh stream against moshi's LMModel.forward (our TTT op)
     on the same codes: max |difference| of the audio and text logits (tolerance 1e-4);
  2. a long stream through `ttt-moshi generate --greedy` (the engine's streaming LmGen, one frame a
     step, its own text / audio fed back, the user stream from --user-codes): recall accuracy by
     distance, by position in the stream, and false answers (a codeword where PAD was due);
  3. with --whole: the same streams teacher-forced in PyTorch (moshi's attention computed over each
     frame's window: ttt_torch.recall.use_windowed_attention, so an hour fits) with the engine's own
     outputs as the model streams: PyTorch's argmax must be the engine's token at every frame; and
     `ttt-moshi forward` (teacher-forced) on stream 0 against PyTorch's logits over the whole stream.

  recall_engine.py --run runs/ttt --ttt-moshi build/bin/ttt-moshi [--frames 45000] [--streams 4] [--whole]
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "tests"))
from common import read_safetensors, write_safetensors  # noqa: E402
from ttt_torch import recall  # noqa: E402
from ttt_torch.moshi_designs import build_lm  # noqa: E402


def load_lm(config, weights):
    with open(config) as f:
        cfg = json.load(f)
    lm = build_lm(cfg)
    lm.load_state_dict(read_safetensors(weights), strict=True)
    lm.eval()
    return cfg, lm


def run(cmd):
    # One OpenMP thread unless OMP_NUM_THREADS says otherwise: the model is tiny, and on a busy machine
    # two threads waiting on each other made `generate` 20x slower (21 s against 0.95 s, 4 x 1500 frames).
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr.strip()}")
    return r.stderr


def forward_check(exe, config, weights, lm, codes, tmp):
    """max |engine - PyTorch| of the logits and text logits of LMModel.forward on codes."""
    cp, op = os.path.join(tmp, "codes.safetensors"), os.path.join(tmp, "fwd.safetensors")
    write_safetensors(cp, {"codes": codes})
    run([exe, "forward", "--config", config, "--weights", weights, "--codes", cp, "--out", op])
    eng = read_safetensors(op)
    with torch.no_grad():
        out = lm(codes)
    m, tm = out.mask, out.text_mask
    if not torch.equal(eng["mask"].bool(), m):
        raise RuntimeError("engine and PyTorch masks differ")
    d = (eng["logits"][m] - out.logits[m]).abs().max().item()
    dt = (eng["text_logits"][tm] - out.text_logits[tm]).abs().max().item()
    return d, dt, out.text_logits[tm].abs().max().item()


def generate(exe, config, weights, user, tmp):
    """`ttt-moshi generate --greedy` on the user stream user [B, S] of LMModel.forward's codes: tokens
    [B, 1 + dep_q, S] aligned with those codes, and the engine's log. LmGen (moshi's, and ours) reads
    the user frame of step s with the model's tokens of step s - 1 and the initial token at step 0, so
    its step s sees what LMModel.forward's frame s sees when the user frame given at step s is the
    codes' frame s - 1: the user stream goes in one frame late (step 0's frame is never read)."""
    up, op = os.path.join(tmp, "user.safetensors"), os.path.join(tmp, "tokens.safetensors")
    late = torch.cat([torch.full_like(user[:, :1], recall.V + 1), user[:, :-1]], dim=1)
    write_safetensors(up, {"user_codes": late.unsqueeze(1)})
    S = user.shape[1]
    log = run([exe, "generate", "--config", config, "--weights", weights, "--user-codes", up, "--greedy",
               "--progress-every", str(max(1, S // 10)), "--out", op])
    return read_safetensors(op)["tokens"], log


def stream_recall(tokens, queries, T):
    """Per query: correct?; and the false answers (a codeword where PAD was due) over all frames."""
    text = tokens[:, 0].numpy()
    b, t, c = queries[:, 0].numpy(), queries[:, 1].numpy(), queries[:, 3].numpy()
    ok = text[b, t] == 1 + c
    due = np.zeros_like(text, dtype=bool)
    due[b, t] = True
    false_answers = int(((text != recall.PAD) & ~due).sum())
    return ok, false_answers


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a train_recall.py run directory (config.json, model.safetensors)")
    p.add_argument("--config")
    p.add_argument("--weights")
    p.add_argument("--ttt-moshi", required=True)
    p.add_argument("--frames", type=int, default=45000, help="the long stream (45,000 = an hour at 12.5 Hz)")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--dmin", type=int, default=1)
    p.add_argument("--dmax", type=int, default=4096)
    p.add_argument("--check-frames", type=int, default=256, help="stream length of the logits check (B 2)")
    p.add_argument("--whole", action="store_true",
                   help="3.: the whole stream in PyTorch (windowed attention) and `ttt-moshi forward` (slow)")
    p.add_argument("--segments", type=int, default=9, help="report accuracy over this many parts of the stream")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the numbers here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    config = a.config or os.path.join(a.run, "config.json")
    weights = a.weights or os.path.join(a.run, "model.safetensors")
    cfg, lm = load_lm(config, weights)
    rf = recall.receptive_field(cfg)
    res = {"config": config, "weights": weights, "receptive_field": rf, "chance": recall.CHANCE}
    rng = np.random.default_rng([a.seed, 7])
    with tempfile.TemporaryDirectory() as tmp:
        codes, _ = recall.make_codes(rng, 2, a.check_frames, 1, a.check_frames, balanced=True)
        d, dt, scale = forward_check(a.ttt_moshi, config, weights, lm, codes, tmp)
        print(f"1. ttt-moshi forward vs PyTorch, 2 x {a.check_frames} frames: max |logits diff| {d:.2e}, "
              f"text {dt:.2e} (max |text logit| {scale:.1f}; tolerance 1e-4) {'ok' if max(d, dt) <= 1e-4 else 'FAIL'}",
              flush=True)
        res.update(logits_diff=d, text_logits_diff=dt, logits_ok=max(d, dt) <= 1e-4)

        users, qs = [], []
        for b in range(a.streams):
            user, _, q = recall.make_stream(rng, a.frames, a.dmin, a.dmax, balanced=True)
            users.append(torch.from_numpy(user))
            qs.append(np.concatenate([np.full((len(q), 1), b), q], axis=1))
        user, queries = torch.stack(users), torch.from_numpy(np.concatenate(qs).astype(np.int64))
        t0 = time.time()
        tokens, log = generate(a.ttt_moshi, config, weights, user, tmp)
        secs = time.time() - t0
        for line in log.splitlines():
            if line.startswith(("long run", "generated")):
                print("   ttt-moshi: " + line.strip())
        ok, false_answers = stream_recall(tokens, queries, a.frames)
        dist = queries[:, 2].numpy()
        rows = recall.recall_table(dist, ok)
        beyond = ok[dist > rf]
        print(f"2. ttt-moshi generate --greedy, {a.streams} x {a.frames} frames ({secs:.0f} s): {len(ok)} queries, "
              f"accuracy d<={rf} {ok[dist <= rf].mean():.3f}, d>{rf} {beyond.mean():.3f} (chance "
              f"{recall.CHANCE:.4f}); false answers {false_answers} of "
              f"{a.streams * a.frames - len(ok)} PAD frames", flush=True)
        print("   | distance | queries | accuracy |\n   |---|---|---|")
        for lo, hi, n, acc in rows:
            print(f"   | {lo}-{hi} | {n} | {acc:.3f} |")
        seg = []
        edges = np.linspace(0, a.frames, a.segments + 1).astype(int)
        t = queries[:, 1].numpy()
        for i in range(a.segments):
            m = (t >= edges[i]) & (t < edges[i + 1]) & (dist > rf)
            seg.append((int(edges[i]), int(edges[i + 1]), int(m.sum()), float(ok[m].mean()) if m.any() else None))
        print("   beyond the ring by position in the stream: " +
              ", ".join(f"{s0}-{s1}: {acc:.3f} ({n})" for s0, s1, n, acc in seg if acc is not None), flush=True)
        res.update(frames=a.frames, streams=a.streams, generate_seconds=secs, queries=int(len(ok)),
                   within_ring=float(ok[dist <= rf].mean()), beyond_ring=float(beyond.mean()),
                   false_answers=false_answers, table=rows, segments=seg)

        if a.whole:
            # The engine's own tokens as the model streams: PyTorch sees what the engine saw at every frame.
            recall.use_windowed_attention(lm)
            t0 = time.time()
            same_text = same_audio = 0.0
            for b in range(a.streams):
                codes = torch.cat([tokens[b:b + 1], user[b:b + 1, None]], dim=1)
                with torch.no_grad():
                    out = lm(codes)
                same_text += (out.text_logits[0, 0].argmax(-1) == tokens[b, 0]).float().mean().item() / a.streams
                same_audio += (out.logits[0].argmax(-1) == tokens[b, 1:]).float().mean().item() / a.streams
                if b == 0:
                    cp, fp = os.path.join(tmp, "codes0.safetensors"), os.path.join(tmp, "fwd0.safetensors")
                    write_safetensors(cp, {"codes": codes})
                    run([a.ttt_moshi, "forward", "--config", config, "--weights", weights, "--codes", cp, "--out", fp])
                    eng = read_safetensors(fp)
                    m = out.mask
                    hd = (eng["logits"][m] - out.logits[m]).abs().max().item()
                    htd = (eng["text_logits"] - out.text_logits).abs().max().item()
            print(f"3. PyTorch teacher-forced on the whole stream with the engine's tokens ({time.time() - t0:.0f} s): "
                  f"its argmax is the engine's token at {same_text:.5f} of text frames, {same_audio:.5f} of audio "
                  f"tokens; `ttt-moshi forward` on stream 0 ({a.frames} frames) vs PyTorch: max |logits diff| "
                  f"{hd:.2e}, text {htd:.2e}", flush=True)
            res.update(whole_text_agree=same_text, whole_audio_agree=same_audio, whole_logits_diff=hd,
                       whole_text_logits_diff=htd)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
