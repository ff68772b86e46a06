#!/usr/bin/env python3
"""Ogg Opus interoperability with Kyutai's `sphn` package (what Kyutai's Moshi server and Python
client stream with): an independent reference for ttt/io/opus_stream.hpp.

  make_opus_fixture.py write [OUT]   encode the known 1 s signal with sphn.OpusStreamWriter(24000)
                                     into OUT (default tests/data/opus/sphn_sine.ogg)
  make_opus_fixture.py check FILE [RAW]
                                     decode FILE (e.g. the test's ttt_sine.ogg, written by our
                                     OpusStreamWriter from the same signal) with
                                     sphn.OpusStreamReader(24000), fed in 100-byte pieces, and
                                     compare with the signal: length, delay, SNR; and with RAW
                                     (ttt_sine_raw.f32: float32 samples our OpusStreamReader
                                     decoded from FILE with trim = false), sample by sample
  (test_opus writes both files into its working directory, build/tests/work/test_opus)

Needs sphn and numpy (`python3 -m venv v && v/bin/pip install sphn numpy`). Works with sphn 0.1
(append_pcm + read_bytes, append_bytes + read_pcm) and 0.2 (append_pcm / append_bytes return
the bytes / samples).
"""
import math
import os
import sys

import numpy as np
import sphn

RATE = 24000


def known_signal(n=RATE):
    # The same formula as known_signal() in tests/test_opus.cpp.
    # 440 Hz at 0.4 plus a chirp at 0.25 from 200 Hz rising 2800 Hz/s (aperiodic: one delay fits).
    t = np.arange(n, dtype=np.float64) / RATE
    x = 0.4 * np.sin(2 * math.pi * 440.0 * t) + 0.25 * np.sin(2 * math.pi * (200.0 * t + 1400.0 * t * t))
    return x.astype(np.float32)


def sphn_version():
    try:
        from importlib.metadata import version

        return version("sphn")
    except Exception:
        return "?"


def write(out):
    x = known_signal()
    w = sphn.OpusStreamWriter(RATE)
    data = bytearray()
    for k in range(0, len(x), 960):  # sphn takes whole frames: 960 samples (40 ms at 24 kHz)
        r = w.append_pcm(x[k : k + 960])
        if isinstance(r, (bytes, bytearray)):
            data += r
        if hasattr(w, "read_bytes"):
            while True:
                b = w.read_bytes()
                if not b:
                    break
                data += b
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "wb") as f:
        f.write(bytes(data))
    print(f"{os.path.normpath(out)}: {len(data)} bytes, {len(x)} samples in, sphn {sphn_version()}")


def best_lag(y, x, max_lag=4000):
    # y[i] ~ x[i + lag]
    best = (-1e30, 0)
    m = min(len(y), len(x)) - max_lag
    for lag in range(-max_lag, max_lag + 1):
        a = y[max(0, -lag) : max(0, -lag) + m - abs(lag)]
        b = x[max(0, lag) : max(0, lag) + len(a)]
        c = float(np.dot(a.astype(np.float64), b.astype(np.float64)))
        if c > best[0]:
            best = (c, lag)
    return best[1]


def check(path, raw=None):
    data = open(path, "rb").read()
    r = sphn.OpusStreamReader(RATE)
    pcm = []
    for k in range(0, len(data), 100):
        out = r.append_bytes(data[k : k + 100])
        if out is not None and len(out):
            pcm.append(np.asarray(out, dtype=np.float32))
        if hasattr(r, "read_pcm"):
            while True:
                p = r.read_pcm()
                if p is None or len(p) == 0:
                    break
                pcm.append(np.asarray(p, dtype=np.float32))
    y = np.concatenate(pcm) if pcm else np.zeros(0, np.float32)
    x = known_signal()
    print(f"{path}: {len(data)} bytes -> sphn {sphn_version()} OpusStreamReader decoded {len(y)} samples ({len(x)} were encoded)")
    if len(y) < 2000:
        print("too short to compare")
        return 1
    lag = best_lag(y, x, 400)
    # y[i] ~ x[i + lag]; lag < 0: y is delayed by -lag samples (sphn does not apply pre-skip)
    lo = max(0, -lag) + 480  # past the encoder's first frame
    hi = min(len(y), len(x) - lag) - 480
    a = y[lo:hi].astype(np.float64)
    b = x[lo + lag : hi + lag].astype(np.float64)
    snr = 10 * math.log10(float(np.sum(b * b)) / max(float(np.sum((a - b) ** 2)), 1e-30))
    print(f"delay {-lag} samples (y[i] = x[i - {-lag}]), SNR {snr:.1f} dB over samples {lo}..{hi}")
    print(f"peak |y| {float(np.max(np.abs(y))):.3f}, all finite: {bool(np.all(np.isfinite(y)))}")
    if raw:
        ours = np.fromfile(raw, dtype="<f4")
        same_len = len(ours) == len(y)
        n = min(len(ours), len(y))
        d = float(np.max(np.abs(ours[:n] - y[:n]))) if n else float("nan")
        print(f"vs {raw}: {len(ours)} samples (sphn {len(y)}), max |sphn - ttt| = {d:.3g}")
        if not same_len or not d < 1e-3:
            return 1
    return 0


def main():
    if len(sys.argv) >= 2 and sys.argv[1] == "write":
        here = os.path.dirname(os.path.abspath(__file__))
        write(sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "..", "tests", "data", "opus", "sphn_sine.ogg"))
        return 0
    if len(sys.argv) in (3, 4) and sys.argv[1] == "check":
        return check(sys.argv[2], sys.argv[3] if len(sys.argv) == 4 else None)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
