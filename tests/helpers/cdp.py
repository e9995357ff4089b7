"""A small Chrome DevTools Protocol client for headless Chromium, over ``--remote-debugging-pipe``.

The pipe transport (JSON messages separated by NUL bytes on file descriptors 3 and 4) needs no
websocket library, no debugging port and no browser download: only Debian's ``chromium``.

    with Chromium.launch(tmp_path / "profile") as browser:
        page = browser.new_page(width=1280, height=900)
        page.goto("http://127.0.0.1:8000/")
        page.wait_for("document.readyState === 'complete'")
        page.screenshot(tmp_path / "page.png")
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
# Offline and quiet: no first-run UI, no background traffic to Google services.
DEFAULT_FLAGS = (
    "--headless",
    "--no-sandbox",  # tests run as root in containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-dev-shm-usage",
    "--autoplay-policy=no-user-gesture-required",
    "--mute-audio",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    for candidate in CHROMIUM_CANDIDATES:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.access(path, os.X_OK):
            return path
    return None


class CDPError(RuntimeError):
    pass


class Chromium:
    """One headless browser process and its DevTools pipe."""

    def __init__(self, process: subprocess.Popen[bytes], to_browser: int, from_browser: int):
        self.process = process
        self._write_fd = to_browser
        self._read_fd = from_browser
        self._next_id = 0
        self._lock = threading.Lock()
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._reader = threading.Thread(target=self._read_loop, name="cdp-reader", daemon=True)
        self._reader.start()

    @classmethod
    def launch(
        cls, user_data_dir: Path, *, binary: str | None = None, extra_flags: tuple[str, ...] = ()
    ) -> Chromium:
        binary = binary or find_chromium()
        if binary is None:
            raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
        user_data_dir.mkdir(parents=True, exist_ok=True)
        # Chromium reads commands on fd 3 and writes replies on fd 4; bash (not dash) can move
        # descriptors above 9 there, without a preexec_fn (unsafe with the server thread running).
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        args = [
            *DEFAULT_FLAGS,
            *extra_flags,
            f"--user-data-dir={user_data_dir}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        script = f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        with open(user_data_dir / "chromium.log", "wb") as log:
            process = subprocess.Popen(
                ["bash", "-c", script, binary, *args],
                pass_fds=(to_browser_r, from_browser_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        os.close(to_browser_r)
        os.close(from_browser_w)
        browser = cls(process, to_browser_w, from_browser_r)
        try:
            browser.call("Browser.getVersion", timeout=30)
        except Exception:
            browser.close()
            raise
        return browser

    # -- transport ------------------------------------------------------------------------

    def _read_loop(self) -> None:
        buffer = b""
        while True:
            try:
                data = os.read(self._read_fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            buffer += data
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                self._dispatch(json.loads(raw))
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(CDPError("the browser closed the DevTools pipe"))

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            future = self._pending.pop(message["id"], None)
            if future is None:
                return
            if "error" in message:
                future.set_exception(CDPError(f"{message['error'].get('message')}: {message['error']}"))
            else:
                future.set_result(message.get("result", {}))
            return
        for listener in list(self._listeners):
            listener(message)

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            self._next_id += 1
            message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
            if session_id:
                message["sessionId"] = session_id
            self._pending[self._next_id] = future
            os.write(self._write_fd, json.dumps(message).encode() + b"\0")
        return future.result(timeout)

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        self._listeners.append(listener)

    # -- pages ----------------------------------------------------------------------------

    def new_page(self, width: int = 1280, height: int = 900) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime"):
            page.call(f"{domain}.enable")
        page.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        return page

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(Exception):  # closing anyway
                self.call("Browser.close", timeout=5)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for fd in (self._write_fd, self._read_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Page:
    """One tab: navigation, script evaluation, real input events, screenshots, and the page's
    console output (kept for failure messages)."""

    def __init__(self, browser: Chromium, session_id: str):
        self.browser = browser
        self.session_id = session_id
        self.console: list[str] = []
        browser.add_listener(self._on_event)

    def _on_event(self, message: dict[str, Any]) -> None:
        if message.get("sessionId") != self.session_id:
            return
        params = message.get("params", {})
        if message.get("method") == "Runtime.consoleAPICalled":
            text = " ".join(
                str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])
            )
            self.console.append(f"console.{params.get('type')}: {text}")
        elif message.get("method") == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text")
            self.console.append(f"uncaught: {description}")

    def call(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        return self.browser.call(method, params, session_id=self.session_id, timeout=timeout)

    def goto(self, url: str) -> None:
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"cannot open {url}: {result['errorText']}")

    def evaluate(self, expression: str, *, await_promise: bool = True) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {
                "expression": expression,
                "returnByValue": True,
                "awaitPromise": await_promise,
                "userGesture": True,
            },
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(
                f"{expression!r} threw: {details.get('exception', {}).get('description') or details}"
            )
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.05) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expression)
            except CDPError:
                last = None  # the page is still navigating
            if last:
                return last
            time.sleep(interval)
        raise TimeoutError(
            f"waited {timeout:g} s for {expression!r} (last value {last!r}); console: {self.console[-10:]}"
        )

    def text(self, selector: str) -> str:
        return str(self.evaluate(f"document.querySelector({json.dumps(selector)}).textContent.trim()"))

    def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (what a person does, user activation included)."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}
            )

    def type_into(self, selector: str, text: str, *, replace: bool = True) -> None:
        """Focus a field and type ``text`` as keyboard input (fires input events)."""
        self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus();"
            f" if ({json.dumps(replace)}) e.select(); }})()"
        )
        if replace:
            self.call(
                "Input.dispatchKeyEvent",
                {"type": "keyDown", "key": "Backspace", "code": "Backspace", "windowsVirtualKeyCode": 8},
            )
            self.call(
                "Input.dispatchKeyEvent",
                {"type": "keyUp", "key": "Backspace", "code": "Backspace", "windowsVirtualKeyCode": 8},
            )
        self.call("Input.insertText", {"text": text})

    def set_files(self, selector: str, paths: list[Path]) -> None:
        """Choose files in an ``<input type=file>`` (as the file picker would), firing change."""
        root = self.call("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        node = self.call("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise CDPError(f"no element matches {selector!r}")
        self.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(p) for p in paths]})

    def screenshot(self, path: Path, *, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.call("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
            params["captureBeyondViewport"] = True
        data = self.call("Page.captureScreenshot", params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
