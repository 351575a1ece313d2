"""Many TCP-carried voice calls at once through one relay: the agent's CPU and memory per call, the kernel's.

``python -m splitrelay.bench.ice_tcp_path --calls N [--idle N]`` runs ``concurrent``.
"""

from __future__ import annotations

import contextlib
import time

from splitrelay.bench.ice_tcp_echo import UFRAG, echo_lab, voice_packet
from splitrelay.bench.system import process_cpu_s
from splitrelay.lab.stack import TCP_PORT, control
from splitrelay.lab.topology import Lab
from splitrelay.wire.stun import build_binding_request


async def _calls(relay: tuple[str, int], calls: int, seconds: float, marks: dict, idle: int = 0) -> dict:
    """``idle`` ICE-TCP connections opened by a Binding Request and then silent (``marks["idle"]``
    once open; the caller samples memory then, ``marks["go"]`` set lets it go on), then ``calls`` more,
    each sending one voice packet per 20 ms for ``seconds``; ``marks`` gets the monotonic times when
    all were open and when done."""
    import asyncio

    async def opened() -> tuple:
        reader, writer = await asyncio.open_connection(*relay)
        request = build_binding_request(f"{UFRAG}:benchclient")
        writer.write(len(request).to_bytes(2, "big") + request)
        await reader.readexactly(2 + len(request))
        return reader, writer

    async def batch(n: int) -> list:   # 50 at a time: one by one, the first would idle out (30 s) first
        out = []
        for first in range(0, n, 50):
            out += await asyncio.gather(*(opened() for _ in range(first, min(n, first + 50))))
        return out

    silent = await batch(idle)
    marks["idle"] = time.monotonic()
    while idle and "go" not in marks:
        await asyncio.sleep(0.05)
    conns = await batch(calls)
    marks["open"] = time.monotonic()
    sent = received = 0

    data = voice_packet(0)
    framed = len(data).to_bytes(2, "big") + data

    async def send(writer) -> None:  # noqa: ANN001
        nonlocal sent
        start = time.monotonic()
        for k in range(int(seconds * 50)):   # on a 20 ms clock; a lost echo stalls nothing
            await asyncio.sleep(max(0.0, start + 0.02 * k - time.monotonic()))
            writer.write(framed)
            sent += 1

    async def receive(reader) -> None:  # noqa: ANN001
        nonlocal received
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readexactly(len(framed))
                received += 1

    readers = [asyncio.ensure_future(receive(r)) for r, _ in conns]
    await asyncio.gather(*(send(w) for _, w in conns))
    marks["done"] = time.monotonic()
    await asyncio.sleep(0.5)   # the last echoes
    for task in readers:
        task.cancel()
    for _, writer in conns + silent:
        writer.close()
    return {"sent": sent, "received": received}


def _socket_memory(lab: Lab) -> dict:
    """The relay namespace's TCP connections on the ICE-TCP port and its connected UDP sockets: how
    many, and the bytes their buffers hold (ss skmem r + f + w + o + bl), plus the size of one TCP
    and one UDP socket object (/proc/slabinfo, the kernel's own per-socket cost)."""
    def held(argv: list[str]) -> tuple[int, int]:
        out = lab.run(lab.relay_public.netns, argv).stdout
        count = total = 0
        for skmem in out.split("skmem:(")[1:]:
            fields = dict((k.rstrip("0123456789"), int(k[len(k.rstrip("0123456789")):]))
                          for k in skmem.split(")")[0].split(","))
            count += 1
            total += sum(fields.get(k, 0) for k in ("r", "f", "w", "o", "bl"))
        return count, total

    tcp_n, tcp_b = held(["ss", "-Htmn", "state", "established", f"sport = :{TCP_PORT}"])
    udp_n, udp_b = held(["ss", "-Humn", "state", "established"])
    objsize = {}
    for line in open("/proc/slabinfo"):
        fields = line.split()
        if fields and fields[0] in ("TCP", "UDP", "TCPv6", "UDPv6"):
            objsize[fields[0]] = int(fields[3])
    return {"tcp_connections": tcp_n, "tcp_buffer_bytes": tcp_b, "udp_sockets": udp_n, "udp_buffer_bytes": udp_b,
            "socket_object_bytes": objsize}


def concurrent(calls: int, seconds: float, idle: int = 0) -> dict:
    """Many TCP-carried voice calls at once through one relay: the agent's CPU and memory per call,
    and the kernel's socket memory.  With ``idle``, that many routed connections that send nothing
    more are opened first and the memory sampled then (per idle connection).  A lost echo is counted,
    not waited for; when the client or the echo cannot keep up, ``packets_per_call_per_s_achieved``
    says so."""
    import asyncio

    limit = str(calls + idle + 10)
    with echo_lab(["--max-session-flows", "0", "--tcp-max-per-source", limit,
                    "--tcp-max-connections", limit]) as (lab, pid, _echo):
        rss0, cpu0 = _rss_kib(pid), process_cpu_s(pid)
        marks: dict = {}
        samples: dict = {}

        def run() -> dict:
            loop = asyncio.new_event_loop()
            task = loop.create_task(_calls((lab.relay_public.ip4, TCP_PORT), calls, seconds, marks, idle))
            while "idle" not in marks:
                loop.run_until_complete(asyncio.sleep(0.05))
            samples.update(idle_rss=_rss_kib(pid), idle_kernel=_socket_memory(lab))
            marks["go"] = True
            while "open" not in marks:
                loop.run_until_complete(asyncio.sleep(0.05))
            samples.update(rss=_rss_kib(pid), cpu=process_cpu_s(pid), kernel=_socket_memory(lab))
            result = loop.run_until_complete(task)
            samples["cpu_end"] = process_cpu_s(pid)
            loop.close()
            return result

        result = lab.in_netns(lab.client.netns, run, timeout=calls * 0.5 + seconds + 120)
        result["relay_frames"] = control(lab, lambda c: c.health())["ice_tcp"]["frames"]   # in/out/dropped
        busy = marks["done"] - marks["open"]
        cpu = samples["cpu_end"] - samples["cpu"]
        relayed = 2 * result["received"]
        kernel = samples["kernel"]
        per_conn = kernel["tcp_buffer_bytes"] + kernel["udp_buffer_bytes"]
        return {"calls": calls, "idle": idle, "seconds": round(busy, 2), "packets_per_call_per_s": 50,   # each way
                **result, "kernel_sockets": kernel, "kernel_sockets_idle": samples["idle_kernel"],
                "agent_rss_kib_per_idle_connection": (round((samples["idle_rss"] - rss0) / idle, 1)
                                                      if idle else None),
                "kernel_buffer_bytes_per_connection": round(per_conn / max(1, kernel["tcp_connections"])),
                "agent_cpu_fraction": round(cpu / busy, 3),
                "agent_cpu_ns_per_packet": round(cpu * 1e9 / relayed) if relayed else None,
                "packets_per_call_per_s_achieved": round(result["received"] / calls / busy, 1),
                # a call is 100 relayed packets/s (50 each way)
                "calls_per_core_at_this_cost": round(relayed / (cpu * 100)) if cpu and relayed else None,
                "agent_rss_kib_per_call": round((samples["rss"] - samples["idle_rss"]) / calls, 1),
                "setup_cpu_s": round(samples["cpu"] - cpu0, 3)}



def _rss_kib(pid: int) -> int:
    return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
