#!/usr/bin/env python3
"""A minimal W3C WebDriver client for headless Chromium, standard library only.

    from webdriver import Chrome
    with Chrome(log_path="/tmp/chromedriver.log") as browser:
        browser.get("https://127.0.0.1:3263/")
        browser.click("#login")
        browser.wait_for(lambda: "Volumes" in browser.page_text(), 10)
        browser.screenshot("/tmp/ui.png")

Chrome() starts chromedriver (CHROMEDRIVER, default /usr/bin/chromedriver) on
a free localhost port and opens a session in headless Chromium (CHROMIUM,
default /usr/bin/chromium) that accepts self-signed certificates and runs as
root (--no-sandbox). Selectors are CSS; elements are WebDriver element ids.
A failed WebDriver command raises WebDriverError carrying the driver's error
code and message.

    python3 scripts/webdriver.py --self-test    # drives a local test page
"""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROME_ARGS = [
    "--headless=new",
    "--no-sandbox",  # Chromium refuses to start as root with its sandbox
    "--disable-gpu",
    "--ignore-certificate-errors",
    "--window-size=1400,1000",
]
# The key under which WebDriver wraps an element reference.
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

# Talk to chromedriver directly even when http_proxy is set.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class WebDriverError(Exception):
    """A WebDriver command failed: error is the W3C error code
    ("no such element", "javascript error", ...), message the driver's text."""

    def __init__(self, error, message, status=None):
        super().__init__("%s: %s" % (error, message))
        self.error = error
        self.message = message
        self.status = status


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Chrome:
    def __init__(self, port=None, log_path=None, args=(), startup_timeout=30,
                 command_timeout=60):
        """port: chromedriver's port (default: a free one); log_path: file
        that gets chromedriver's output (default: a new /tmp/chromedriver-*.log);
        args: extra Chromium flags."""
        self.port = port or free_port()
        self.base = "http://127.0.0.1:%d" % self.port
        self.command_timeout = command_timeout
        self.session = None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="chromedriver-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        # Its own process group, so quit() can also reap a browser left behind.
        self.proc = subprocess.Popen(
            [CHROMEDRIVER, "--port=%d" % self.port],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            self._wait_ready(startup_timeout)
            caps = {
                "browserName": "chrome",
                "acceptInsecureCerts": True,
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": CHROME_ARGS + list(args),
                },
            }
            value = self._request("POST", "/session",
                                  {"capabilities": {"alwaysMatch": caps}})
            self.session = value["sessionId"]
        except BaseException:
            self.quit()
            raise

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("chromedriver exited with status %s; log %s:\n%s"
                                   % (self.proc.returncode, self.log_path, self._log_tail()))
            try:
                if self._request("GET", "/status", timeout=2).get("ready"):
                    return
            except (OSError, WebDriverError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("chromedriver not ready on port %d after %ss; log %s:\n%s"
                                   % (self.port, timeout, self.log_path, self._log_tail()))
            time.sleep(0.05)

    def _log_tail(self, lines=20):
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def _request(self, method, path, body=None, timeout=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json; charset=utf-8")
        try:
            with _opener.open(req, timeout=timeout or self.command_timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                value = json.loads(payload)["value"]
                raise WebDriverError(value.get("error", "unknown error"),
                                     value.get("message", ""), e.code) from None
            except (ValueError, KeyError, TypeError, AttributeError):
                raise WebDriverError("unknown error", "HTTP %d: %s"
                                     % (e.code, payload[:500].decode(errors="replace")),
                                     e.code) from None
        return json.loads(payload).get("value") if payload else None

    def _cmd(self, method, path, body=None):
        if self.session is None:
            raise WebDriverError("invalid session id", "the session is closed")
        return self._request(method, "/session/%s%s" % (self.session, path), body)

    # Navigation

    def get(self, url):
        self._cmd("POST", "/url", {"url": url})

    def current_url(self):
        return self._cmd("GET", "/url")

    # Elements

    def find(self, css):
        """The id of the first element matching css, or None."""
        try:
            return self._cmd("POST", "/element",
                             {"using": "css selector", "value": css})[ELEMENT]
        except WebDriverError as e:
            if e.error == "no such element":
                return None
            raise

    def find_all(self, css):
        found = self._cmd("POST", "/elements", {"using": "css selector", "value": css})
        return [el[ELEMENT] for el in found]

    def _element(self, css):
        el = self.find(css)
        if el is None:
            raise WebDriverError("no such element", "no element matches %r" % css)
        return el

    def text(self, css):
        """The rendered text of the first element matching css, '' if none."""
        el = self.find(css)
        if el is None:
            return ""
        try:
            return self._cmd("GET", "/element/%s/text" % el)
        except WebDriverError as e:
            if e.error == "stale element reference":  # replaced meanwhile
                return ""
            raise

    def page_text(self):
        return self.text("body")

    def click(self, css):
        self._cmd("POST", "/element/%s/click" % self._element(css), {})

    def type(self, css, text, clear=False):
        el = self._element(css)
        if clear:
            self._cmd("POST", "/element/%s/clear" % el, {})
        self._cmd("POST", "/element/%s/value" % el, {"text": text})

    # Scripts and screenshots

    def execute(self, js, *args):
        """Runs js as a function body (use `return`, `arguments[i]`)."""
        return self._cmd("POST", "/execute/sync", {"script": js, "args": list(args)})

    def screenshot(self, path):
        png = base64.b64decode(self._cmd("GET", "/screenshot"))
        with open(path, "wb") as f:
            f.write(png)
        return path

    # Waiting

    def wait_for(self, pred, timeout=10, interval=0.1, message=None):
        """Calls pred until it returns something true; returns the seconds
        waited. WebDriver errors inside pred count as "not yet" (a page being
        replaced). Raises TimeoutError after timeout seconds."""
        start = time.monotonic()
        last_error = None
        while True:
            try:
                if pred():
                    return time.monotonic() - start
            except WebDriverError as e:
                last_error = e
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                what = message or getattr(pred, "__name__", "condition")
                extra = " (last error: %s)" % last_error if last_error else ""
                raise TimeoutError("%s not met after %.1fs%s" % (what, elapsed, extra))
            time.sleep(interval)

    # Shutdown

    def quit(self):
        if self.session is not None:
            try:
                self._request("DELETE", "/session/%s" % self.session, timeout=15)
            except (OSError, WebDriverError):
                pass
            self.session = None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # A browser chromedriver could not close stays in its process group.
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        if not self._log.closed:
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.quit()
        return False


# Self-test: python3 scripts/webdriver.py --self-test

_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>webdriver self-test</title></head>
<body>
<h1>Self-test</h1>
<p id="status">waiting</p>
<form action="/result" method="get">
  <input id="name" name="name" value="">
  <button id="go" type="button">Greet</button>
  <button id="submit" type="submit">Submit</button>
</form>
<script>
document.getElementById("go").addEventListener("click", function () {
  var name = document.getElementById("name").value;
  setTimeout(function () {
    document.getElementById("status").textContent = "hello, " + name;
  }, 150);
});
</script>
</body></html>
"""


def _self_test():
    import http.server
    import threading
    import urllib.parse

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/":
                body = _PAGE
            elif url.path == "/result":
                name = urllib.parse.parse_qs(url.query).get("name", [""])[0]
                body = ("<!doctype html><p id=result>submitted %s</p>"
                        % name.replace("<", "&lt;")).encode()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = "http://127.0.0.1:%d/" % server.server_address[1]
    shot = "/tmp/webdriver-selftest.png"
    LOG = "/tmp/webdriver-selftest-chromedriver.log"

    t0 = time.monotonic()
    last = [t0]

    def step(what):
        now = time.monotonic()
        print("  %-44s %7.3fs" % (what, now - last[0]), flush=True)
        last[0] = now

    def check(cond, what):
        if not cond:
            raise AssertionError(what)

    print("webdriver self-test against %s" % url, flush=True)
    if os.path.exists(LOG):
        os.remove(LOG)
    browser = Chrome(log_path=LOG)
    step("start chromedriver + session")
    driver_pid = browser.proc.pid
    with browser:
        browser.get(url)
        step("load page")
        check(browser.text("#status") == "waiting", "initial status text")
        check("Self-test" in browser.page_text(), "page_text has the heading")
        check(browser.find("#missing") is None, "find() of a missing element")
        check(browser.text("#missing") == "", "text() of a missing element")
        check(len(browser.find_all("button")) == 2, "find_all() finds both buttons")
        step("read texts, find, find_all")
        browser.type("#name", "bulwark")
        browser.click("#go")
        waited = browser.wait_for(lambda: browser.text("#status") == "hello, bulwark", 5)
        step("type + click, text changed (waited %.3fs)" % waited)
        check(browser.execute("return document.title") == "webdriver self-test", "title")
        check(browser.execute("return arguments[0] + arguments[1]", 2, 3) == 5, "script args")
        try:
            browser.execute("throw new Error('boom')")
            raise AssertionError("a throwing script raised nothing")
        except WebDriverError as e:
            check(e.error == "javascript error" and "boom" in e.message,
                  "script error carries the message: %s" % e)
        try:
            browser.click("#missing")
            raise AssertionError("click() on a missing element raised nothing")
        except WebDriverError as e:
            check(e.error == "no such element", "click error: %s" % e)
        step("execute, errors")
        try:
            browser.wait_for(lambda: False, 0.3, message="never")
            raise AssertionError("wait_for did not time out")
        except TimeoutError as e:
            check("never" in str(e), "timeout message: %s" % e)
        step("wait_for timeout")
        browser.screenshot(shot)
        with open(shot, "rb") as f:
            head = f.read(24)
        check(head[:8] == b"\x89PNG\r\n\x1a\n", "screenshot is a PNG")
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        step("screenshot %s (%dx%d, %d bytes)" % (shot, width, height, os.path.getsize(shot)))
        browser.type("#name", " & co", clear=False)
        browser.click("#submit")
        browser.wait_for(lambda: "/result" in browser.current_url(), 5)
        check(browser.text("#result") == "submitted bulwark & co", "form submitted")
        step("submit form, navigate (%s)" % browser.current_url().replace(url, "/"))
    check(browser.proc.returncode is not None, "chromedriver exited")
    step("quit (chromedriver pid %d exited %s)" % (driver_pid, browser.proc.returncode))
    server.shutdown()
    print("ok: self-test passed in %.2fs (chromedriver log %s)"
          % (time.monotonic() - t0, browser.log_path))


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        try:
            _self_test()
        except (AssertionError, WebDriverError, TimeoutError, RuntimeError, OSError) as e:
            print("FAILED: %s: %s" % (type(e).__name__, e), file=sys.stderr)
            sys.exit(1)
    else:
        print(__doc__.strip())
        sys.exit(0 if sys.argv[1:] in ([], ["-h"], ["--help"]) else 2)
