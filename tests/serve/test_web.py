#!/usr/bin/env python3
"""The conversation page of `ttt-moshi serve` in headless Chromium (issue 14).

Starts `ttt-moshi serve` (bundled small config, seeded random weights, CPU) on a free loopback
port with a session directory, and Debian's Chromium with a fake microphone that plays a WAV.
Drives the page (examples/ttt_moshi/web) over the DevTools protocol (tests/serve/chromium.py)
and checks, from the page's own counters and its DOM:
  1. a conversation: the handshake arrives, the metadata's session id is shown, the microphone
     is encoded by WebCodecs into Ogg Opus that the server accepts (the server steps a
     conversation only on frames decoded from it, so reply audio proves it), reply audio is
     decoded and scheduled (seconds of it, not silent), the transcript fills; no errors; a
     screenshot (PNG) of the page;
  2. Disconnect, then resume through the page's resume box: the same session id comes back,
     marked resumed, at the frame the server logged when it saved the conversation, and audio
     flows again;
  3. errors (kind 5) are shown on the page: an unknown session id, an invalid parameter;
  4. the page's Ogg code (web/ogg.js) against Kyutai's sphn: a stream sphn wrote, fed to the
     page's reader 7 bytes at a time, re-paged by its writer, decodes with sphn to the same
     samples; every page's CRC equals an independent Python CRC; a flipped byte is refused.
Then SIGTERM: the server exits 0.

  test_web.py --bin build/bin/ttt-moshi [--wav examples/audio/user.wav] [--screenshot PATH]
Exit 77 (skipped) when chromium, aiohttp, sphn, numpy or the binary is missing.
"""
import argparse
import asyncio
import base64
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def skip(why):
    print(f"SKIPPED: {why}")
    sys.exit(77)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `ttt-moshi serve` process; its stderr is kept (self.log) and echoed with a prefix."""

    def __init__(self, exe, port, args, name="serve"):
        self.port, self.name, self.lines, self.eof = port, name, [], False
        self.cond = threading.Condition()
        self.proc = subprocess.Popen([exe, "serve", "--port", str(port)] + args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stderr:
            line = line.rstrip()
            print(f"  [{self.name}] {line}", flush=True)
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_for(self, pattern, timeout):
        """The first match of pattern in the log (waiting up to timeout s), or an AssertionError."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    m = rx.search(line)
                    if m:
                        return m
                if time.monotonic() > deadline or self.eof:
                    raise AssertionError(f"{self.name}: no log line matching {pattern!r} within {timeout} s "
                                         f"(exit code {self.proc.poll()})")
                self.cond.wait(0.2)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name}: still running {timeout} s after signal {sig}")


async def wait_stats(page, cond, what, timeout):
    """Polls window.tttStats until cond(stats) holds; returns the stats or fails naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        st = await page.eval("window.tttStats")
        if cond(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"page: {what} not reached within {timeout} s; stats {st}; "
                                 f"console {page.console[-8:]}")
        await asyncio.sleep(0.25)


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)
    print(f"  ok: {msg}")


def ogg_crc(page):
    """Ogg's CRC-32 (polynomial 0x04c11db7, MSB first, init 0, no final XOR), bit by bit."""
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def ogg_pages(data):
    """(header fields, page bytes) of each page of an Ogg stream."""
    pages, at = [], 0
    while at < len(data):
        assert data[at:at + 4] == b"OggS", f"no page at byte {at}"
        nseg = data[at + 26]
        n = 27 + nseg + sum(data[at + 27:at + 27 + nseg])
        page = data[at:at + n]
        fields = struct.unpack_from("<BBqIII", page, 4)  # version, flags, granule, serial, sequence, crc
        pages.append((fields, page))
        at += n
    return pages


