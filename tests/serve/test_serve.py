#!/usr/bin/env python3
"""End-to-end tests of `ttt-moshi serve` with a real client (tests/serve/client.py: aiohttp +
Kyutai's sphn, as moshi.client). Starts the server on free loopback ports with the bundled small
config and random weights on the CPU, and checks (docs/serving.md, "What the tests cover"):

  protocol   the handshake comes first (Kyutai's 9 bytes), then the metadata with a 128-bit
             session id; the reply audio decodes (sphn) to exactly one 80 ms frame per frame sent
             after the codebook delays, is not silent; text pieces arrive
  batching   two concurrent clients with different seeds: each gets the reply it gets alone
             (text equal and the same tokens, by the digest the server logs when a conversation
             ends; the audio's SNR is reported: client.same_reply says why), and the two differ
  limits     --max-sessions 1: a second client gets kind 5 "server full" and a clean close while
             the first continues undisturbed; --auth-token: a client without it is refused; a
             client silent past --idle-timeout is dropped with its state saved
  sessions   a client that disconnects is saved; reconnecting with its session_id resumes at the
             same frame, with the codebook delays already filled (audio from the first frame on)
  SIGTERM    saves the live conversation, closes the client (1001), exits 0; it resumes on a new
             server from the saved file
  faults     each malformed message (text frame, empty, unknown kind, client text / metadata,
             bad control, oversize, broken Ogg, corrupt page mid-stream, bad / unknown query
             values, unknown or traversal session ids, wrong path) gets a kind-5 error (and a
             close where the policy says so) while another conversation runs undisturbed
  static     GET / serves the web directory; traversal, hidden names and symlinks out are 404
  TLS        --ssl-cert / --ssl-key: wss:// with a self-signed certificate gives the same reply; a
             plain client is refused; a bad key file is one clear error

  test_serve.py --bin BUILD/bin/ttt-moshi --wav examples/audio/user.wav --config examples/configs/small.json
Exit 77 (skipped) without aiohttp / sphn / numpy.
"""
import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

try:
    import aiohttp
    import numpy as np
    import sphn
except ImportError as e:
    print(f"SKIPPED: test_serve needs aiohttp, numpy and sphn (tools/python_env.sh): {e}")
    sys.exit(77)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from client import FRAME, RATE, converse, read_wav, same_reply, token_digest  # noqa: E402

failures = []
IDLE = 8  # --idle-timeout of the main server: longer than any pause of its other clients


def check(cond, what):
    print(("ok    " if cond else "FAIL  ") + what, flush=True)
    if not cond:
        failures.append(what)


