#!/usr/bin/env python3
"""`ttt-moshi serve`: several engines, periodic saves, a client that stops reading. A real client
(tests/serve/client.py: aiohttp + Kyutai's sphn) against the bundled small config with random
weights on the CPU, where `--devices 0,1` means two engine threads, each with its own model copy
and batch (docs/serving.md, "Several engines"). Checked:

  engines    --devices 0,1 --max-sessions 1: a lone conversation goes to engine 0 (ties to the
             lowest index); two at once land on different engines, each reply bitwise equal to
             the same seed alone; a third, after one ended, goes to the engine left free; with
             both engines full a client gets "server full"; a conversation saved on engine 1
             resumes on engine 0 (the least loaded then) at its saved frame
  periodic   --save-every 1: a conversation that stepped k frames is saved while live ("saved at
             frame k (periodic)"); SIGKILL (no save at exit); a new server resumes it at frame k,
             its seed restored, speaking from its first frame (the codebook delays already filled)
  slow       a raw WebSocket client with a 4 KiB receive buffer that sends audio and never reads,
             against --send-buffer 4096 --max-queue-frames 10: it is dropped ("client too slow")
             with its state saved, and resumes; a normal real-time conversation beside it gets
             every reply frame, bitwise the same as alone, with no gap over 1.5 s between replies
  idle       --idle-timeout 0.3 and a client that sends its whole WAV at once (faster than the tick
             steps it; the server holds the rest of it, reading paused): it gets its whole reply
             (the idle clock waits while the server holds a frame of its audio) and is dropped
             0.3 s after its last frame was stepped, its state saved at its last frame

  test_engines.py --bin BUILD/bin/ttt-moshi --wav examples/audio/user.wav --config examples/configs/small.json
      [--devices 0,0 --serve-args="--backend cuda"]   (tools/gpu_check.sh serve-devices: one GPU, two engines)
Exit 77 (skipped) without aiohttp / sphn / numpy.
"""
import argparse
import asyncio
import base64
import glob
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

try:
    import aiohttp  # noqa: F401  (client.py needs it)
    import numpy as np
    import sphn
except ImportError as e:
    print(f"SKIPPED: test_engines needs aiohttp, numpy and sphn (tools/python_env.sh): {e}")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from client import FRAME, RATE, converse, read_wav  # noqa: E402
from test_serve import Server, frames_of  # noqa: E402

failures = []
EXTRA = []            # --serve-args: given to every server
DEVICES = "0,1"       # --devices of the two-engine server


def server(binary, *args, name):
    return Server(binary, *EXTRA, *args, name=name)


def check(cond, what):
    print(("ok    " if cond else "FAIL  ") + what, flush=True)
    if not cond:
        failures.append(what)


def same(a, b):
    return a.text == b.text and np.array_equal(a.pcm, b.pcm)


async def ended(srv, r):
    """Waits until the server has let the conversation of result r go: placement counts a
    conversation until its engine sees the connection end."""
    sid = (r.metadata or {}).get("session_id", "")
    return await srv.wait_log(f"session {sid[:8]} ended", timeout=20)


class Joined:
    """A before_send hook: the metadata of a conversation that is still running."""

    def __init__(self):
        self.event = asyncio.Event()
        self.metadata = None

    async def __call__(self, ws, result):
        self.metadata = result.metadata
        self.event.set()


