"""The capacity bench's load client: many libdatachannel calls in one node process (``node/load.js``).

The aiortc probe encodes and decodes every frame in Python and saturated its core from 16 sessions on,
so the old capacity figure measured the client (issue 24).  ``load.js`` sends pre-encoded Opus and
times the echo by packet size, never decoding; the frames are encoded here, once, with the same libopus
the transceiver uses, and checked against the transceiver's own decoder and encoder: the transceiver's
packets of the quiet stream stay below ``echo_threshold`` bytes and the pulse's echo starts at or above
it.  Standalone (e.g. against a lab transceiver, from the lab's client namespace)::

    python -m splitrelay.client.load_client frames /tmp/frames.json
    SPLITRELAY_WHIP_TOKEN=... node client/node/load.js --frames /tmp/frames.json --sessions 20 \\
        --duration-s 10 http://HOST:PORT/whip
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

from splitrelay.errors import SplitrelayError
from splitrelay.transceiver.handlers import FRAME_SAMPLES
from splitrelay.transceiver.opus import OpusDecoder, OpusEncoder

NODE_DIR = Path(__file__).with_name("node")
SCRIPT = NODE_DIR / "load.js"
FRAME_MS = 20
CYCLE_FRAMES = 25           # two pulses a second: an echo later than 500 ms is not matched (counted lost)
PULSE_INDEX = 12
PULSE_PEAK = 20000          # white noise: the loudest, widest-band frame, so its echo is the biggest packet
SPEECH_TEXT = "what is the weather like today in Paris"   # 1.9 s with espeak-ng at 175 words a minute
SPEECH_PAUSE_S = 3.0        # then silence: the agent's turn (it answers), about 40 % / 60 % of each cycle
CONNECT_PHASE_S = 60.0      # load.js --connect-phase-ms: calls not connected by then are counted as failed
MIN_MARGIN = 8              # bytes between the quiet echo's largest packet and the pulse echo's first


class LoadClientError(SplitrelayError):
    """The load client could not run, or its frames would not reveal the echo (one-line reason)."""


def _cycle_pcm() -> list[bytes]:
    rng = random.Random(24)
    noise = (rng.randint(-PULSE_PEAK, PULSE_PEAK) for _ in range(FRAME_SAMPLES))
    pulse = struct.pack(f"<{FRAME_SAMPLES}h", *noise)
    return [pulse if i == PULSE_INDEX else bytes(2 * FRAME_SAMPLES) for i in range(CYCLE_FRAMES)]


def echo_sizes(cycle: list[bytes], cycles: int = 3) -> list[int]:
    """Packet sizes the transceiver's echo sends back for ``cycles`` repeats of ``cycle``: its decoder
    and its encoder (default settings, as transceiver/audio.py builds them), one frame in, one out."""
    decoder, encoder = OpusDecoder(), OpusEncoder()
    return [len(encoder.encode(decoder.decode(p))) for _ in range(cycles) for p in cycle]


def make_frames() -> dict[str, Any]:
    """One cycle of pre-encoded frames and the packet size that marks the pulse's echo.

    Raises LoadClientError when the transceiver's echo of the quiet stream is not smaller than the
    echo of the pulse by ``MIN_MARGIN`` bytes (another encoder setting could do that)."""
    encoder = OpusEncoder(loss_percent=0)
    pcm = _cycle_pcm()
    cycle = [encoder.encode(frame) for frame in pcm + pcm][CYCLE_FRAMES:]   # the second: settled state
    sizes = echo_sizes(cycle)[CYCLE_FRAMES:]                               # likewise
    quiet = max(s for i, s in enumerate(sizes) if not 0 <= (i % CYCLE_FRAMES) - PULSE_INDEX < 6)
    pulse = sizes[PULSE_INDEX]
    if pulse - quiet < MIN_MARGIN:
        raise LoadClientError(f"the transceiver's echo of the pulse is {pulse} bytes and of quiet up to {quiet}: "
                              f"less than {MIN_MARGIN} bytes apart, the echo cannot be told by size")
    return {"frame_ms": FRAME_MS, "pulse_index": PULSE_INDEX, "echo_threshold": (pulse + quiet + 1) // 2,
            "quiet_echo_max_bytes": quiet, "pulse_echo_bytes": pulse,
            "cycle": [base64.b64encode(p).decode() for p in cycle]}


def make_speech_frames(text: str = SPEECH_TEXT, pause: float = SPEECH_PAUSE_S) -> dict[str, Any]:
    """A caller who says ``text`` (espeak-ng, the voice agent's own TTS) then is silent ``pause`` s, over and
    over: what makes a voice agent run its VAD, recogniser and replies.  No pulse: nothing is timed."""
    from splitrelay.voice.tts import EspeakTts

    pcm = EspeakTts().synthesize(text)
    pcm += bytes(-len(pcm) % (2 * FRAME_SAMPLES)) + bytes(2 * FRAME_SAMPLES) * round(pause * 1000 / FRAME_MS)
    frames = [pcm[i:i + 2 * FRAME_SAMPLES] for i in range(0, len(pcm), 2 * FRAME_SAMPLES)]
    encoder = OpusEncoder(loss_percent=0)
    cycle = [encoder.encode(frame) for frame in frames + frames][len(frames):]
    return {"frame_ms": FRAME_MS, "pulse_index": -1, "echo_threshold": 1 << 30, "speech_s": round(
        len(pcm) / 2 / 48000 - pause, 2), "cycle": [base64.b64encode(p).decode() for p in cycle]}


def write_frames(path: Path, speech: bool = False) -> dict[str, Any]:
    """The frames file load.js sends: the pulse cycle (``make_frames``), or speech (``make_speech_frames``)."""
    frames = make_speech_frames() if speech else make_frames()
    path.write_text(json.dumps(frames))
    return frames


def unavailable_reason() -> str | None:
    """Why the load client cannot run here (None when it can)."""
    if shutil.which("node") is None:
        return "no node (apt-get install nodejs; scripts/setup.sh needs it)"
    if not (NODE_DIR / "node_modules" / "node-datachannel" / "package.json").exists():
        return f"no node-datachannel in {NODE_DIR}/node_modules (scripts/setup.sh runs npm ci there)"
    return None


def load_argv(frames: Path, url: str, sessions: int, duration: float, speak_cycle: float = 0.0,
              speak_share: float = 1.0, phase_spread: float = 0.0) -> list[str]:
    """load.js's command line (run it in the lab's client namespace, token in ``TOKEN_ENV``).

    ``phase_spread``: call i starts talking i/N of it (s) before the measured window, so the calls are
    not in step (a conversation's phases, a caller's sentences)."""
    argv = ["node", str(SCRIPT), "--frames", str(frames), "--sessions", str(sessions),
            "--duration-s", f"{duration:g}", "--connect-phase-ms", str(round(CONNECT_PHASE_S * 1000))]
    if speak_cycle:
        argv += ["--speak-cycle-ms", str(round(speak_cycle * 1000)), "--speak-share", f"{speak_share:g}"]
    if phase_spread:
        argv += ["--phase-spread-ms", str(round(phase_spread * 1000))]
    return [*argv, url]


def parse_report(stdout: str, stderr: str, returncode: int) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (stderr.strip().splitlines() or [""])[-1]
        raise LoadClientError(f"load client exited {returncode} without a report: {tail[:200]}") from None


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "frames":
        sys.stderr.write("usage: python -m splitrelay.client.load_client frames OUT.json\n")
        return 2
    frames = write_frames(Path(argv[1]))
    sys.stderr.write(f"wrote {argv[1]}: echo threshold {frames['echo_threshold']} bytes (quiet echo <= "
                     f"{frames['quiet_echo_max_bytes']}, pulse echo {frames['pulse_echo_bytes']})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

