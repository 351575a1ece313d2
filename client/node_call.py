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
import shutil
import subprocess
from pathlib import Path
from typing import Any

from splitrelay.errors import SplitrelayError

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


def node_call(stack: str, whip_url: str, wrapper: list[str] | None = None,
              timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
    """One call by ``stack`` to ``whip_url``, connected and hung up; the client's report:
    ``ice_connected_ms``, ``dtls_connected_ms`` (from the POST leaving), ``gap_ms``, ``answer_setup``,
    ``delete_status``, ``events``.  Raises NodeCallError when it did not connect."""
    if stack not in STACKS:
        raise NodeCallError(f"unknown stack {stack!r} (one of {', '.join(STACKS)})")
    argv = [*(wrapper or []), "node", str(SCRIPT), "--stack", stack, "--timeout-ms", str(int(timeout * 1000)),
            whip_url]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10, cwd=NODE_DIR)
    except subprocess.TimeoutExpired:
        raise NodeCallError(f"{stack} caller still running after {timeout + 10:.0f} s") from None
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        raise NodeCallError(f"{stack} caller exited {proc.returncode} without a report: {tail[:200]}") from None
    if not report.get("ok"):
        raise NodeCallError(f"{stack} call failed: {report.get('error')}")
    return report