async def scenario_engines(binary, pcm, delay, sessions):
    srv = server(binary, "--devices", DEVICES, "--max-sessions", "1", "--session-dir", sessions, "--save-every", "0",
                 name="engines")
    dev = [int(d) for d in DEVICES.split(",")]
    try:
        check(any(f"on 2 engines (devices {DEVICES})" in l and "2 sessions at most" in l for l in srv.lines),
              "listening line: 2 engines, 1 session each")
        ref = {}
        for seed in (11, 12, 13):
            ref[seed] = await converse(srv.url, pcm, params={"seed": seed})
            await ended(srv, ref[seed])
        check(all(r.metadata and r.metadata.get("engine") == 0 and r.metadata.get("device") == dev[0]
                  for r in ref.values()),
              f"a lone conversation goes to engine 0 (ties to the lowest): "
              f"{[(r.metadata or {}).get('engine') for r in ref.values()]}")

        # A stays live on its engine while B, C, H come and go.
        hold_a, joined_a = asyncio.Event(), Joined()
        task_a = asyncio.create_task(converse(srv.url, pcm, params={"seed": 11}, before_send=joined_a, hold=hold_a))
        await asyncio.wait_for(joined_a.event.wait(), 30)
        ea = joined_a.metadata.get("engine")
        b = await converse(srv.url, pcm, params={"seed": 12})
        eb = (b.metadata or {}).get("engine")
        check(ea == 0 and eb == 1 and (b.metadata or {}).get("device") == dev[1],
              f"two at once: on engines {ea} and {eb} (device {(b.metadata or {}).get('device')})")
        check(same(b, ref[12]), f"engine 1's conversation = the same seed alone on engine 0 (bitwise; {b.summary()})")
        sid_b = (b.metadata or {}).get("session_id", "")
        saved = re.compile(rf"session {sid_b[:8]} ended \(client disconnected\) at frame (\d+), state saved")
        check(await srv.wait_log(f"session {sid_b[:8]} ended"), "B ended and was saved")
        m = saved.search(srv.log())
        frame_b = int(m.group(1)) if m else -1

        c = await converse(srv.url, pcm, params={"seed": 13})
        await ended(srv, c)
        ec = (c.metadata or {}).get("engine")
        check(ec == 1, f"a third conversation, with engine 0 busy and engine 1 free: engine {ec}")
        check(same(c, ref[13]), "its reply = the same seed alone (bitwise)")

        hold_h, joined_h = asyncio.Event(), Joined()
        task_h = asyncio.create_task(converse(srv.url, pcm, params={"seed": 14}, frames=10, before_send=joined_h,
                                              hold=hold_h))
        await asyncio.wait_for(joined_h.event.wait(), 30)
        full = await converse(srv.url, pcm, frames=2)
        check(joined_h.metadata.get("engine") == 1 and len(full.errors) == 1 and "server full" in full.errors[0]
              and full.close_code == 1013,
              f"both engines full: refused ({full.errors}, close {full.close_code})")

        hold_a.set()
        a = await task_a
        check(same(a, ref[11]), f"engine 0's conversation beside engine 1's = alone (bitwise; {a.summary()})")
        sid_a = (a.metadata or {}).get("session_id", "")
        check(await srv.wait_log(f"session {sid_a[:8]} ended"), "A ended")

        rest = pcm[: 10 * FRAME]
        r = await converse(srv.url, rest, params={"session_id": sid_b}, quiet_s=4)
        md = r.metadata or {}
        check(md.get("resumed") is True and md.get("engine") == 0 and md.get("frame") == frame_b and
              md.get("seed") == "12" and len(r.pcm) == frames_of(rest) * FRAME,
              f"saved on engine 1, resumed on engine 0 (the least loaded) at frame {md.get('frame')} "
              f"(want {frame_b}), speaking from its first frame ({len(r.pcm) // FRAME} reply frames for "
              f"{frames_of(rest)} sent)")
        hold_h.set()
        await task_h
    finally:
        rc = srv.stop()
    check(rc == 0, f"the two-engine server exits 0 on SIGTERM (rc {rc})")
    check(len(re.findall(r"status: engine [01] \(device [01]\)", srv.log())) >= 2, "a status line per engine")


