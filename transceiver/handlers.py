"""The hand-off between a WebRTC session and the voice-AI side: plain PCM and messages.

A handler never sees WebRTC.  Per session it gets

* ``on_start()`` once the call is connected (DTLS up), ``on_stop()`` when it ends;
* ``on_audio(frame)`` for every decoded inbound frame: 48 kHz, signed 16-bit
  little-endian, mono (the caller's left channel), 20 ms, with its RTP-derived
  position in the stream (``pts``, in samples), when it was decoded (``time``)
  and when its packet arrived (``received``; None for a frame concealed in
  place of a lost packet), both ``time.monotonic()``;
* ``on_text(str)`` / ``on_bytes(bytes)`` for data-channel messages;

and answers through the ``SessionIO`` it was built with: ``send_audio`` takes
48 kHz s16 mono PCM of any length (it is re-framed to 20 ms and sent at once,
paced by RTP time; at most one second may wait), ``clear_audio`` drops what is still
waiting (barge-in: the caller speaks, the agent stops at once) and returns how
many seconds it dropped, ``send_text`` / ``send_bytes`` write to the client's
data channel.  Exceptions from a handler are counted and logged,
never fatal to the call.

Handlers are chosen by name from a registry, with options:
``make_handler_factory("tone:frequency=880")`` or
``handler_factory("echo", delay=0.25)``.  Built-ins: ``echo`` (plays back what it
hears after ``delay`` seconds, echoes messages) and ``tone`` (a sine of
``frequency`` Hz at ``amplitude``; answers text with "tone").  Optional:
``voice`` (a voice agent, ``splitrelay[voice]``, see splitrelay.voice.agent) and
``pipecat`` (a user's Pipecat pipeline, ``splitrelay[pipecat]``).
"""

from __future__ import annotations

import asyncio
import importlib
import math
import struct
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE


@dataclass
class PcmFrame:
    """A block of s16le PCM.  Inbound frames are mono, 48 kHz, 20 ms, with ``pts`` and ``time`` set."""

    samples: bytes            # s16le, interleaved when channels > 1
    channels: int = 1
    sample_rate: int = SAMPLE_RATE
    pts: int | None = None    # position of the first sample in the stream, in samples
    time: float | None = None  # time.monotonic() when the frame was decoded
    received: float | None = None  # time.monotonic() when its packet reached the transceiver (None: concealed)

    @property
    def sample_count(self) -> int:
        return len(self.samples) // (2 * self.channels)

    @property
    def duration(self) -> float:
        return self.sample_count / self.sample_rate

    def to_array(self) -> array:
        """The samples as ``array('h')`` (interleaved); ``numpy.frombuffer(frame.samples, '<i2')`` also works."""
        return array("h", self.samples)

    @classmethod
    def from_array(cls, samples: array | list[int], sample_rate: int = SAMPLE_RATE) -> PcmFrame:
        return cls(array("h", samples).tobytes(), 1, sample_rate)


class SessionIO(Protocol):
    """What a handler may do to its session."""

    session_id: str

    def send_audio(self, frame: PcmFrame) -> None: ...

    def clear_audio(self) -> float:
        """Drop the audio queued by ``send_audio`` and not yet sent; the seconds dropped."""
        ...

    def send_text(self, text: str) -> None: ...

    def send_bytes(self, data: bytes) -> None: ...


class Handler:
    """Base class: override what you need.  One instance per session."""

    def __init__(self, io: SessionIO) -> None:
        self.io = io

    async def on_start(self) -> None: ...

    async def on_audio(self, frame: PcmFrame) -> None: ...

    async def on_text(self, text: str) -> None: ...

    async def on_bytes(self, data: bytes) -> None: ...

    async def on_stop(self) -> None: ...


HandlerFactory = Callable[[SessionIO], Handler]
HANDLERS: dict[str, Callable[..., Handler]] = {}


def register_handler(name: str) -> Callable[[type[Handler]], type[Handler]]:
    """Class decorator: make a handler selectable by ``name`` (its __init__ takes io plus keyword options)."""
    def add(cls: type[Handler]) -> type[Handler]:
        HANDLERS[name] = cls
        return cls
    return add


