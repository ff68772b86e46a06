#!/usr/bin/env python3
"""Load benchmark of `ttt-moshi serve`: how many conversations stay real time.

For each client count N it starts `ttt-moshi serve --max-sessions N` (the extra server arguments
given here: the model, backend, dtype), connects N headless clients on loopback (tests/serve/
client.py: aiohttp + Kyutai's sphn, as moshi.client is), each streaming a WAV in real time (80 ms
per frame, the file looped to --seconds), spread over several processes so the clients' Opus
work never limits the server. It then reads the server's own status lines (tick time of every
frame tick, late ticks, dropped frames) for the windows in which all N were live, and each
client's reply (seconds of audio received against seconds sent).

  bench/serve_load.py --bin build/bin/ttt-moshi --clients 1,8,32 --seconds 20 -- \
      --config moshi7b.json --mimi-config mimi.json --backend cuda --dtype bf16

A count is real time when the tick p99 is <= 80 ms, no frame was dropped and no client was
dropped. Timing lives here, never in a test (docs/perf.md keeps the numbers).
"""
import argparse
import asyncio
import multiprocessing as mp
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "serve"))

STATUS = re.compile(r"serve: status: (\d+) live, (\d+) ticks \((\d+) in the last window: p50 ([\d.]+) ms, "
                    r"p99 ([\d.]+) ms\), (\d+) late \(> (\d+) ms\), (\d+) dropped frames, (\d+) clients dropped")


def client_worker(url, wav, seconds, count, stagger, seed0, q):
    """One process: `count` concurrent real-time clients; puts one tuple per client on q."""
    import numpy as np
    import client  # tests/serve/client.py

    pcm = client.read_wav(wav) if wav else np.zeros(client.RATE, dtype=np.float32)
    reps = int(seconds * client.RATE) // len(pcm) + 1
    pcm = np.tile(pcm, reps)[: int(seconds * client.RATE)]

    async def one(i):
        await asyncio.sleep(stagger * i / max(count, 1))
        try:
            r = await client.converse(url, pcm, params={"seed": seed0 + i}, realtime=True, quiet_s=2.0,
                                      timeout_s=seconds + 120)
            return (r.frames_sent * client.FRAME / client.RATE, len(r.pcm) / client.RATE, len(r.errors),
                    r.errors[:1], r.metadata is not None)
        except Exception as e:  # noqa: BLE001 -- reported, not hidden
            return (0.0, 0.0, 1, [repr(e)], False)

    async def all_():
        return await asyncio.gather(*(one(i) for i in range(count)))

    for res in asyncio.run(all_()):
        q.put(res)


def run_count(args, n, server_args):
    cmd = [args.bin, "serve", "--port", "0", "--max-sessions", str(n), "--status-every", str(args.status_every),
           "--idle-timeout", "60"] + server_args
    t_start = time.monotonic()
    srv = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines, port = [], None
    ready = threading.Event()

    def pump():
        nonlocal port
        for line in srv.stderr:
            lines.append(line.rstrip("\n"))
            m = re.search(r"listening on \w+://[^:]+:(\d+)", line)
            if m and port is None:
                port = int(m.group(1))
                ready.set()
        ready.set()

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    if not ready.wait(args.startup_timeout) or port is None:
        srv.kill()
        raise SystemExit("serve did not start:\n" + "\n".join(lines[-20:]))
    load_s = time.monotonic() - t_start
    url = f"ws://127.0.0.1:{port}/api/chat"
    procs = max(1, min(args.procs, n))
    q = mp.Queue()
    workers = []
    for p in range(procs):
        c = n // procs + (1 if p < n % procs else 0)
        w = mp.Process(target=client_worker, args=(url, args.wav, args.seconds, c, args.stagger, 1000 * p, q))
        w.start()
        workers.append(w)
    results = [q.get() for _ in range(n)]
    for w in workers:
        w.join()
    srv.send_signal(signal.SIGTERM)
    try:
        srv.wait(60)
    except subprocess.TimeoutExpired:
        srv.kill()
    th.join(5)

    windows = []
    for line in lines:
        m = STATUS.search(line)
        if m:
            windows.append(dict(live=int(m.group(1)), ticks=int(m.group(3)), p50=float(m.group(4)),
                                p99=float(m.group(5)), late=int(m.group(6)), dropped_frames=int(m.group(8)),
                                dropped_clients=int(m.group(9))))
    full = [w for w in windows if w["live"] == n and w["ticks"] > 0]
    last = windows[-1] if windows else dict(late=-1, dropped_frames=-1, dropped_clients=-1)
    sent = [r[0] for r in results]
    got = [r[1] for r in results]
    errors = [r[3][0] for r in results if r[2]]
    return dict(n=n, load_s=load_s, windows=len(full),
                p50=statistics.median([w["p50"] for w in full]) if full else float("nan"),
                p99=max([w["p99"] for w in full]) if full else float("nan"),
                late=last["late"], dropped_frames=last["dropped_frames"], dropped_clients=last["dropped_clients"],
                sent=statistics.mean(sent) if sent else 0, got_min=min(got) if got else 0, errors=errors,
                rc=srv.returncode, tail=lines[-3:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="the ttt-moshi binary")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    ap.add_argument("--seconds", type=float, default=20.0, help="audio each client streams")
    ap.add_argument("--wav", default=os.path.join(HERE, "..", "examples", "audio", "user.wav"))
    ap.add_argument("--procs", type=int, default=8, help="client processes")
    ap.add_argument("--stagger", type=float, default=2.0, help="seconds over which the clients join")
    ap.add_argument("--status-every", type=float, default=2.0)
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--tick-ms", type=float, default=80.0)
    ap.add_argument("server_args", nargs=argparse.REMAINDER, help="-- then the serve arguments")
    args = ap.parse_args()
    server_args = [a for a in args.server_args if a != "--"]
    print(f"serve load: {' '.join(server_args)}; {args.seconds:.0f} s of audio per client, real time", flush=True)
    print(f"{'clients':>7} {'tick p50':>9} {'tick p99':>9} {'late':>5} {'dropped fr':>10} {'dropped cl':>10} "
          f"{'reply/sent':>10} {'errors':>6}  real time?", flush=True)
    for n in [int(x) for x in args.clients.split(",")]:
        r = run_count(args, n, server_args)
        ok = (r["p99"] <= args.tick_ms and r["dropped_frames"] == 0 and r["dropped_clients"] == 0 and not r["errors"]
              and r["windows"] > 0)
        print(f"{n:>7} {r['p50']:>7.2f}ms {r['p99']:>7.2f}ms {r['late']:>5} {r['dropped_frames']:>10} "
              f"{r['dropped_clients']:>10} {r['got_min']:>4.1f}/{r['sent']:<5.1f} {len(r['errors']):>6}  "
              f"{'yes' if ok else 'no'}  (load {r['load_s']:.0f} s, {r['windows']} full windows, rc {r['rc']})",
              flush=True)
        for e in r["errors"][:3]:
            print(f"        client error: {e}", flush=True)
        if not r["windows"]:
            print("        server tail: " + " | ".join(r["tail"]), flush=True)


if __name__ == "__main__":
    main()