async def scenario_periodic(binary, pcm, delay, sessions):
    k = 25
    srv = server(binary, "--session-dir", sessions, "--save-every", "1", name="periodic")
    hold, joined = asyncio.Event(), Joined()
    task = asyncio.create_task(converse(srv.url, pcm, params={"seed": 31}, frames=k, before_send=joined, hold=hold,
                                        timeout_s=90))
    try:
        await asyncio.wait_for(joined.event.wait(), 30)
        sid = joined.metadata.get("session_id", "")
        ok = await srv.wait_log(f"session {sid[:8]} saved at frame {k} (periodic)", timeout=30)
        check(ok, f"a live conversation that stepped {k} frames is saved periodically at frame {k}")
    finally:
        srv.proc.kill()
        srv.proc.wait(10)
        hold.set()
    first = await task
    check(f"session {sid[:8]} ended" not in srv.log(), "SIGKILL: no save at exit")
    check(len(first.pcm) == (k - delay) * FRAME, f"before the kill: {len(first.pcm) // FRAME} reply frames")
    srv2 = server(binary, "--session-dir", sessions, name="after-kill")
    try:
        rest = pcm[k * FRAME:]
        r = await converse(srv2.url, rest, params={"session_id": sid}, quiet_s=4)
        md = r.metadata or {}
        check(md.get("resumed") is True and md.get("frame") == k and md.get("seed") == "31",
              f"after SIGKILL: resumed from the periodic save at frame {md.get('frame')} (want {k}), "
              f"seed {md.get('seed')}")
        print("resumed after SIGKILL:", r.summary())
        check(len(r.pcm) == frames_of(rest) * FRAME and not r.errors,
              f"the resumed conversation speaks from its first frame ({len(r.pcm) // FRAME} reply frames for "
              f"{frames_of(rest)} sent)")
    finally:
        rc = srv2.stop()
    if failures:
        print(srv2.log())
    check(rc == 0, f"the second server exits 0 (rc {rc})")


class StalledClient:
    """A WebSocket client on a raw socket with a tiny receive buffer: it reads the 101 response
    and nothing after it, and streams Ogg Opus audio as fast as the server takes it."""

    def __init__(self, port, pcm):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /api/chat?seed=41 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)  # byte by byte: nothing past the headers is read
        self.status = head.split(b"\r\n", 1)[0].decode()
        self.pcm = pcm
        self.sent = 0
        self.error = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    @staticmethod
    def frame(payload):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def run(self):
        writer = sphn.OpusStreamWriter(RATE)
        self.sock.settimeout(0.5)
        i = 0
        while not self.stop.is_set():
            pos = (i * FRAME) % (len(self.pcm) - FRAME)
            data = writer.append_pcm(self.pcm[pos:pos + FRAME])
            i += 1
            if not len(data):
                continue
            msg = memoryview(self.frame(b"\x01" + bytes(data)))
            while len(msg) and not self.stop.is_set():  # the whole message, however long it waits
                try:
                    msg = msg[self.sock.send(msg):]
                except socket.timeout:
                    continue  # the server paused reading (back-pressure)
                except OSError as e:
                    self.error = e  # the server closed the connection
                    return
            self.sent += 1

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


