#!/usr/bin/env python3
"""A headless client of `ttt-moshi serve`, built as Kyutai's own `moshi.client` is: aiohttp for
the WebSocket, Kyutai's `sphn` for the Ogg Opus streams (OpusStreamWriter for the user's audio,
OpusStreamReader for the reply). It streams a WAV file (24 kHz mono, 16-bit) in 80 ms chunks, in
real time or as fast as the server reads, and collects everything the server sends.

  client.py URL [--wav FILE] [--realtime 0|1] [--param k=v ...] [--out-wav FILE]

As a module: `await converse(url, pcm, ...)` returns a Result (see below); tests/serve/test_serve.py
uses it.
"""
import argparse
import asyncio
import json
import re
import sys
import time
import wave

import aiohttp
import numpy as np
import sphn

RATE = 24000
FRAME = 1920  # 80 ms at 24 kHz: one Mimi frame

KIND_NAMES = {0: "handshake", 1: "audio", 2: "text", 3: "control", 4: "metadata", 5: "error", 6: "ping"}


def read_wav(path):
    with wave.open(path, "rb") as w:
        if w.getframerate() != RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: want 24 kHz mono 16-bit, got {w.getframerate()} Hz, "
                             f"{w.getnchannels()} channels, {8 * w.getsampwidth()} bits")
        data = w.readframes(w.getnframes())
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def write_wav(path, pcm):
    x = np.clip(pcm, -1.0, 1.0)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((x * 32767.0).astype("<i2").tobytes())


class Result:
    def __init__(self):
        self.kinds = []          # the kind byte of every message, in order
        self.handshake = None    # its bytes
        self.metadata = None     # the first metadata message, parsed
        self.text = []           # kind-2 pieces
        self.errors = []         # kind-5 texts
        self.pcm = np.zeros(0, dtype=np.float32)  # the reply, decoded by sphn
        self.audio_messages = 0
        self.audio_at = []       # arrival of each audio message, seconds after connecting
        self.close_code = None   # the WebSocket close code the server sent
        self.frames_sent = 0
        self.seconds = 0.0

    def summary(self):
        return (f"{len(self.kinds)} messages, {self.audio_messages} audio ({len(self.pcm) / RATE:.2f} s), "
                f"{len(self.text)} text, {len(self.errors)} errors, close {self.close_code}")


def same_reply(a, b, min_snr_db=40.0, digests=None):
    """Whether reply a is reply b, and how: (ok, words). The engine guarantees a conversation's
    tokens do not depend on who shares its batch, but not its pcm bit for bit: Mimi's convolution
    GEMMs sum in a batch-shape-dependent order (within ~1e-6 of the peak, docs/conversation_batch.md),
    and once such a difference tips one of Opus's coding decisions the two encodings part at the
    codec's own noise level (~10 dB SNR between them, seen in CI). So, with `digests` (the two
    conversations' token digests from the server's log, `token_digest`): text equal, same length and
    the same tokens, the audio's SNR only reported. Without: text equal, same length, and the audio
    bitwise or within min_snr_db (a flipped audio token would cost a whole frame, far below it)."""
    if a.text != b.text:
        return False, "text differs"
    if len(a.pcm) != len(b.pcm) or len(b.pcm) == 0:
        return False, f"audio length {len(a.pcm)} vs {len(b.pcm)}"
    if np.array_equal(a.pcm, b.pcm):
        snr_words = "audio bitwise"
        snr = float("inf")
    else:
        err = float(np.sum((a.pcm.astype(np.float64) - b.pcm) ** 2))
        snr = 10 * np.log10(float(np.sum(b.pcm.astype(np.float64) ** 2)) / max(err, 1e-300))
        snr_words = f"audio SNR {snr:.1f} dB"
    if digests is not None:
        da, db = digests
        if da is None or db is None or da != db:
            return False, f"text equal, tokens differ (digests {da} vs {db}), {snr_words}"
        return True, f"text and tokens equal (digest {da}), {snr_words}"
    return snr >= min_snr_db, f"text equal, {snr_words}"


async def token_digest(srv, result, timeout=10.0):
    """The token digest the server logged when `result`'s conversation ended ("serve: session
    <8 hex> tokens <16 hex> over <n> frames"), or None if it did not within timeout."""
    sid = ((result.metadata or {}).get("session_id") or "")[:8]
    if not sid or not await srv.wait_log(f"session {sid} tokens ", timeout):
        return None
    m = re.search(rf"session {sid} tokens ([0-9a-f]{{16}}) over (\d+) frames", srv.log())
    return m.group(1) if m else None