class Server:
    def __init__(self, binary, *args, name="server"):
        self.name = name
        self.lines = []
        self.proc = subprocess.Popen([binary, "serve", "--port", "0", "--status-every", "1", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.port = None
        got = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r"listening on https?://127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    got.set()
            got.set()

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()
        if not got.wait(60) or self.port is None:
            self.proc.kill()
            raise RuntimeError(f"{name} did not start:\n" + "\n".join(self.lines[-20:]))
        self.url = f"ws://127.0.0.1:{self.port}/api/chat"
        self.http = f"http://127.0.0.1:{self.port}"

    def log(self):
        return "\n".join(self.lines)

    async def wait_log(self, text, timeout=10.0):
        """True once `text` is in the server's log (the engine thread logs between ticks)."""
        t0 = time.monotonic()
        while text not in self.log():
            if time.monotonic() - t0 > timeout:
                return False
            await asyncio.sleep(0.05)
        return True

    def stop(self, sig=signal.SIGTERM, timeout=20):
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self.thread.join(5)
        return rc


def frames_of(pcm):
    return (len(pcm) + FRAME - 1) // FRAME


async def http_get(port, path):
    """A raw GET (no client-side path normalisation): (status, content type, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    ctype = next((l.split(":", 1)[1].strip() for l in lines[1:] if l.lower().startswith("content-type:")), "")
    return status, ctype, body


def corrupt_stream():
    """A valid start (headers + 3 frames from sphn), then the same bytes with one flipped in a
    later page: libogg's CRC check must catch it."""
    w = sphn.OpusStreamWriter(RATE)
    t = np.arange(FRAME * 4) / RATE
    x = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    good = b"".join(w.append_pcm(x[i * FRAME:(i + 1) * FRAME]) for i in range(3))
    bad = bytearray(w.append_pcm(x[3 * FRAME:]))
    bad[len(bad) // 2] ^= 0x5A
    return good, bytes(bad)


async def scenario_main(srv, pcm, delay, oversize):
    n = frames_of(pcm)
    # --- protocol, alone -------------------------------------------------------------------------
    ref = await converse(srv.url, pcm, params={"seed": 11})
    print("solo seed 11:", ref.summary(), f"{ref.seconds:.2f} s")
    check(ref.kinds[:2] == [0, 4], f"handshake first, then metadata (kinds {ref.kinds[:2]})")
    check(ref.handshake == b"\x00" * 9, f"handshake is Kyutai's 9 bytes (got {ref.handshake!r})")
    md = ref.metadata or {}
    check(re.fullmatch(r"[0-9a-f]{32}", md.get("session_id", "")) is not None,
          f"metadata carries a 128-bit hex session id ({md.get('session_id')})")
    check(md.get("frame") == 0 and md.get("resumed") is False, f"a new conversation starts at frame 0 ({md})")
    check(md.get("seed") == "11" and "text_temperature" in md, "metadata echoes the conversation's options")
    want = (n - delay) * FRAME
    check(len(ref.pcm) == want,
          f"reply audio: {len(ref.pcm)} samples decoded = ({n} frames sent - {delay} delay) x {FRAME} = {want}")
    rms = float(np.sqrt(np.mean(ref.pcm.astype(np.float64) ** 2))) if len(ref.pcm) else 0.0
    check(rms > 1e-3 and np.all(np.isfinite(ref.pcm)), f"reply audio is not silent (rms {rms:.4f})")
    check(len(ref.text) > 0 and all(re.fullmatch(r"<\d+>", t) for t in ref.text),
          f"text pieces arrive ({len(ref.text)}, token ids without --tokenizer: {''.join(ref.text[:5])}...)")
    check(not ref.errors and ref.close_code == 1000, f"no errors, clean close ({ref.errors}, {ref.close_code})")

    # --- two at once, different seeds --------------------------------------------------------------
    a, b = await asyncio.gather(converse(srv.url, pcm, params={"seed": 11}),
                                converse(srv.url, pcm, params={"text_seed": 5, "audio_seed": 6}))
    print("concurrent seed 11:", a.summary(), "| concurrent seeds 5/6:", b.summary())
    ref_digest = await token_digest(srv, ref)
    ok, how = same_reply(a, ref, digests=(await token_digest(srv, a), ref_digest))
    check(ok, f"seed 11 beside another conversation = seed 11 alone ({how})")
    check(len(b.pcm) == want and b.text != a.text, "the other seed completes and differs")
    other_digest = await token_digest(srv, b)
    check(other_digest is not None and other_digest != ref_digest,
          f"its token digest differs too ({other_digest} vs {ref_digest})")

    # --- resume by session id ----------------------------------------------------------------------
    k = 20
    first = await converse(srv.url, pcm, params={"seed": 33}, frames=k)
    sid = (first.metadata or {}).get("session_id", "")
    check(len(first.pcm) == (k - delay) * FRAME, f"first part: {k} frames -> {len(first.pcm) // FRAME} reply frames")
    check(await srv.wait_log(f"session {sid[:8]} ended (client disconnected) at frame {k}, state saved"),
          f"disconnect saves the conversation at frame {k}")
    rest = pcm[k * FRAME:]
    second = await converse(srv.url, rest, params={"session_id": sid})
    md2 = second.metadata or {}
    check(md2.get("resumed") is True and md2.get("frame") == k and md2.get("session_id") == sid and md2.get("seed") == "33",
          f"resume: same id, frame {md2.get('frame')} (want {k}), seed {md2.get('seed')} restored")
    m = frames_of(rest)
    check(len(second.pcm) == m * FRAME,
          f"resumed conversation speaks from its first frame: {len(second.pcm) // FRAME} reply frames for {m} sent "
          f"(a new one would give {m - delay})")

    # --- malformed messages beside a good conversation -------------------------------------------
    async def faults():
        out = []
        soft = ["hello",                    # a text WebSocket frame
                b"",                        # no kind byte
                b"\x09abc",                 # unknown kind
                b"\x02hi",                  # client text
                b"\x04{}",                  # client metadata
                b"\x03\x09"]                # control byte out of range
        r = await converse(srv.url, pcm, params={"seed": 1}, frames=6, raw_messages=soft)
        out.append(("6 soft errors then audio on the same connection",
                    len(r.errors) == 6 and len(r.pcm) == (6 - delay) * FRAME and r.close_code == 1000, r))
        r = await converse(srv.url, pcm, frames=2, raw_messages=[b"\x01" + b"\x00" * (oversize + 1)])
        out.append(("oversize message: error + close 1008",
                    len(r.errors) == 1 and "exceeds the limit" in r.errors[0] and r.close_code == 1008, r))
        r = await converse(srv.url, pcm, frames=2, raw_messages=[b"\x01not an ogg stream at all"])
        out.append(("broken Ogg: error + close 1008",
                    len(r.errors) == 1 and "audio message" in r.errors[0] and r.close_code == 1008, r))
        good, bad = corrupt_stream()
        r = await converse(srv.url, pcm, frames=0, raw_messages=[b"\x01" + good, b"\x01" + bad])
        out.append(("corrupt page mid-stream: error + close 1008",
                    len(r.errors) == 1 and "audio message" in r.errors[0] and r.close_code == 1008, r))
        for q, want in [({"text_temperature": "abc"}, "invalid query parameter text_temperature"),
                        ({"audio_topk": "0"}, "invalid query parameter audio_topk"),
                        ({"seed": "-1"}, "invalid query parameter seed"),
                        ({"bogus": "1"}, "unknown query parameter 'bogus'"),
                        ({"session_id": "0" * 32}, "unknown session_id"),
                        ({"session_id": "..%2F..%2Fetc%2Fpasswd"}, "invalid query parameter session_id")]:
            r = await converse(srv.url, pcm, params=q, frames=2)
            out.append((f"query {q}: error + close",
                        r.kinds[:1] == [0] and len(r.errors) == 1 and want in r.errors[0] and r.metadata is None
                        and r.close_code in (1008, 1013), r))
        try:
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(srv.url.replace("/api/chat", "/api/other")):
                    ok = False
        except aiohttp.WSServerHandshakeError as e:
            ok = e.status == 404
        out.append(("WebSocket on another path: HTTP 404", ok, None))
        return out

    good, results = await asyncio.gather(converse(srv.url, pcm, params={"seed": 11}), faults())
    for what, ok, r in results:
        check(ok, what + ("" if r is None else f" ({r.errors[:2]}, close {r.close_code})"))
    ok, how = same_reply(good, ref, digests=(await token_digest(srv, good), ref_digest))
    check(ok, f"the conversation beside all the faults = the same conversation alone ({how}; {good.summary()}, "
              f"{good.errors[:2]})")

    # --- static files -----------------------------------------------------------------------------
    st, ct, body = await http_get(srv.port, "/")
    check(st == 200 and ct.startswith("text/html") and b"served-index" in body, f"GET / -> index.html ({st}, {ct})")
    st, ct, _ = await http_get(srv.port, "/app.js")
    check(st == 200 and ct.startswith("text/javascript"), f"GET /app.js -> {st} {ct}")
    for path in ["/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/.hidden", "/outside", "/missing.html",
                 "/api/chat"]:
        st, _, _ = await http_get(srv.port, path)
        check(st == 404, f"GET {path} -> {st} (want 404)")


async def scenario_limits(binary, pcm, ref_text, common):
    srv = Server(binary, "--max-sessions", "1", "--auth-token", "s3cret", *common, name="limits")
    try:
        r = await converse(srv.url, pcm, frames=2)
        check(len(r.errors) == 1 and "unauthorized" in r.errors[0] and r.close_code == 1008,
              f"no auth_token: refused ({r.errors}, close {r.close_code})")
        second = {}

        async def intruder(ws, res):
            second["r"] = await converse(srv.url, pcm, params={"auth_token": "s3cret"}, frames=2)

        first = await converse(srv.url, pcm, params={"seed": 11, "auth_token": "s3cret"}, before_send=intruder)
        b = second["r"]
        check(b.kinds[:1] == [0] and len(b.errors) == 1 and "server full" in b.errors[0] and b.close_code == 1013,
              f"--max-sessions 1: the second client gets kind 5 '{b.errors[:1]}' and close {b.close_code}")
        check(first.text == ref_text and not first.errors,
              "the first client continues undisturbed (its reply = the same seed alone)")
        print("limits:", first.summary())
    finally:
        rc = srv.stop()
    check(rc == 0, f"limits server exits 0 on SIGTERM (rc {rc})")


async def scenario_sigterm(binary, pcm, session_dir, common):
    srv = Server(binary, "--session-dir", session_dir, *common, name="sigterm")
    task = asyncio.create_task(converse(srv.url, pcm, params={"seed": 44}, realtime=True, quiet_s=5))
    await asyncio.sleep(1.5)
    t0 = time.monotonic()
    rc = await asyncio.get_running_loop().run_in_executor(None, srv.stop)
    r = await task
    sid = (r.metadata or {}).get("session_id", "")
    m = re.search(rf"session {sid[:8]} ended \(server shutting down\) at frame (\d+), state saved", srv.log())
    check(rc == 0, f"SIGTERM: exit status {rc} in {time.monotonic() - t0:.2f} s")
    check(r.close_code == 1001 and m is not None,
          f"SIGTERM: the live conversation is saved ({m.group(0) if m else 'no save line'}) and closed with 1001 "
          f"(got {r.close_code})")
    check(os.path.exists(os.path.join(session_dir, sid + ".conversation")), "its file is in --session-dir")
    check(any("status:" in l and "p99" in l for l in srv.lines), "status lines (live, tick p50/p99, dropped)")
    return sid, int(m.group(1)) if m else -1


async def scenario_tls(binary, pcm, ref_text, common, tmp):
    """--ssl-cert / --ssl-key: the same conversation over wss:// with a self-signed certificate; a
    plain ws:// client does not disturb it; a bad key file is one clear error at start."""
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                           "-days", "2", "-subj", "/CN=127.0.0.1"], capture_output=True, text=True)
    if made.returncode != 0:
        print(f"skipped TLS: openssl could not make a certificate ({made.stderr.strip()[:200]})")
        return
    bad = subprocess.run([binary, "serve", "--port", "0", "--ssl-cert", cert, "--ssl-key", cert], capture_output=True,
                         text=True, timeout=60)
    if "this build has no TLS" in bad.stderr:
        print("skipped TLS: ttt-moshi was built without OpenSSL (libssl-dev)")
        return
    check(bad.returncode == 1 and f"--ssl-key {cert}" in bad.stderr,
          f"a certificate given as the key: exit 1 naming it ({bad.stderr.strip().splitlines()[-1:]})")
    srv = Server(binary, "--ssl-cert", cert, "--ssl-key", key, *common, name="tls")
    try:
        check(any("listening on https://" in l for l in srv.lines), "TLS server says https")
        try:
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(srv.url):
                    plain = "connected"
        except Exception as e:  # noqa: BLE001: any failure of the plain handshake is the point
            plain = type(e).__name__
        r = await converse(srv.url.replace("ws://", "wss://"), pcm, params={"seed": 11}, ssl=False)
        print("tls:", r.summary())
        check(plain != "connected" and r.text == ref_text and not r.errors,
              f"wss:// with a self-signed certificate: the same reply as over ws:// (a plain client: {plain})")
    finally:
        rc = srv.stop()
    check(rc == 0, f"TLS server exits 0 on SIGTERM (rc {rc})")


async def run(args):
    pcm = read_wav(args.wav)
    cfg = json.load(open(args.config))
    delay = max(cfg["delays"])
    oversize = 64 * 1024
    common = ["--max-message-bytes", str(oversize)]
    with tempfile.TemporaryDirectory() as tmp:
        sessions = os.path.join(tmp, "sessions")
        web = os.path.join(tmp, "web")
        os.makedirs(web)
        with open(os.path.join(web, "index.html"), "w") as f:
            f.write("<!doctype html><title>served-index</title>\n")
        with open(os.path.join(web, "app.js"), "w") as f:
            f.write("console.log(1);\n")
        with open(os.path.join(web, ".hidden"), "w") as f:
            f.write("secret\n")
        os.symlink("/etc/passwd", os.path.join(web, "outside"))

        t0 = time.monotonic()
        sid, at = await scenario_sigterm(args.bin, pcm, sessions, common)
        srv = Server(args.bin, "--session-dir", sessions, "--max-sessions", "6", "--static-dir", web,
                     "--idle-timeout", str(IDLE), *common, name="main")
        try:
            if at > 0:
                r = await converse(srv.url, pcm[: 10 * FRAME], params={"session_id": sid})
                md = r.metadata or {}
                check(md.get("resumed") is True and md.get("frame") == at and len(r.pcm) == 10 * FRAME,
                      f"the SIGTERM-saved conversation resumes on a new server at frame {md.get('frame')} (want {at})")
            _, idle = await asyncio.gather(scenario_main(srv, pcm, delay, oversize),
                                           converse(srv.url, pcm, params={"seed": 9}, frames=3, quiet_s=60))
            sid = (idle.metadata or {}).get("session_id", "")
            check(idle.errors == [f"dropped: no message for {IDLE} s"] and idle.close_code == 1008 and
                  await srv.wait_log(f"session {sid[:8]} ended (client idle) at frame 3, state saved"),
                  f"a client silent for --idle-timeout {IDLE} s is dropped, state saved ({idle.errors}, close "
                  f"{idle.close_code})")
            ref = await converse(srv.url, pcm, params={"seed": 11})
        finally:
            rc = srv.stop()
        check(rc == 0, f"main server exits 0 on SIGTERM (rc {rc})")
        await scenario_limits(args.bin, pcm, ref.text, common)
        await scenario_tls(args.bin, pcm, ref.text, common, tmp)
        print(f"test_serve: {time.monotonic() - t0:.1f} s")
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
    args = ap.parse_args()
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