async def scenario_slow(binary, pcm, delay, sessions):
    srv = server(binary, "--session-dir", sessions, "--send-buffer", "4096", "--max-queue-frames", "10",
                 "--save-every", "0", name="slow")
    stalled = None
    try:
        ref = await converse(srv.url, pcm, params={"seed": 21})
        stalled = StalledClient(srv.port, pcm)
        check(stalled.status.startswith("HTTP/1.1 101"), f"the raw client's upgrade: {stalled.status}")
        await srv.wait_log("joined", timeout=10)
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        r = await converse(srv.url, pcm, params={"seed": 21}, realtime=True)
        dropped = re.search(r"session (\w{8}) ended \(client too slow\) at frame (\d+), state saved", srv.log())
        if not dropped and await srv.wait_log("ended (client too slow)", timeout=30):
            dropped = re.search(r"session (\w{8}) ended \(client too slow\) at frame (\d+), state saved", srv.log())
        check(dropped is not None, f"the client that stops reading is dropped, state saved "
                                   f"({dropped.group(0) if dropped else 'no such line'})")
        gap = float(np.diff(r.audio_at).max()) if len(r.audio_at) > 1 else 99.0
        check(same(r, ref) and len(r.pcm) == (frames_of(pcm) - delay) * FRAME,
              f"the real-time conversation beside it: every reply frame, bitwise as alone ({r.summary()})")
        check(gap < 1.5,
              f"... in time: largest gap between its reply messages {gap:.3f} s (< 1.5 s), "
              f"{time.monotonic() - t0:.1f} s for {len(pcm) / RATE:.1f} s of audio")
        print(f"slow client: sent {stalled.sent} frames, then {type(stalled.error).__name__ if stalled.error else 'no error'}")
        if dropped:
            files = glob.glob(os.path.join(sessions, dropped.group(1) + "*.conversation"))
            check(len(files) == 1, f"its session file: {[os.path.basename(f) for f in files]}")
            if files:
                sid = os.path.basename(files[0]).split(".")[0]
                back = await converse(srv.url, pcm[: 5 * FRAME], params={"session_id": sid}, quiet_s=4)
                md = back.metadata or {}
                check(md.get("resumed") is True and md.get("frame") == int(dropped.group(2)),
                      f"the dropped conversation resumes at frame {md.get('frame')} (saved at {dropped.group(2)})")
    finally:
        if stalled:
            stalled.close()
        rc = srv.stop()
    check(rc == 0, f"slow-client server exits 0 (rc {rc})")


async def scenario_idle(binary, pcm, delay, sessions):
    srv = server(binary, "--session-dir", sessions, "--idle-timeout", "0.3", "--save-every", "0", name="idle")
    try:
        ref = await converse(srv.url, pcm, params={"seed": 51}, quiet_s=3)
        n = frames_of(pcm)
        sid = (ref.metadata or {}).get("session_id", "")
        check(len(ref.pcm) == (n - delay) * FRAME,
              f"a client sending faster than the tick gets its whole reply before any idle drop: "
              f"{len(ref.pcm) // FRAME} reply frames for {n} sent ({ref.summary()})")
        check(ref.errors == ["dropped: no message for 0.3 s"] and ref.close_code == 1008 and
              await srv.wait_log(f"session {sid[:8]} ended (client idle) at frame {n}, state saved"),
              f"then dropped as idle, saved at its last frame {n} ({ref.errors}, close {ref.close_code})")
    finally:
        rc = srv.stop()
    check(rc == 0, f"idle server exits 0 (rc {rc})")


async def run(args):
    pcm = read_wav(args.wav)
    delay = max(json.load(open(args.config))["delays"])
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("engines", scenario_engines), ("periodic", scenario_periodic), ("slow", scenario_slow),
                         ("idle", scenario_idle)):
            if args.only and name not in args.only:
                continue
            s = time.monotonic()
            await fn(args.bin, pcm, delay, os.path.join(tmp, name))
            print(f"-- {name}: {time.monotonic() - s:.1f} s", flush=True)
    print(f"test_engines: {time.monotonic() - t0:.1f} s")
    if failures:
        print(f"{len(failures)} FAILED:")
        for f in failures:
            print("  " + f)
        return 1
    print("all passed")
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--wav", required=True)
    ap.add_argument("--config", required=True, help="the LM config the server uses (for its codebook delays)")
    ap.add_argument("--only", nargs="*", help="engines, periodic, slow, idle (default: all)")
    ap.add_argument("--devices", default="0,1", help="--devices of the two-engine server")
    ap.add_argument("--serve-args", default="", help="more arguments for every server, e.g. '--backend cuda'")
    args = ap.parse_args()
    global DEVICES
    DEVICES = args.devices
    EXTRA.extend(args.serve_args.split())
    if not os.path.exists(args.bin):
        print(f"SKIPPED: {args.bin} not built")
        return 77
    out = subprocess.run([args.bin, "serve", "--help"], capture_output=True, text=True)
    if "this build has no server" in out.stderr or "no conversation engine" in out.stderr:
        print("SKIPPED: ttt-moshi was built without the server: " + out.stderr.strip())
        return 77
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