@register_handler("echo")
class EchoHandler(Handler):
    """Plays back what it hears ``delay`` seconds later and echoes data-channel messages."""

    def __init__(self, io: SessionIO, delay: float = 0.0) -> None:
        super().__init__(io)
        if not 0.0 <= delay <= 0.9:  # the session buffers at most 1 s of outbound audio
            raise ValueError(f"echo delay must be 0..0.9 s, got {delay}")
        self.delay = float(delay)
        self._pending: set[asyncio.TimerHandle] = set()

    async def on_audio(self, frame: PcmFrame) -> None:
        if not self.delay:
            self.io.send_audio(frame)
            return
        # a delay line, not a sleep: frames keep their spacing and the inbound side never stalls
        loop = asyncio.get_running_loop()
        due = (frame.time or time.monotonic()) + self.delay
        handle: asyncio.TimerHandle

        def play() -> None:
            self._pending.discard(handle)
            self.io.send_audio(frame)

        handle = loop.call_at(loop.time() + max(0.0, due - time.monotonic()), play)
        self._pending.add(handle)

    async def on_text(self, text: str) -> None:
        self.io.send_text(text)

    async def on_bytes(self, data: bytes) -> None:
        self.io.send_bytes(data)

    async def on_stop(self) -> None:
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()


@register_handler("tone")
class ToneHandler(Handler):
    """Speaks a continuous sine (``frequency`` Hz, ``amplitude`` of 32767); answers text with 'tone'."""

    def __init__(self, io: SessionIO, frequency: float = 440.0, amplitude: int = 8000) -> None:
        super().__init__(io)
        if not 20.0 <= frequency <= SAMPLE_RATE / 2:
            raise ValueError(f"tone frequency must be 20..{SAMPLE_RATE // 2} Hz, got {frequency}")
        if not 0 <= amplitude <= 32767:
            raise ValueError(f"tone amplitude must be 0..32767, got {amplitude}")
        self.frequency = float(frequency)
        self.amplitude = int(amplitude)
        self._task: asyncio.Task | None = None

    async def on_start(self) -> None:
        self._task = asyncio.ensure_future(self._play())

    def frame(self, index: int) -> PcmFrame:
        step = 2 * math.pi * self.frequency / SAMPLE_RATE
        first = index * FRAME_SAMPLES
        samples = [int(self.amplitude * math.sin(step * (first + i))) for i in range(FRAME_SAMPLES)]
        return PcmFrame(struct.pack(f"<{FRAME_SAMPLES}h", *samples), pts=first)

    async def _play(self) -> None:
        start = time.monotonic()
        index = 0
        while True:  # paced on the clock, not on sleep(0.02), so it does not drift behind the sender
            self.io.send_audio(self.frame(index))
            index += 1
            await asyncio.sleep(max(0.0, start + index * FRAME_SECONDS - time.monotonic()))

    async def on_text(self, text: str) -> None:
        self.io.send_text("tone")

    async def on_stop(self) -> None:
        if self._task:
            self._task.cancel()


def _option_value(raw: str) -> Any:  # noqa: ANN401
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    return raw


def parse_handler_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"tone:frequency=880,amplitude=4000"`` -> ``("tone", {"frequency": 880, "amplitude": 4000})``."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ValueError(f"handler option {item!r} is not key=value")
        options[key.strip()] = _option_value(value.strip())
    return name.strip(), options


# handlers whose dependencies are extras: imported (and so registered) when first asked for
OPTIONAL_HANDLERS = {"voice": ("splitrelay.voice.agent", "voice"),
                     "pipecat": ("splitrelay.voice.pipecat", "pipecat")}


def _import_optional(name: str) -> None:
    module, extra = OPTIONAL_HANDLERS[name]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"handler {name!r} needs pip install 'splitrelay[{extra}]' ({exc})") from None


def handler_factory(spec: str, **options: Any) -> HandlerFactory:  # noqa: ANN401
    """A factory ``io -> Handler`` for a registered name (options in the spec and/or as keywords).

    The options are checked here, once, by building a handler on a dummy session:
    a bad option is a configuration error, not a failure at the first call.  So a
    handler's ``__init__`` must be cheap and free of side effects (connect to
    models, open streams in ``on_start``).
    """
    name, parsed = parse_handler_spec(spec)
    parsed.update(options)
    if name in OPTIONAL_HANDLERS and name not in HANDLERS:
        _import_optional(name)
    try:
        cls = HANDLERS[name]
    except KeyError:
        known = ", ".join(sorted({*HANDLERS, *OPTIONAL_HANDLERS}))
        raise ValueError(f"unknown handler {name!r}; choose from {known}") from None
    try:
        cls(_NullIO(), **parsed)
    except TypeError as exc:
        raise ValueError(f"handler {name!r}: {exc}") from None

    def make(io: SessionIO) -> Handler:
        return cls(io, **parsed)

    return make


class _NullIO:
    session_id = "-"

    def send_audio(self, frame: PcmFrame) -> None: ...

    def clear_audio(self) -> float:
        return 0.0

    def send_text(self, text: str) -> None: ...

    def send_bytes(self, data: bytes) -> None: ...


# built-in handlers kept in their own modules (registered on import; they import this module first)
from splitrelay.transceiver import conversation  # noqa: E402,F401
