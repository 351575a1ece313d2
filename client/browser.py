"""A real browser as a WHIP client: headless Chromium in a lab namespace, driven through playwright.

The aiortc probe shows the relay works with *a* WebRTC stack; browsers are what
clients run, with their own ICE (consent every few seconds, backup pairs,
restarts), so the tests also call through Debian's ``chromium``.  Playwright
(the Python package, which talks to the browser over a pipe) runs in the
caller's namespace and starts Chromium under a wrapper command (the lab's
``nsenter --net=...``), so only the browser lives in the client's network: its UDP sockets and its fetch() to the
WHIP endpoint leave from there.  No browser is ever downloaded:
``executable_path`` is the distribution's binary.

The page (``browser_call.js``, served at ``http://localhost/`` by playwright's
router, a secure context so getUserMedia works) captures Chromium's fake audio
device playing a WAV tone we write, and samples getStats() every 100 ms.  From
those samples ``audio_gap`` tells when audio stopped and came back after a
moment the caller marked (a relay killed, an address moved, an ICE restart):
the failover-gap measurement the tests and the bench share.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import struct
import tempfile
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from splitrelay.errors import SplitrelayError

CHROMIUM = os.environ.get("SPLITRELAY_CHROMIUM", "/usr/bin/chromium")
PAGE_JS = Path(__file__).with_name("browser_call.js")
ORIGIN = "http://localhost"    # localhost is a secure context: getUserMedia needs one
TONE_HZ = 1000.0               # what the fake microphone plays; the echo must carry it back
TONE_SECONDS = 2.0             # whole periods: Chromium loops the file without a click
SAMPLE_RATE = 48000
MIN_LEVEL = 0.01               # -40 dBFS: audioLevel below this counts as silence (the tone is at -6 dBFS)
PEAK_TOLERANCE_HZ = 30.0       # 2.5 FFT bins of the page's analyser (4096 points at 48 kHz)
LAUNCH_TIMEOUT = 60.0          # Chromium starts in ~4 s on a quiet machine; 2 busy cores take longer
CALL_TIMEOUT = 30.0


class BrowserError(SplitrelayError):
    """The browser could not be started or its call failed (one-line reason)."""


def unavailable_reason() -> str | None:
    """Why a browser cannot be driven here (None when it can): the tests skip with this line."""
    if not Path(CHROMIUM).exists():
        return f"no {CHROMIUM} (apt-get install chromium; scripts/setup.sh does it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "no Python playwright (pip install -e '.[browser]'; scripts/setup.sh does it)"
    return None


def write_tone_wav(path: Path, hz: float = TONE_HZ, seconds: float = TONE_SECONDS, amplitude: float = 0.5) -> Path:
    """A mono 16-bit WAV of a steady tone for --use-file-for-fake-audio-capture."""
    count = int(SAMPLE_RATE * seconds)
    peak = int(32767 * amplitude)
    frames = b"".join(struct.pack("<h", round(peak * math.sin(2 * math.pi * hz * i / SAMPLE_RATE)))
                      for i in range(count))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(frames)
    return path


# -- judging samples (pure: the same code reads a live page and a bench's saved samples) ---------

def audio_flowing(before: dict, after: dict, min_level: float = MIN_LEVEL) -> bool:
    """Audio flowed between two samples: new packets arrived and they carried sound, not silence.

    totalAudioEnergy grows by level² per second of audio played out; the transceiver sends
    silence when it has nothing to echo, and concealment plays on without packets, so both
    counters must move.
    """
    seconds = (after["t"] - before["t"]) / 1000
    if seconds <= 0 or after["inPackets"] <= before["inPackets"]:
        return False
    return (after["inEnergy"] - before["inEnergy"]) / seconds >= min_level ** 2


def flowing_since(samples: list[dict]) -> float | None:
    """The time (page ms) since which audio has flowed without a break, None if it is not flowing now."""
    start = None
    for before, after in pairwise(samples):
        if audio_flowing(before, after):
            start = before["t"] if start is None else start
        else:
            start = None
    return start


@dataclass
class AudioGap:
    """What happened to the audio after a marked moment (times in seconds from the mark)."""
    stopped_after: float | None   # first sample interval without audio; None: it never stopped
    flowing_after: float | None   # audio flowing again (end of the gap); None: not (yet)

    @property
    def gap(self) -> float | None:
        """The failover gap: mark until audio flows again (0.0 when it never stopped)."""
        return 0.0 if self.stopped_after is None else self.flowing_after


def stopped_at(samples: list[dict], mark: float) -> float | None:
    """The start (page ms) of the first sample interval after ``mark`` without audio, or None."""
    after = [s for s in samples if s["t"] >= mark]
    for before, now in pairwise(after):
        if not audio_flowing(before, now):
            return before["t"]
    return None


def audio_gap(samples: list[dict], mark: float, settle: float = 2.0) -> AudioGap | None:
    """Judge the audio after ``mark`` (page ms): None while undecided.

    Decided when audio stopped and then flowed again, or when it flowed for ``settle``
    seconds after the mark without a break (gap 0).  The resolution is the page's
    100 ms sampling interval.
    """
    stopped = stopped_at(samples, mark)
    if stopped is None:
        last = samples[-1]["t"] if samples else mark
        return AudioGap(None, 0.0) if (last - mark) / 1000 >= settle else None
    after = [s for s in samples if s["t"] >= stopped]
    for before, now in pairwise(after):
        if audio_flowing(before, now):
            return AudioGap((stopped - mark) / 1000, (now["t"] - mark) / 1000)
    return None


# -- the browser -----------------------------------------------------------------------------

class Browser:
    """Headless Chromium (a context manager); ``call()`` opens a page with one WHIP call.

    ``wrapper`` is the command Chromium runs under, e.g. the lab's ``nsenter_argv(netns, [])``
    (``nsenter --net=... --``), which puts the browser, and so its media and its fetch(), in that
    network namespace.
    """

    def __init__(self, wrapper: list[str] | None = None, extra_args: list[str] | None = None,
                 tone_hz: float = TONE_HZ, capture_wav: Path | None = None) -> None:
        self.wrapper = wrapper or []
        self.extra_args = extra_args or []
        self.tone_hz = tone_hz
        self.capture_wav = capture_wav  # what the fake microphone plays (looped) instead of the tone
        self._workdir: Path | None = None
        self._playwright: Any = None
        self._browser: Any = None

    def __enter__(self) -> Browser:
        reason = unavailable_reason()
        if reason:
            raise BrowserError(reason)
        from playwright.sync_api import Error, sync_playwright

        self._workdir = Path(tempfile.mkdtemp(prefix="splitrelay-browser-"))
        wav = self.capture_wav or write_tone_wav(self._workdir / "tone.wav", self.tone_hz)
        launcher = self._workdir / "chromium"   # playwright takes one executable: the wrapper, then Chromium
        launcher.write_text("#!/bin/sh\nexec " + shlex.join([*self.wrapper, CHROMIUM]) + ' "$@"\n')
        launcher.chmod(0o755)
        args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
                "--disable-features=WebRtcHideLocalIpsWithMdns", "--disable-gpu", *self.extra_args]
        if os.geteuid() == 0:
            args.append("--no-sandbox")   # Chromium refuses to run its sandbox as root
        try:
            self._playwright = sync_playwright().start()
            self._browser = self._playwright.chromium.launch(
                executable_path=str(launcher), args=args, headless=True, timeout=LAUNCH_TIMEOUT * 1000)
        except Error as exc:
            self.close()
            raise BrowserError(f"chromium did not start (under {shlex.join(self.wrapper) or 'no wrapper'}): "
                               f"{_first_line(exc)}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the browser (its processes end with it) and remove the work files; idempotent."""
        browser, driver, self._browser, self._playwright = self._browser, self._playwright, None, None
        try:
            if browser is not None:
                browser.close()
        finally:
            try:
                if driver is not None:
                    driver.stop()     # ends the playwright driver, which kills a browser still running
            finally:
                if self._workdir is not None:
                    shutil.rmtree(self._workdir, ignore_errors=True)
                    self._workdir = None

    def call(self, whip_url: str, timeout: float = CALL_TIMEOUT, token: str | None = None) -> BrowserCall:
        """A new page that POSTs its offer to ``whip_url`` (with ``token`` as its bearer token); returns
        once the answer is applied."""
        if self._browser is None:
            raise BrowserError("the browser is not running (use it as a context manager)")
        # what a user grants at the prompts: the microphone, and a public page (ours is served by
        # playwright, so Chromium places it in the public address space) reaching the lab's private WHIP
        context = self._browser.new_context(permissions=["microphone", "local-network-access"])
        page = context.new_page()
        page.route(f"{ORIGIN}/**", _serve_page)
        page.goto(f"{ORIGIN}/")
        call = BrowserCall(page, self.tone_hz)
        call.whip = call.invoke("start", whip_url, token, timeout=timeout)
        return call