async def check_ogg(page):
    import numpy as np
    import sphn
    t = np.arange(2 * 24000) / 24000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 1.3 * t)).astype(np.float32)
    src = bytes(sphn.OpusStreamWriter(24000).append_pcm(x))
    r = await page.eval("""((b64) => {
      const b = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const pk = [], info = [];
      const rd = new TttOgg.OggReader((p, i) => { pk.push(p); info.push(i); });
      for (let i = 0; i < b.length; i += 7) rd.push(b.subarray(i, i + 7));  // split anywhere
      const w = new TttOgg.OggWriter(0x7474);
      const out = [w.page([pk[0]], 0, TttOgg.FLAG_BOS), w.page([pk[1]], 0, 0)];
      let g = 0;
      for (const p of pk.slice(2)) { g += TttOgg.opusPacketSamples(p); out.push(w.page([p], g, 0)); }
      let s = '';
      for (const p of out) for (const v of p) s += String.fromCharCode(v);
      const bad = b.slice(); bad[b.length >> 1] ^= 0x10;
      let err = '';
      try { new TttOgg.OggReader(() => {}).push(bad); } catch (e) { err = e.message; }
      return {packets: pk.length, lastGranule: info[info.length - 1].granule, ogg: btoa(s), err};
    })(%r)""" % base64.b64encode(src).decode())
    ours = base64.b64decode(r["ogg"])
    ref_pcm = sphn.OpusStreamReader(24000).append_bytes(src)
    our_pcm = sphn.OpusStreamReader(24000).append_bytes(ours)
    src_pages = ogg_pages(src)
    n_packets = sum(1 for _, p in src_pages for v in p[27:27 + p[26]] if v < 255)
    check(r["packets"] == n_packets > 2 and r["lastGranule"] == src_pages[-1][0][2],
          f"ogg.js read sphn's {len(src)}-byte stream 7 bytes at a time: {r['packets']} packets, "
          f"last granule {r['lastGranule']}")
    check(len(our_pcm) == len(ref_pcm) > 0 and np.array_equal(our_pcm, ref_pcm),
          f"sphn decodes ogg.js's re-paged stream to the same {len(ref_pcm)} samples")
    pages = ogg_pages(ours)
    bad_crc = [f[1] for f, p in pages if ogg_crc(p[:22] + b"\0\0\0\0" + p[26:]) != f[5]]
    seqs = [f[4] for f, _ in pages]
    granules = [f[2] for f, _ in pages[2:]]
    check(not bad_crc and seqs == list(range(len(pages))) and granules == sorted(granules) and pages[0][0][1] == 2,
          f"ogg.js's {len(pages)} pages: CRCs equal a Python CRC, sequence 0..{len(pages) - 1}, BOS first, "
          f"granules rising to {granules[-1]}")
    check("checksum" in r["err"], f"a flipped byte is refused: {r['err']!r}")


