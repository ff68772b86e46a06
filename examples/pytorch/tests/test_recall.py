"""The shipped recall models (examples/recall: a TTT model and its control, trained by
examples/pytorch/train_recall.py; docs/training.md, "The proof: recall beyond the ring") in the C++
engine, on a fresh stream (a seed the training and the documented runs did not use):
  1. `ttt-moshi forward` against PyTorch (moshi's LMModel with our TTT op) on 2 x 128 frames of the
     task: logits and text logits within 1e-4, for both models;
  2. `ttt-moshi generate --greedy` over STREAMS streams of FRAMES frames whose queries sit mostly
     beyond the attention's reach (30 frames): the TTT model answers >= 90 % of the queries beyond it and the
     control <= 25 % (chance 1/16), both >= 90 % within it, the TTT model answers no PAD frame;
  3. PyTorch teacher-forced on the TTT engine's first 512 frames (its own tokens as the model
     streams): the same argmax at every frame.
Usage: test_recall.py --ttt-moshi PATH (without it: skipped with a message)."""
import os
import sys
import tempfile
import time

from common import PYTORCH_DIR, ROOT, require_moshi, skip, threads

torch = require_moshi()
exe = sys.argv[sys.argv.index("--ttt-moshi") + 1] if "--ttt-moshi" in sys.argv else None
if exe is None or not os.path.exists(exe):
    skip(f"no ttt-moshi binary ({exe}); pass --ttt-moshi build/bin/ttt-moshi")
threads()
import numpy as np  # noqa: E402

sys.path.insert(0, str(PYTORCH_DIR))
import recall_engine as re_  # noqa: E402
from ttt_torch import recall  # noqa: E402

FRAMES, STREAMS, SHORT = 2000, 8, 150
SHIPPED = ROOT / "examples" / "recall"
failures = 0


def check(what, ok, detail):
    global failures
    failures += 0 if ok else 1
    print(f"  {what:58s} {detail} {'ok' if ok else 'FAIL'}", flush=True)


t_start = time.time()
rng = np.random.default_rng([20261204, 15])
codes, _ = recall.make_codes(rng, 2, 128, 1, 127, balanced=True)
# Each stream: queries within the ring in its first SHORT frames (the control must be a working model
# there), then queries beyond it, from 31 to 512 frames.
users, qs = [], []
for b in range(STREAMS):
    u0, _, q0 = recall.make_stream(rng, SHORT, 1, 30)
    u1, _, q1 = recall.make_stream(rng, FRAMES - SHORT, 31, 512, balanced=True)
    q1[:, 0] += SHORT
    users.append(np.concatenate([u0, u1]))
    q = np.concatenate([q0, q1])
    qs.append(np.concatenate([np.full((len(q), 1), b, dtype=np.int64), q], axis=1))
user = torch.from_numpy(np.stack(users))
queries = torch.from_numpy(np.concatenate(qs))
rf = None
results = {}
with tempfile.TemporaryDirectory() as tmp:
    for name in ("ttt", "control"):
        config, weights = str(SHIPPED / name / "config.json"), str(SHIPPED / name / "model.safetensors")
        cfg, lm = re_.load_lm(config, weights)
        rf = recall.receptive_field(cfg)
        print(f"{name}: {cfg['moshi_name']}")
        d, dt, _ = re_.forward_check(exe, config, weights, lm, codes, tmp)
        check("ttt-moshi forward vs PyTorch, max |logits diff|", max(d, dt) <= 1e-4, f"{d:.1e} / text {dt:.1e}")
        t0 = time.time()
        tokens, _ = re_.generate(exe, config, weights, user, tmp)
        ok, false_answers = re_.stream_recall(tokens, queries, FRAMES)
        dist = queries[:, 2].numpy()
        near, far = ok[dist <= rf].mean(), ok[dist > rf].mean()
        print(f"  generate --greedy, {STREAMS} x {FRAMES} frames in {time.time() - t0:.1f} s: {int((dist <= rf).sum())} queries "
              f"within {rf} frames, {int((dist > rf).sum())} beyond (31-{dist.max()})")
        check(f"recall within the ring (d <= {rf})", near >= 0.9, f"{near:.3f}")
        if name == "ttt":
            check(f"recall beyond the ring (d > {rf}) >= 0.9", far >= 0.9, f"{far:.3f} (chance {recall.CHANCE:.4f})")
            check("no codeword where PAD was due", false_answers == 0, f"{false_answers}")
            P = 512
            c = torch.cat([tokens[:1, :, :P], user[:1, None, :P]], dim=1)
            with torch.no_grad():
                out = lm(c)
            same = (out.text_logits[:, 0].argmax(-1) == tokens[:1, 0, :P]).float().mean().item()
            check(f"PyTorch argmax = engine token, first {P} frames", same == 1.0, f"{same:.4f}")
        else:
            check(f"control beyond the ring (d > {rf}) <= 0.25", far <= 0.25, f"{far:.3f} (chance {recall.CHANCE:.4f})")
print(f"recall: {failures} failures ({time.time() - t_start:.0f} s)")
sys.exit(1 if failures else 0)
