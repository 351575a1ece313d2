"""Opus in the event loop, through libopus itself (the copy PyAV ships), for the voice path.

aiortc decodes in a thread and encodes in the default executor: two thread hops per
frame, and its decoder cannot conceal a lost packet (libavcodec's send_packet takes
no "this one is missing").  libopus can: ``opus_decode(NULL)`` is packet-loss
concealment and ``decode_fec=1`` recovers a lost frame from the next packet's
in-band FEC.  A 20 ms mono frame costs ~40 µs to decode and ~150 µs to encode here,
cheap enough to stay on the loop.

The library is PyAV's bundled ``av.libs/libopus-*.so`` (PyAV is aiortc's own
dependency, so nothing new is installed), else the system's ``libopus.so.0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from functools import cache

from splitrelay.errors import SplitrelayError

SAMPLE_RATE = 48000
MAX_PACKET = 1500                  # bytes: one RTP payload
MAX_FRAME_SAMPLES = 5760           # 120 ms at 48 kHz, the longest Opus frame
APPLICATION_VOIP = 2048
APPLICATION_RESTRICTED_LOWDELAY = 2051
# What the transceiver's outbound encoder is, by ``$SPLITRELAY_OPUS_MODE`` (``transceiver serve --opus-mode``):
# voip: SILK+CELT hybrid for speech, in-band FEC for a lossy downlink, 6.5 ms lookahead; lowdelay: CELT only,
# no in-band FEC, 2.5 ms lookahead, and about a third of the CPU a frame (46-53 µs against 137 for espeak-ng
# speech at complexity 5, process_time best of 3 on this VM).  voip stays the default: FEC is what a
# caller on a lossy link hears; an operator whose calls are CPU-bound and whose links are clean may choose.
OPUS_MODE_ENV = "SPLITRELAY_OPUS_MODE"
OPUS_MODES = {"voip": APPLICATION_VOIP, "lowdelay": APPLICATION_RESTRICTED_LOWDELAY}
DEFAULT_OPUS_MODE = "voip"
SET_BITRATE = 4002
SET_INBAND_FEC = 4012
SET_PACKET_LOSS_PERC = 4014
SET_COMPLEXITY = 4010


class OpusError(SplitrelayError):
    """libopus is missing or refused a call (one-line reason)."""


def outbound_application() -> int:
    """The libopus application ``$SPLITRELAY_OPUS_MODE`` asks for (``DEFAULT_OPUS_MODE`` when unset)."""
    name = os.environ.get(OPUS_MODE_ENV) or DEFAULT_OPUS_MODE
    if name not in OPUS_MODES:
        raise OpusError(f"{OPUS_MODE_ENV}={name!r}: choose from {', '.join(OPUS_MODES)}")
    return OPUS_MODES[name]


@cache
def libopus() -> ctypes.CDLL:
    import av

    bundled = sorted(glob.glob(os.path.join(os.path.dirname(av.__file__), os.pardir, "av.libs", "libopus*.so*")))
    for path in [*bundled, ctypes.util.find_library("opus") or "libopus.so.0"]:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.opus_decoder_create.restype = ctypes.c_void_p
        lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_decode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p,
                                    ctypes.c_int, ctypes.c_int]
        lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_encoder_create.restype = ctypes.c_void_p
        lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int,
                                            ctypes.POINTER(ctypes.c_int)]
        lib.opus_encode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p,
                                    ctypes.c_int32]
        lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_encoder_ctl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.opus_packet_get_nb_samples.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
        return lib
    raise OpusError("libopus not found (neither PyAV's bundled copy nor libopus.so.0)")


def packet_samples(payload: bytes) -> int:
    """Samples (at 48 kHz) one Opus packet carries; 0 when the packet is malformed."""
    if not payload:
        return 0
    return max(0, libopus().opus_packet_get_nb_samples(payload, len(payload), SAMPLE_RATE))


class OpusDecoder:
    """48 kHz mono s16le out of any Opus stream (a stereo stream is down-mixed by libopus)."""

    def __init__(self) -> None:
        err = ctypes.c_int()
        self._lib = libopus()
        self._state = self._lib.opus_decoder_create(SAMPLE_RATE, 1, ctypes.byref(err))
        if err.value != 0 or not self._state:
            raise OpusError(f"opus_decoder_create failed ({err.value})")
        self._pcm = ctypes.create_string_buffer(2 * MAX_FRAME_SAMPLES)

    def _run(self, payload: bytes | None, samples: int, fec: int) -> bytes:
        count = self._lib.opus_decode(self._state, payload, len(payload) if payload else 0, self._pcm,
                                      samples, fec)
        if count < 0:  # a corrupt packet: conceal it rather than stop the call
            count = self._lib.opus_decode(self._state, None, 0, self._pcm, samples, 0)
        return self._pcm.raw[: 2 * max(0, count)]

    def decode(self, payload: bytes) -> bytes:
        return self._run(payload, MAX_FRAME_SAMPLES, 0)

    def conceal(self, samples: int, next_payload: bytes | None = None) -> bytes:
        """``samples`` of audio in place of a lost packet: from ``next_payload``'s in-band FEC when it
        carries any, else libopus's packet-loss concealment."""
        return self._run(next_payload, samples, 1 if next_payload else 0)

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            self._lib.opus_decoder_destroy(self._state)
            self._state = None


class OpusEncoder:
    """48 kHz mono s16le into Opus packets: VoIP mode with in-band FEC for a lossy link's peer, or
    ``APPLICATION_RESTRICTED_LOWDELAY`` (CELT only: the FEC setting then does nothing)."""

    def __init__(self, bitrate: int = 32000, complexity: int = 5, loss_percent: int = 5,
                 application: int = APPLICATION_VOIP) -> None:
        err = ctypes.c_int()
        self._lib = libopus()
        self._state = self._lib.opus_encoder_create(SAMPLE_RATE, 1, application, ctypes.byref(err))
        if err.value != 0 or not self._state:
            raise OpusError(f"opus_encoder_create failed ({err.value})")
        for request, value in ((SET_BITRATE, bitrate), (SET_COMPLEXITY, complexity),
                               (SET_INBAND_FEC, 1), (SET_PACKET_LOSS_PERC, loss_percent)):
            self._lib.opus_encoder_ctl(self._state, request, value)
        self._out = ctypes.create_string_buffer(MAX_PACKET)

    def encode(self, pcm: bytes) -> bytes:
        """One packet from one frame of s16le mono (2.5 to 60 ms of samples)."""
        size = self._lib.opus_encode(self._state, pcm, len(pcm) // 2, self._out, MAX_PACKET)
        if size < 0:
            raise OpusError(f"opus_encode failed ({size})")
        return self._out.raw[:size]

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            self._lib.opus_encoder_destroy(self._state)
            self._state = None
