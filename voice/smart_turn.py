"""Semantic end of turn: Pipecat's Smart Turn v3.2 judges whether the caller has finished.

The model (``smart-turn-v3.2-cpu.onnx``, 8.7 MB, BSD-2) ships inside the
``pipecat-ai`` wheel.  It is a Whisper-tiny encoder with a classifier head: the
last 8 s of the turn as 80 log-mel bins at 100 frames a second in, the
probability that the utterance is complete out.  Pauses, intonation and the
words themselves all count, so "what time is it" scores 0.9+ and "book a table
for" a few hundredths, although both end in silence.

Loaded through ``onnxruntime`` (already installed by ``piper-tts``) with the
feature extraction below, not through Pipecat's ``LocalSmartTurnAnalyzerV3``:

* importing Pipecat's analyzer costs ~290 ms and 220 more modules (loguru,
  soxr, Pipecat's frames and metrics, a log banner) against ~120 ms for
  onnxruntime and numpy, measured here;
* only the model *file* is taken from the wheel, found without importing
  Pipecat, so ``pip install --no-deps pipecat-ai`` (34 MB) is enough for it
  rather than the extra's numba and llvmlite (210 MB);
* the file's sha256 is pinned: a different model is refused, not misread.

``log_mel`` mirrors ``transformers.WhisperFeatureExtractor(chunk_length=8)``
as Pipecat's vendored ``_whisper_features`` does; tests/test_voice_turns.py
checks the two agree (a deliberate differential oracle, not a copy to keep).

Inference is blocking, 40-65 ms of one core here: the agent runs it on a
worker thread, never on the event loop.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path

from splitrelay.voice.audio import MODEL_RATE
from splitrelay.voice.stt import SttError

MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
MODEL_SHA256 = "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"
SECONDS = 8                      # the model's window: the last 8 s of the turn, zero-padded in front
N_FFT, HOP, N_MELS = 400, 160, 80


def model_path() -> Path:
    """The ONNX file inside the installed ``pipecat-ai`` (located, not imported), checked against its pin."""
    spec = importlib.util.find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        raise SttError("pipecat-ai is not installed (it ships the Smart Turn model): "
                       "pip install 'splitrelay[pipecat]' or pip install --no-deps pipecat-ai")
    path = Path(list(spec.submodule_search_locations)[0]) / "audio/turn/smart_turn/data" / MODEL_FILE
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise SttError(f"the installed pipecat-ai has no {MODEL_FILE} ({exc.strerror})") from None
    if digest != MODEL_SHA256:
        raise SttError(f"{path} is not the pinned Smart Turn v3.2 (sha256 {digest[:16]}…, "
                       f"want {MODEL_SHA256[:16]}…)")
    return path


def _slaney_mel(hz):  # noqa: ANN001, ANN202 - numpy arrays
    import numpy as np

    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) * (27.0 / np.log(6.4)),
                    3.0 * hz / 200.0)


def _slaney_hz(mel):  # noqa: ANN001, ANN202
    import numpy as np

    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), 200.0 * mel / 3.0)


class _Features:
    """Whisper's constants (Hann window, Slaney mel filterbank), built once per process."""

    _instance: _Features | None = None

    def __init__(self) -> None:
        import numpy as np

        self.window = np.hanning(N_FFT + 1)[:-1]
        edges = _slaney_hz(np.linspace(_slaney_mel(0.0), _slaney_mel(MODEL_RATE / 2), N_MELS + 2))
        bins = np.linspace(0, MODEL_RATE // 2, N_FFT // 2 + 1)
        slopes = edges[None, :] - bins[:, None]
        down = -slopes[:, :-2] / np.diff(edges)[:-1]
        up = slopes[:, 2:] / np.diff(edges)[1:]
        self.mel = np.maximum(0.0, np.minimum(down, up)) * (2.0 / (edges[2:] - edges[:-2]))[None, :]

    @classmethod
    def get(cls) -> _Features:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance


def log_mel(pcm16k: bytes):  # noqa: ANN201 - numpy array (80, 800) float32
    """The model's input for the last 8 s of ``pcm16k`` (s16 mono 16 kHz), zero-padded in front."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    size = SECONDS * MODEL_RATE
    audio = np.frombuffer(pcm16k[len(pcm16k) - 2 * size if len(pcm16k) > 2 * size else 0:], dtype="<i2")
    x = np.zeros(size, dtype=np.float32)
    x[size - len(audio):] = audio.astype(np.float32) / 32768.0
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    f = _Features.get()
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * f.window, axis=-1)) ** 2
    spec = np.log10(np.maximum(1e-10, power @ f.mel)).T[:, :-1]
    spec = np.maximum(spec, spec.max() - 8.0)
    return ((spec + 4.0) / 4.0).astype(np.float32)


class SmartTurn:
    """The model, one ONNX session per process (``onnxruntime`` runs are thread-safe); ``complete`` blocks."""

    _session = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.session()

    def warm_up(self) -> None:
        """One inference on silence: onnxruntime's first run in a process took 380 ms here, the next 50."""
        self.complete(bytes(2 * MODEL_RATE // 2))

    @classmethod
    def session(cls):  # noqa: ANN206 - onnxruntime.InferenceSession
        with cls._lock:
            if cls._session is None:
                path = model_path()
                try:
                    import onnxruntime as ort
                except ImportError:
                    raise SttError("onnxruntime is not installed: pip install 'splitrelay[voice]'") from None
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1   # one core per inference: 40-65 ms here, and the other
                options.inter_op_num_threads = 1   # core stays free for the event loop and the recogniser
                cls._session = ort.InferenceSession(str(path), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
            return cls._session

    def complete(self, pcm16k: bytes) -> float:
        """Probability (0..1) that the turn so far (s16 mono 16 kHz, its last 8 s count) is finished."""
        features = log_mel(pcm16k)[None, :, :]
        return float(self.session().run(None, {"input_features": features})[0].reshape(-1)[0])