async def run(args, exe, chromium_exe):
    from chromium import Chromium

    tmp = tempfile.mkdtemp(prefix="ttt-web-")
    sessions = os.path.join(tmp, "sessions")
    os.makedirs(sessions)
    port = free_port()
    server = Server(exe, port, ["--session-dir", sessions])
    try:
        server.wait_for(r"listening on", 120)
        base = f"http://127.0.0.1:{port}/"
        async with Chromium(chromium_exe, args.wav) as page:
            # 1. A conversation started by the page itself (autostart=1 presses Connect at load).
            t0 = time.monotonic()
            await page.goto(base + "?autostart=1&seed=7")
            st = await wait_stats(page, lambda s: s["replySamples"] >= 2 * max(1, s["replyRate"]) and s["textChars"] > 0,
                                  "2 s of reply audio and some transcript", 60)
            print(f"  conversation 1 after {time.monotonic() - t0:.1f} s: {st}")
            check(st["state"] == "live", "the page is live (handshake received)")
            check(st["errors"] == 0, f"no error shown (last: {st['lastError']})")
            check(re.fullmatch(r"[0-9a-f]{32}", st["sessionId"] or "") is not None,
                  f"the metadata's session id is shown: {st['sessionId']}")
            check(not st["resumed"] and st["frame"] == 0, "a new conversation starts at frame 0")
            check(st["sentSeconds"] > 1.0, f"microphone audio sent as Ogg Opus: {st['sentSeconds']:.2f} s in "
                                           f"{st['sentPages']} pages")
            check(st["replyRate"] in (24000, 48000), f"reply decoded by WebCodecs at {st['replyRate']} Hz")
            check(st["replyPeak"] > 1e-3, f"reply audio is not silent (peak {st['replyPeak']:.3f})")
            dom = await page.eval("({chars: Array.from(document.getElementById('transcript').textContent).length,"
                                  " samples: +document.getElementById('reply-samples').textContent,"
                                  " session: document.getElementById('session-id').textContent,"
                                  " error: !document.getElementById('error').hidden})")
            check(dom["chars"] >= st["textChars"] > 0, f"transcript shown: {dom['chars']} characters")
            check(dom["samples"] > 0 and dom["session"] == st["sessionId"] and not dom["error"],
                  "counters and session id rendered in the DOM, no error box")
            shot = os.path.join(os.getcwd(), "serve_page.png")
            await page.screenshot(shot, "main")
            print(f"  screenshot: {shot} ({os.path.getsize(shot)} bytes)")
            if args.screenshot:
                shutil.copyfile(shot, args.screenshot)
            sid = st["sessionId"]

            # 2. Disconnect (the server saves the conversation) and resume it from the page.
            await page.eval("document.getElementById('disconnect').click()")
            await wait_stats(page, lambda s: s["state"] == "closed", "state 'closed' after Disconnect", 10)
            m = server.wait_for(rf"session {sid[:8]}\w* ended \(.*\) at frame (\d+), state saved", 15)
            saved_frame = int(m.group(1))
            check(saved_frame > 0, f"the server saved the conversation at frame {saved_frame}")
            await page.eval("document.getElementById('copy-session').click();"
                            "document.getElementById('connect').click()")
            st = await wait_stats(page, lambda s: s["state"] == "live" and s["sessionId"] and s["replySamples"] > 0,
                                  "reply audio after resuming", 30)
            check(st["sessionId"] == sid and st["resumed"], "the resume box brought back the same session")
            check(st["frame"] == saved_frame, f"resumed at the saved frame ({st['frame']} == {saved_frame})")
            note = await page.eval("document.getElementById('session-note').textContent")
            check(str(saved_frame) in note, f"the page says so: '{note}'")
            await page.eval("document.getElementById('disconnect').click()")
            await wait_stats(page, lambda s: s["state"] == "closed", "state 'closed' after Disconnect", 10)

            # 3. Errors from the server (kind 5) are shown.
            for query, expect in (("session_id=" + "0" * 32, "0" * 32), ("text_topk=-3", "text_topk")):
                await page.goto(base + "?autostart=1&" + query)
                st = await wait_stats(page, lambda s: s["errors"] > 0, f"an error shown for {query}", 20)
                box = await page.eval("({hidden: document.getElementById('error').hidden,"
                                      " text: document.getElementById('error').textContent})")
                check(not box["hidden"] and expect in box["text"] and box["text"].startswith("Server:"),
                      f"{query}: the server's error is shown: {box['text']!r}")
            await check_ogg(page)
        rc = server.stop(signal.SIGTERM)
        check(rc == 0, "SIGTERM: the server exits 0")
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the ttt-moshi executable")
    ap.add_argument("--wav", default=os.path.join(ROOT, "examples", "audio", "user.wav"))
    ap.add_argument("--screenshot", help="also copy the screenshot here (e.g. docs/img/serve_page.png)")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    for mod in ("aiohttp", "sphn", "numpy"):
        try:
            __import__(mod)
        except ImportError:
            skip(f"the Python module {mod} is missing (tools/python_env.sh installs it)")
    from chromium import find_chromium
    chromium_exe = find_chromium()
    if not chromium_exe:
        skip("no chromium (Debian: apt-get install chromium, or tools/install-deps.sh browser)")
    if not os.access(args.bin, os.X_OK):
        skip(f"{args.bin} is not built")
    if not os.path.exists(args.wav):
        skip(f"{args.wav} is missing")
    t0 = time.monotonic()
    try:
        asyncio.run(run(args, args.bin, chromium_exe))
    except AssertionError as e:
        print(f"FAILED: {e}")
        sys.exit(1)
    print(f"test_web: all checks passed in {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
