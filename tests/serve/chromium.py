"""Headless Chromium driven over the Chrome DevTools Protocol (CDP), for tests/serve/test_web.py.

Starts Debian's `chromium` with a fake microphone that plays a WAV file, opens one page and talks
to it over the DevTools WebSocket (aiohttp): evaluate JavaScript, click, read the console, take a
screenshot. Only the few CDP methods the test needs (Target.*, Page.*, Runtime.*).
"""
import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import tempfile

import aiohttp


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """One headless browser with one page. Use as `async with Chromium(exe, wav) as page:`."""

    def __init__(self, exe, wav, width=900, height=1000):
        self.exe, self.wav, self.size = exe, wav, (width, height)
        self.proc = None
        self.console = []          # console messages and exceptions of the page, as text
        self._next_id = 0
        self._pending = {}
        self._tmp = None

    async def __aenter__(self):
        self._tmp = tempfile.mkdtemp(prefix="ttt-chromium-")
        args = [
            self.exe, "--headless=new", "--remote-debugging-port=0",
            f"--user-data-dir={self._tmp}", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-sync",
            "--mute-audio", "--disable-gpu",
            "--disable-dev-shm-usage",  # containers often have a 64 MB /dev/shm
            f"--window-size={self.size[0]},{self.size[1]}",
            # The microphone: granted without a prompt, a fake device that plays the WAV.
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={self.wav}",
            # The reply plays without a click (the page's AudioContext starts at load).
            "--autoplay-policy=no-user-gesture-required",
            "about:blank",
        ]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = await asyncio.get_running_loop().run_in_executor(None, self._devtools_url)
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(url, max_msg_size=64 << 20)
        self._reader = asyncio.create_task(self._read())
        target = await self.call("Target.createTarget", url="about:blank")
        att = await self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        self._session = att["sessionId"]
        await self.send("Runtime.enable")
        await self.send("Page.enable")
        await self.send("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                        deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, *exc):
        try:
            self._reader.cancel()
            await self._ws.close()
            await self._http.close()
        finally:
            if self.proc and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _devtools_url(self):
        # Chromium prints "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID".
        lines = []
        for line in self.proc.stderr:
            lines.append(line.rstrip())
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                # Keep draining stderr so that Chromium never blocks on a full pipe.
                import threading
                threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
                return m.group(1)
        raise RuntimeError("chromium exited before its DevTools endpoint came up:\n" + "\n".join(lines[-20:]))

    async def _read(self):
        async for msg in self._ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                p = data["params"]
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
                self.console.append(f"console.{p['type']}: {text}")
            elif data.get("method") == "Runtime.exceptionThrown":
                d = data["params"]["exceptionDetails"]
                self.console.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))

    async def _request(self, method, session, params):
        self._next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = fut
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        await self._ws.send_str(json.dumps(msg))
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"CDP {method}: {reply['error']}")
        return reply["result"]

    async def call(self, method, **params):   # on the browser
        return await self._request(method, None, params)

    async def send(self, method, **params):   # on the page
        return await self._request(method, self._session, params)

    async def goto(self, url):
        await self.send("Page.navigate", url=url)
        # The page is ready when its script has defined window.tttStats.
        for _ in range(200):
            if await self.eval("typeof window.tttStats === 'object'"):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{url}: the page did not load (console: {self.console[-5:]})")

    async def eval(self, expression):
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"evaluating {expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def screenshot(self, path, selector=None, margin=16):
        """A PNG of the page, or of the element matching selector (plus a margin)."""
        params = {"format": "png"}
        if selector:
            box = await self.eval(f"(() => {{ const r = document.querySelector({selector!r}).getBoundingClientRect();"
                                  " return {x: r.x, y: r.y, w: r.width, h: r.height}; })()")
            params["clip"] = {"x": max(0, box["x"] - margin), "y": max(0, box["y"] - margin),
                              "width": box["w"] + 2 * margin, "height": box["h"] + 2 * margin, "scale": 1}
        r = await self.send("Page.captureScreenshot", **params)
        with open(path, "wb") as f:
            f.write(base64.b64decode(r["data"]))