def _serve_page(route: Any) -> None:
    if route.request.url.endswith("/call.js"):
        route.fulfill(status=200, content_type="text/javascript", body=PAGE_JS.read_text())
    else:
        route.fulfill(status=200, content_type="text/html",
                      body='<!doctype html><audio id="remote" autoplay></audio><script src="/call.js"></script>')


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class BrowserCall:
    """One page's WHIP call: read its samples, wait for audio, mark moments, restart ICE, hang up."""

    def __init__(self, page: Any, tone_hz: float) -> None:
        self.page = page
        self.tone_hz = tone_hz
        self.whip: dict = {}
        self.console: list[str] = []
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))

    def invoke(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        """``await window.splitrelay[method](...args)`` in the page, bounded by ``timeout`` seconds."""
        from playwright.sync_api import Error

        script = """async ([method, args, ms]) => Promise.race([window.splitrelay[method](...args),
            new Promise((_, fail) => setTimeout(() => fail(new Error(`${method} took over ${ms} ms`)), ms))])"""
        try:
            return self.page.evaluate(script, [method, list(args), int(timeout * 1000)])
        except Error as exc:
            raise BrowserError(f"browser {method}: {_first_line(exc)}") from None

    def now(self) -> float:
        """The page's clock (ms): marks for ``audio_gap`` come from here."""
        return self.invoke("now")

    def samples(self, since: float = 0.0) -> list[dict]:
        return self.invoke("samples", since)

    def events(self, since: float = 0.0) -> list[dict]:
        return self.invoke("events", since)

    def levels(self, since: float = 0.0) -> list[dict]:
        """When the caller's outgoing audio and the audio the page plays crossed -40 dBFS: {t, which, loud}."""
        return self.invoke("levels", since)

    def latest(self) -> dict | None:
        samples = self.samples(self.now() - 1000)
        return samples[-1] if samples else None

    def _wait(self, judge, timeout: float, what: str):  # noqa: ANN001, ANN202
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = judge()
            if value is not None and value is not False:
                return value
            self.page.wait_for_timeout(100)    # the page samples every 100 ms
        last = self.latest()
        raise BrowserError(f"timed out after {timeout} s waiting for {what}; last sample {last}; "
                           f"events {[(e['what'], e['value']) for e in self.events()][-6:]}")

    def wait_audio(self, seconds: float = 1.0, timeout: float = CALL_TIMEOUT) -> dict:
        """Wait until the echo has been heard for ``seconds`` without a break; returns the last sample."""
        def judge() -> dict | None:
            samples = self.samples(self.now() - (seconds + 1) * 1000)
            start = flowing_since(samples)
            return samples[-1] if start is not None and samples[-1]["t"] - start >= seconds * 1000 else None
        return self._wait(judge, timeout, f"{seconds} s of audio coming back")

    def wait_silence(self, mark: float, timeout: float) -> float:
        """Wait until the audio stops after ``mark``; returns when (page ms)."""
        return self._wait(lambda: stopped_at(self.samples(mark), mark), timeout, "the audio to stop")

    def wait_gap(self, mark: float, timeout: float, settle: float = 2.0) -> AudioGap:
        """Wait until the audio after ``mark`` (from ``now()``) is judged: the failover-gap hook."""
        return self._wait(lambda: audio_gap(self.samples(mark), mark, settle), timeout,
                          "audio to flow again after the mark")

    def measure_gap(self, fault: Callable[[], object], timeout: float = 30.0, settle: float = 2.0) -> AudioGap:
        """The failover-gap hook: mark the page's clock, cause ``fault()`` (kill a relay, move an
        address, restart ICE), and wait until audio flows again; a bench repeats it for median and worst."""
        mark = self.now()
        fault()
        return self.wait_gap(mark, timeout, settle)

    def wait_pair(self, predicate: Callable[[dict], bool], timeout: float, what: str,
                  since: float | None = None) -> dict:
        """Wait for the first sample at or after ``since`` (page ms; default: now) whose selected
        candidate pair ({local, remote, remoteUfrag, state, rttMs}) satisfies ``predicate``; returns
        that sample, so its ``t`` says when the page first saw such a pair."""
        since = self.now() if since is None else since

        def judge() -> dict | None:
            return next((s for s in self.samples(since) if s["pair"] and predicate(s["pair"])), None)
        return self._wait(judge, timeout, what)

    def echo_peak_hz(self) -> float | None:
        """The loudest frequency in the audio coming back now (None without WebAudio)."""
        s = self.latest()
        return s["peakHz"] if s else None

    def ice_restart(self, timeout: float = CALL_TIMEOUT) -> dict:
        """WHIP PATCH with new ICE credentials; returns {started (page ms), fragment, answer}."""
        return self.invoke("iceRestart", timeout=timeout)

    def hang_up(self, timeout: float = CALL_TIMEOUT) -> int | None:
        """DELETE the session and close the peer connection; returns the DELETE's status."""
        try:
            return self.invoke("hangUp", timeout=timeout)
        finally:
            self.page.context.close()
