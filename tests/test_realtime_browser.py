"""The browser page ``GET /`` in a real headless Chromium, talking to a real uvicorn server
(embedded default model) over ``/v1/realtime``: Chromium's fake microphone plays an espeak-ng
recording, the page's AudioWorklet streams it as ``input_audio_buffer.append``, the server's VAD
detects the utterance, commits it and answers in speech, which the page schedules for playback. The
test drives the page over the Chrome DevTools Protocol and reads ``window.omniRealtime``. The
protocol itself is tested with the ``openai`` client in test_realtime.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import wave

import httpx
import numpy as np
import pytest

from test_serve import KEY, LIMITS, server  # noqa: F401  (fixture)

SERVER_LIMITS = {**LIMITS, "max_prompt_tokens": 512}  # a spoken conversation in the engine's rows

INSTALL = "apt-get install chromium espeak-ng"
# the events the page must see, in this order (other events come in between)
ORDER = ["session.created", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
         "input_audio_buffer.committed", "response.created", "response.output_audio.delta", "response.done"]


def tools() -> tuple[str, str]:
    chromium, espeak = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("espeak-ng")
    if not os.access(chromium, os.X_OK) or espeak is None:
        pytest.fail(f"this test needs Chromium and espeak-ng: {INSTALL}", pytrace=False)
    return chromium, espeak


def speech_wav(espeak: str, path, text: str = "Hello there. How are you today?") -> float:
    """An espeak-ng utterance with 1 s of silence before and 1.5 s after (16-bit mono); its length in s."""
    raw = path.with_name("espeak.wav")
    subprocess.run([espeak, "-w", str(raw), text], check=True, capture_output=True, timeout=60)
    with wave.open(str(raw)) as w:
        rate, x = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2")
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
    assert np.abs(x.astype(np.float32)).max() > 3000, "espeak-ng wrote a silent file"
    y = np.concatenate([np.zeros(rate, "<i2"), x, np.zeros(rate * 3 // 2, "<i2")])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(y.tobytes())
    return len(y) / rate


class Cdp:
    """A minimal Chrome DevTools Protocol client on one page target."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.next_id = 0
        self.console: list[str] = []  # console messages and uncaught exceptions of the page

    def call(self, method: str, timeout: float = 30, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(deadline - time.time(), 0.01)))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise AssertionError(f"CDP {method}: {msg['error']}")
                return msg["result"]
            if msg.get("method") == "Runtime.consoleAPICalled":
                p = msg["params"]
                self.console.append(p["type"] + ": " + " ".join(str(a.get("value", a.get("description", "")))
                                                                 for a in p["args"]))
            elif msg.get("method") == "Runtime.exceptionThrown":
                d = msg["params"]["exceptionDetails"]
                self.console.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))

    def eval(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"page: {expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self):
        self.ws.close()


def launch(chromium: str, wav, profile, url: str) -> subprocess.Popen:
    """Headless Chromium whose microphone plays ``wav`` once (``%noloop``: a looping file would speak
    again while the answer is generated, and that barge-in would cancel the response), its own
    process group."""
    args = [chromium, "--headless=new", "--no-sandbox", "--no-first-run", "--disable-gpu",
            "--disable-extensions", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}%noloop", "--autoplay-policy=no-user-gesture-required",
            "--remote-debugging-port=0", f"--user-data-dir={profile}", url]
    with open(profile / "chromium.log", "wb") as log:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)


def page_target(proc: subprocess.Popen, profile, server_url: str, timeout: float = 60) -> str:
    """The page's webSocketDebuggerUrl, once Chromium has written DevToolsActivePort and opened the page."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"Chromium exited with {proc.returncode}: {log_tail(profile)}"
        if port_file.exists() and port_file.read_text().strip():
            port = int(port_file.read_text().split()[0])
            try:
                pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json", timeout=5).json()
                         if t.get("type") == "page" and t.get("url", "").startswith(server_url)]
            except httpx.HTTPError:
                pages = []
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.2)
    raise AssertionError(f"Chromium opened no DevTools page within {timeout} s: {log_tail(profile)}")


def log_tail(profile) -> str:
    try:
        return (profile / "chromium.log").read_text("utf-8", "replace")[-2000:]
    except OSError:
        return ""


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the browser and its child processes (its own group)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def subsequence(want: list[str], got: list[str]) -> bool:
    it = iter(got)
    return all(w in it for w in want)


def test_browser_page_talks(server, tmp_path):
    chromium, espeak = tools()
    wav = tmp_path / "speech.wav"
    assert speech_wav(espeak, wav) > 2.5
    profile = tmp_path / "profile"
    profile.mkdir()
    # not ?autostart: the server wants a key, which the test types into the page's field before Start
    # (the page takes it from the field only: a key in the URL would land in logs and history)
    proc = launch(chromium, wav, profile, server["url"] + "/")
    cdp = None
    try:
        cdp = Cdp(page_target(proc, profile, server["url"]))
        cdp.call("Runtime.enable")
        deadline = time.time() + 60
        while not cdp.eval("document.readyState === 'complete' && !!window.omniRealtime"):
            assert time.time() < deadline, "the page did not load"
            time.sleep(0.1)
        cdp.eval(f"document.getElementById('key').value = {json.dumps(KEY)}; "
                 "document.getElementById('start').click(); true")
        deadline = time.time() + 240
        while True:
            st = cdp.eval("JSON.parse(JSON.stringify(window.omniRealtime))")
            if st["transcripts"] or st["errors"] or (not st["open"] and "session.created" in st["events"]):
                break
            assert time.time() < deadline, f"no response within 240 s: {st}; console: {cdp.console}"
            time.sleep(0.25)
    finally:
        if cdp is not None:
            cdp.close()
        kill(proc)
    why = f"state: {st}; console: {cdp.console}"
    assert st["errors"] == [], why
    assert subsequence(ORDER, st["events"]), why
    assert st["userItems"] >= 1, why
    assert st["samplesSent"] > 24000, why  # at least 1 s of microphone audio went up
    assert st["samplesReceived"] > 0, why  # speech came back and was scheduled for playback
    assert st["transcripts"][0]["status"] in ("completed", "incomplete", "cancelled"), why
    assert isinstance(st["transcripts"][0]["text"], str), why
    assert httpx.get(server["url"] + "/health", timeout=30).status_code == 200
