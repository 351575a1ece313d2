"""Standard non-browser WebRTC stacks as WHIP callers: libdatachannel and werift, from npm.

Mobile SDKs and server-side agents are built on stacks like these, not on Chromium or aiortc,
and they differ where it matters to a relay (issue 20: when they accept DTLS).  The call itself
is ``node/whip_call.js`` with the versions pinned in ``node/package-lock.json``; scripts/setup.sh
installs them (``npm ci``, node-datachannel's native library comes in its npm platform package,
nothing is downloaded at run time).  This module runs that script, in a lab namespace through a
wrapper such as ``nsenter_argv``, and returns its JSON report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from splitrelay.errors import SplitrelayError
from splitrelay.tokens import TOKEN_ENV

NODE_DIR = Path(__file__).with_name("node")
SCRIPT = NODE_DIR / "whip_call.js"
STACKS = ("libdatachannel", "werift")
PACKAGES = {"libdatachannel": "node-datachannel", "werift": "werift"}
CALL_TIMEOUT = 20.0


class NodeCallError(SplitrelayError):
    """The node caller could not run or did not connect (one-line reason)."""


def unavailable_reason(stack: str) -> str | None:
    """Why ``stack`` cannot be called here (None when it can): the tests skip with this line."""
    if shutil.which("node") is None:
        return "no node (apt-get install nodejs; scripts/setup.sh needs it)"
    if not (NODE_DIR / "node_modules" / PACKAGES[stack] / "package.json").exists():
        return f"no {PACKAGES[stack]} in {NODE_DIR}/node_modules (scripts/setup.sh runs npm ci there)"
    return None


def node_calls(stack: str, whip_url: str, wrapper: list[str] | None = None, calls: int = 1,
               timeout: float = CALL_TIMEOUT, hold: float = 0.0,
               dead_candidate: str | None = None, token: str | None = None,
               send_opus: Path | None = None) -> list[dict[str, Any]]:
    """``calls`` calls by ``stack`` to ``whip_url``, one after another in one node process, each
    connected (or failed) and hung up; one report per call: ``ok``, ``error``, ``ice_connected_ms``,
    ``dtls_connected_ms`` (from the POST leaving), ``gap_ms``, ``answer_setup``, ``delete_status``,
    ``events``, ``answer_fingerprints`` ([algorithm, value] per line) and, for libdatachannel,
    ``certificate`` (the server certificate's fingerprint as its DTLS hashed it, once one arrived); with
    ``hold`` (s) each call stays up that long once connected and reports the audio it
    received (``rtp_in``, ``last_rtp_ms``); ``dead_candidate`` ("ip:port"): the client sees one more
    server candidate there, of the highest priority, which never answers; ``token``: the WHIP bearer
    token, handed over in the environment (not argv, which any local user can read); ``send_opus``
    (libdatachannel, with ``hold``): a file of pre-encoded Opus frames it sends meanwhile, and ``audio`` in
    the report says what it heard back (whip_call.js HeardAudio).  Raises NodeCallError when
    the process gave no report for every call."""
    if stack not in STACKS:
        raise NodeCallError(f"unknown stack {stack!r} (one of {', '.join(STACKS)})")
    argv = [*(wrapper or []), "node", str(SCRIPT), "--stack", stack, "--timeout-ms", str(int(timeout * 1000)),
            "--calls", str(calls), "--hold-ms", str(int(hold * 1000)),
            *(["--dead-candidate", dead_candidate] if dead_candidate else []),
            *(["--send-opus", str(send_opus)] if send_opus else []), whip_url]
    limit = calls * (timeout + hold + 5) + 10
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit, cwd=NODE_DIR,
                              env={**os.environ, TOKEN_ENV: token} if token else None)
    except subprocess.TimeoutExpired:
        raise NodeCallError(f"{stack} caller still running after {limit:.0f} s") from None
    try:
        reports = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    except json.JSONDecodeError:
        reports = []
    if len(reports) != calls:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        raise NodeCallError(f"{stack} caller exited {proc.returncode} with {len(reports)} of {calls} reports: "
                            f"{tail[:200]}")
    return reports