async def converse(url, pcm, *, params=None, realtime=False, frames=None, quiet_s=1.5, timeout_s=60.0,
                   before_send=None, raw_messages=(), ssl=None, hold=None):
    """Streams `pcm` (float32, 24 kHz) to url (ws://host:port/api/chat) with query `params`.

    frames: send only this many 80 ms frames (the rest of pcm is ignored); the last partial
    frame is padded with zeros. After sending, waits until the server has been quiet for
    quiet_s, then closes. raw_messages: bytes (or str, sent as a text frame) sent before the
    audio, to test the server's checks. before_send: an async callback(ws, result) run once the
    metadata has arrived. hold: an asyncio.Event; once the replies are quiet the connection (and
    so the conversation) stays open until it is set.
    """
    r = Result()
    q = "&".join(f"{k}={v}" for k, v in (params or {}).items())
    full = url + ("?" + q if q else "")
    reader = sphn.OpusStreamReader(RATE)
    writer = sphn.OpusStreamWriter(RATE)
    n = (len(pcm) + FRAME - 1) // FRAME if frames is None else frames
    buf = np.zeros(n * FRAME, dtype=np.float32)
    m = min(len(pcm), n * FRAME)
    buf[:m] = pcm[:m]
    got_meta = asyncio.Event()
    closed = asyncio.Event()
    last_msg = [time.monotonic()]
    pcm_parts = []
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(full, max_msg_size=0, ssl=ssl if ssl is not None else True) as ws:
            async def recv():
                async for msg in ws:
                    last_msg[0] = time.monotonic()
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        r.errors.append(f"non-binary message {msg.type}")
                        continue
                    data = msg.data
                    kind = data[0]
                    r.kinds.append(kind)
                    if kind == 0:
                        r.handshake = bytes(data)
                    elif kind == 1:
                        r.audio_messages += 1
                        r.audio_at.append(time.monotonic() - t0)
                        out = reader.append_bytes(data[1:])
                        if out is not None and len(out):
                            pcm_parts.append(np.asarray(out, dtype=np.float32).reshape(-1))
                    elif kind == 2:
                        r.text.append(data[1:].decode("utf-8"))
                    elif kind == 4:
                        if r.metadata is None:
                            r.metadata = json.loads(data[1:].decode("utf-8"))
                        got_meta.set()
                    elif kind == 5:
                        r.errors.append(data[1:].decode("utf-8"))
                r.close_code = ws.close_code
                closed.set()
                got_meta.set()

            task = asyncio.create_task(recv())
            try:
                await asyncio.wait_for(got_meta.wait(), timeout_s)
                if r.metadata is not None and not closed.is_set():
                    for raw in raw_messages:
                        if isinstance(raw, str):
                            await ws.send_str(raw)
                        else:
                            await ws.send_bytes(raw)
                    if before_send is not None:
                        await before_send(ws, r)
                    start = time.monotonic()
                    for i in range(n):
                        if closed.is_set():
                            break
                        data = writer.append_pcm(buf[i * FRAME:(i + 1) * FRAME])
                        if len(data):
                            await ws.send_bytes(b"\x01" + data)
                        r.frames_sent += 1
                        if realtime:
                            await asyncio.sleep(max(0.0, start + (i + 1) * FRAME / RATE - time.monotonic()))
                    # Wait for the replies to stop (the server steps what it has, then goes quiet).
                    while not closed.is_set() and time.monotonic() - last_msg[0] < quiet_s:
                        if time.monotonic() - t0 > timeout_s:
                            raise TimeoutError(f"no end of the reply within {timeout_s} s")
                        await asyncio.sleep(0.05)
                    if hold is not None:
                        waits = [asyncio.ensure_future(hold.wait()), asyncio.ensure_future(closed.wait())]
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                        for w in waits:
                            w.cancel()
                else:
                    await asyncio.wait_for(closed.wait(), timeout_s)
            finally:
                if not closed.is_set():
                    await ws.close()
                    await asyncio.wait_for(task, timeout_s)
                else:
                    await task
                if ws.close_code is not None:
                    r.close_code = ws.close_code
    if pcm_parts:
        r.pcm = np.concatenate(pcm_parts)
    r.seconds = time.monotonic() - t0
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="ws://127.0.0.1:8998/api/chat")
    ap.add_argument("--wav", default=None, help="24 kHz mono 16-bit WAV (default: silence)")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of the silence without --wav")
    ap.add_argument("--realtime", type=int, default=1, help="1: 80 ms per frame; 0: as fast as the server reads")
    ap.add_argument("--param", action="append", default=[], help="query parameter k=v (repeatable)")
    ap.add_argument("--out-wav", default=None, help="write the reply here")
    ap.add_argument("--insecure", action="store_true", help="wss://: do not verify the server's certificate")
    args = ap.parse_args()
    pcm = read_wav(args.wav) if args.wav else np.zeros(int(args.seconds * RATE), dtype=np.float32)
    params = dict(p.split("=", 1) for p in args.param)
    r = asyncio.run(converse(args.url, pcm, params=params, realtime=bool(args.realtime),
                             ssl=False if args.insecure else None))
    print("metadata:", json.dumps(r.metadata))
    print("text:", "".join(r.text))
    for e in r.errors:
        print("error:", e)
    print(r.summary())
    if args.out_wav:
        write_wav(args.out_wav, r.pcm)
    return 0 if r.metadata is not None and not r.errors else 1


if __name__ == "__main__":
    sys.exit(main())
