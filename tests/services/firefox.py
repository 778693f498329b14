"""Headless Firefox driven over WebDriver BiDi, the protocol built into Firefox (no geckodriver,
which no package registry here ships): `firefox-esr --remote-debugging-port=0` says the
address it listens on, and a WebSocket there takes BiDi commands.

    with Firefox() as browser:
        browser.get("http://127.0.0.1:8000/")
        browser.wait_for("window.histream && histream.status === 'idle'")

Only what the web player's test needs: open a page, run a script, wait for an expression,
set a field, click, take a screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from websockets.sync.client import ClientConnection, connect

BINARY = "firefox-esr"  # Debian's package (make test installs it, with libavcodec for H.264)
PREFS = {
    "media.autoplay.default": 0,  # autoplay allowed, as Chromium's flag does for its test
    "media.autoplay.blocking_policy": 0,
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.enabled": False,
}


def available() -> str | None:
    """Why Firefox cannot run here, or None when it can."""
    if shutil.which(BINARY) is None:
        return f"no {BINARY} on PATH: the Firefox test needs Debian's firefox-esr (make browser)"
    return None


class Firefox:
    """A headless Firefox with a fresh profile; one browsing context."""

    def __init__(self, width: int = 1280, height: int = 900, start_timeout_s: float = 60.0):
        self.profile = Path(tempfile.mkdtemp(prefix="histream-firefox-"))
        prefs = "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in PREFS.items())
        (self.profile / "user.js").write_text(prefs)
        self.process = subprocess.Popen(
            [BINARY, "--headless", "--no-remote", "--remote-debugging-port=0",
             "-profile", str(self.profile), "--width", str(width), "--height", str(height)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.ids = itertools.count(1)
        self.exits = contextlib.ExitStack()  # the WebSocket, once open
        try:
            self.ws = self._connect(start_timeout_s)
            self.command("session.new", capabilities={})
            tree = self.command("browsingContext.getTree")
            self.context = tree["contexts"][0]["context"]
        except BaseException:
            self.close()
            raise

    def _connect(self, timeout_s: float) -> ClientConnection:
        """Reads the BiDi address from Firefox's stderr ("WebDriver BiDi listening on ..."); a
        thread reads all of it, so that Firefox never blocks writing there."""
        lines: queue.Queue[str] = queue.Queue()
        stderr = self.process.stderr
        assert stderr is not None
        threading.Thread(target=lambda: [lines.put(line) for line in stderr], daemon=True).start()
        deadline, seen = time.monotonic() + timeout_s, []
        while (left := deadline - time.monotonic()) > 0:
            try:
                seen.append(lines.get(timeout=left))
            except queue.Empty:
                break
            found = re.search(r"WebDriver BiDi listening on (ws://\S+)", seen[-1])
            if found:
                address = f"{found.group(1)}/session"
                return self.exits.enter_context(connect(address, max_size=64 * 2**20))
        tail = "".join(seen)[-2000:]
        raise RuntimeError(f"Firefox did not say where it listens in {timeout_s:g} s: {tail}")

    def command(self, method: str, **params) -> dict:
        """One BiDi command; its result (events in between are skipped)."""
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=120))
            if message.get("id") != n:
                continue
            if message.get("type") == "error":
                raise RuntimeError(f"{method}: {message.get('error')}: {message.get('message')}")
            return message["result"]

    def get(self, url: str) -> None:
        self.command("browsingContext.navigate", context=self.context, url=url, wait="complete")

    def run(self, expression: str):
        """The value of a JavaScript expression (awaited if a promise), through JSON: a DOM
        element reads as {}, falsy here, so ask for one of its properties."""
        result = self.command(
            "script.evaluate",
            expression=f"(async () => JSON.stringify(await ({expression}) ?? null))()",
            target={"context": self.context},
            awaitPromise=True,
        )
        if result["type"] == "exception":
            details = result["exceptionDetails"]
            raise RuntimeError(f"{expression}: {details.get('text')}")
        return json.loads(result["result"]["value"])

    def wait_for(self, expression: str, timeout: float = 90.0):
        """Waits until `expression` is truthy and returns its value; on a timeout, says what
        the page's `histream` state was."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.run(expression)
            if value:
                return value
            time.sleep(0.1)
        state = json.dumps(self.run("window.histream"))
        raise TimeoutError(f"the page never showed {expression}; its state: {state[:2000]}")

    def fill(self, field: str, value: str) -> None:
        """Sets a field's value as typing would (an `input` event follows)."""
        self.run(
            f"(() => {{ const e = document.getElementById({json.dumps(field)}); "
            f"e.value = {json.dumps(value)}; "
            "e.dispatchEvent(new Event('input', {bubbles: true})); return true; })()"
        )

    def click(self, element_id: str) -> None:
        self.run(f"document.getElementById({json.dumps(element_id)}).click()")

    def screenshot(self) -> bytes:
        shot = self.command("browsingContext.captureScreenshot", context=self.context)
        return base64.b64decode(shot["data"])

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            with contextlib.suppress(Exception):  # it may be gone already
                self.command("session.end")
        self.exits.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Firefox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
