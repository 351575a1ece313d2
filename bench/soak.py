"""Soak: continuous call churn through the XDP relay while the relay and the transceiver are disturbed.

``python -m splitrelay.bench.soak --minutes 60`` (``make soak``) builds a lab with one XDP relay and one
transceiver of two worker processes (``transceiver serve --processes 2``, echo handler), and keeps about
``concurrency`` calls up: each a libdatachannel call (client/node/whip_call.js ``--serve --send-opus``:
one node process places every call, pre-encoded Opus so callers cost no codec) that holds a random time
and reports the gaps in the echo it hears.  Meanwhile the relay's XDP program is reloaded (``edge attach`` over the
running relay, as a deploy of a new build does), the edge agent is restarted, and one transceiver worker
is killed once.  Every ``sample_s`` it reads RSS and open files of every process, the agent's counters
and map fill, and the live calls.  ``assess`` (bench/soak_report.py) turns that into the pass/fail lines
the CI test asserts.

The agent restart is a crash (SIGKILL) and a new agent: the lab's agents run with ``--detach-on-exit``
(so ``lab down`` leaves nothing pinned), which a SIGTERM would honour by removing the maps.  The maps,
the per-CPU counters among them, are pinned, so the new agent adopts them and every raw counter must
read at least what it read before the restart or a reload; a counter that went back is a failure (the
agent's /metrics also hides resets, edge/metrics.py, but that is in-process and starts over).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from splitrelay.bench.capacity_load import lag_buckets
from splitrelay.bench.soak_plan import NOMINAL_MINUTES, SoakPlan, plan
from splitrelay.bench.soak_report import UNFREED_METRIC, assess, compact, gauge_by_worker, plot, summary
from splitrelay.client.node_call import NODE_DIR, SCRIPT, unavailable_reason
from splitrelay.wire.control_client import ControlError
from splitrelay.errors import SplitrelayError
from splitrelay.lab.netns import nsenter_argv
from splitrelay.lab.stack import admin_get, admin_url, control, spawn_agent, start_lab, start_transceiver
from splitrelay.lab.stack import stop_lab, wait_ready, whip_token, whip_url
from splitrelay.lab.topology import Lab
from splitrelay.tokens import TOKEN_ENV

SETTLE_S = 30.0               # after the last call: sessions and flows gone within this
CONNECT_TIMEOUT_S = 30.0      # a caller's offer to DTLS-connected; covers an agent restart's compile
COMPILE_NICE = 10             # the reload's and the restarted agent's bcc compile: a relay host does not share
                              # its cores with transceivers; here a compile at normal priority took one of
                              # the 2 cores and the echo of 4 calls stalled 1.2-1.4 s (load 10); at nice 19
                              # a reload took 76 s at load 10
SETUP_BACKOFF_S = 2.0         # a slot whose call failed to connect waits this long before its next call
FORWARDED = {"ingress": "in_forwarded_pps", "egress": "out_forwarded_pps"}


class SoakError(SplitrelayError):
    """The soak could not run or a disturbance could not be applied (one-line reason)."""


def write_tone(path: Path, seconds: float = 1.0, frequency: float = 440.0) -> Path:
    """``seconds`` of a tone as 20 ms Opus frames, each after its 2-byte length (whip_call.js --send-opus)."""
    import math
    from array import array

    from splitrelay.transceiver.opus import OpusEncoder

    encoder, out = OpusEncoder(), bytearray()
    for frame in range(int(seconds * 50)):
        pcm = array("h", (int(8000 * math.sin(2 * math.pi * frequency * (frame * 960 + i) / 48000))
                          for i in range(960)))
        packet = encoder.encode(pcm.tobytes())
        out += len(packet).to_bytes(2, "big") + packet
    path.write_bytes(out)
    return path


def proc_usage(pid: int) -> tuple[int, int, float] | None:
    """(RSS in KiB, open file descriptors, CPU seconds) of a live process, None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime
        return rss, len(os.listdir(f"/proc/{pid}/fd")), cpu
    except (OSError, StopIteration, ValueError, IndexError):
        return None


class Callers:
    """One node process that places every call (whip_call.js ``--serve``): a request line per call, its
    report a line back.  A node process per call, as before, took a third of a core each to start and
    ~40 MiB: 30 of them starved the two workers of this 2-core host (106 of 374 calls dropped in 10
    minutes, RELIABILITY.md).  A process that exits fails its calls in progress; the next call starts a
    new one."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv, self.env = argv, env
        self.proc: asyncio.subprocess.Process | None = None
        self.waiting: dict[int, asyncio.Future] = {}
        self.reader: asyncio.Task | None = None
        self.stderr_tail = b""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    async def call(self, index: int, hold_ms: int, timeout_s: float) -> dict:
        """The call's report (whip_call.js's JSON), or a report of why there is none."""
        if self.pid is None:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=NODE_DIR,
                env=self.env, limit=1 << 22)
            self.reader = asyncio.ensure_future(self._read(self.proc))
        future = asyncio.get_running_loop().create_future()
        self.waiting[index] = future
        try:
            self.proc.stdin.write(json.dumps({"id": index, "hold_ms": hold_ms}).encode() + b"\n")
            await self.proc.stdin.drain()
            return await asyncio.wait_for(future, timeout_s)
        except (TimeoutError, ConnectionError):
            return {"ok": False, "error": f"the caller gave no report within {timeout_s:.0f} s"}
        finally:
            self.waiting.pop(index, None)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        stderr = asyncio.ensure_future(proc.stderr.read())
        while line := await proc.stdout.readline():
            with contextlib.suppress(json.JSONDecodeError, AttributeError):
                report = json.loads(line)
                future = self.waiting.get(report.pop("id", None))
                if future and not future.done():
                    future.set_result(report)
        await proc.wait()
        self.stderr_tail = (await stderr)[-500:]
        why = f"the caller gave no report (its process exited {proc.returncode}: " \
              f"{self.stderr_tail.decode(errors='replace')})"
        for future in self.waiting.values():
            if not future.done():
                future.set_result({"ok": False, "error": why})

    async def close(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.stdin.close()      # it exits once its calls in progress have reported
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
        if self.reader:
            await asyncio.gather(self.reader, return_exceptions=True)


class Soak:
    """One run: the lab, the callers, the disturbances and the samples (``results()``)."""

    def __init__(self, p: SoakPlan, name: str | None = None, progress=None) -> None:  # noqa: ANN001
        self.plan, self.name = p, name
        self.progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
        self.lab: Lab | None = None
        self.calls: list[dict] = []
        self.events: list[dict] = []
        self.samples: list[dict] = []
        self.callers: Callers | None = None
        self.calls_live = 0
        self.agent_pid = self.supervisor_pid = 0
        self.t0 = time.time()
        self.killed_worker: int | None = None
        self.url, self.tone = "", Path()
        self.baseline_sessions = 0
        self.draining = False   # no call starts, no disturbance begins: the run is ending

    def now(self) -> float:
        return time.time() - self.t0

    def log(self, line: str) -> None:
        self.progress(f"soak {self.now():7.1f} s: {line}")

    # -- the lab --------------------------------------------------------------------------

    def start(self, tone: Path) -> None:
        info = start_lab(transceivers=1, handler=None, name=self.name)
        self.lab = Lab.load(info["name"])
        self.agent_pid = self.lab.pids[0]
        t = self.lab.transceivers[0]
        self.supervisor_pid = start_transceiver(self.lab, t, processes=2).pid
        self.lab.save()
        self.url, self.tone = whip_url(t), tone

    def stop(self) -> None:
        if self.callers and self.callers.pid:
            with contextlib.suppress(ProcessLookupError):
                self.callers.proc.kill()
        if self.lab is not None:
            stop_lab(self.lab.name)

    def workers(self) -> list[dict]:
        return json.loads(admin_get(self.lab, admin_url(self.lab.transceivers[0]), "/workers"))

    def reload_program(self) -> None:
        """``edge attach`` over the running relay: compile, adopt the pinned maps, attach the new program
        over the old one (the kernel swaps it atomically); the agent keeps running."""
        r = self.lab.relay(1)
        argv = [sys.executable, "-m", "splitrelay.cli.main", "edge", "attach", r.public.ifname,
                "--internal", r.internal.ifname, "--public-ip", r.public.ip4, "--public-ip", r.public.ip6,
                "--gateway-ip", r.client.ip4, "--instance", self.lab.name, "--port", str(self.lab.relay_port)]
        run = subprocess.run(nsenter_argv(r.netns, ["nice", "-n", str(COMPILE_NICE), *argv]), capture_output=True,
                             text=True, timeout=300)
        if run.returncode != 0:
            raise SoakError(f"edge attach exited {run.returncode}: {run.stderr.strip()[-300:]}")

    def restart_agent(self) -> dict:
        """SIGKILL, then a new agent that adopts the pinned maps; it serves no control request meanwhile."""
        killed = time.time()
        os.kill(self.agent_pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.agent_pid, 0)
        self.lab.pids.remove(self.agent_pid)
        proc, log_path = spawn_agent(self.lab)
        os.setpriority(os.PRIO_PROCESS, proc.pid, COMPILE_NICE)   # its compile; back to normal once it serves
        self.agent_pid = proc.pid
        self.lab.save()
        wait_ready(proc, log_path, "edge agent ready", "edge agent")
        os.setpriority(os.PRIO_PROCESS, proc.pid, 0)
        return {"down_s": round(time.time() - killed, 1)}

    def kill_worker(self) -> dict:
        # the worker with the most calls (ties: the last): the kill is meant to take calls, and with the short
        # run's 3 calls over 2 workers one of them is now and then empty (a CI run of 2026-12-08 killed one)
        victim = max(self.workers(), key=lambda w: (w["sessions"], w["worker"]))
        os.kill(victim["pid"], signal.SIGKILL)
        self.killed_worker = victim["worker"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            w = self.workers()[victim["worker"]]
            if w["ready"] and w["pid"] not in (None, victim["pid"]):
                return {"worker": victim["worker"], "pid": victim["pid"], "new_pid": w["pid"]}
            time.sleep(0.2)
        raise SoakError(f"worker {victim['worker']} was not restarted within 60 s")

    # -- the run --------------------------------------------------------------------------

    async def run(self) -> None:
        self.t0 = time.time()
        self.baseline_sessions = len(await asyncio.to_thread(control, self.lab, lambda c: c.sessions()))
        argv = nsenter_argv(self.lab.client.netns, [
            "node", str(SCRIPT), "--serve", "--stack", "libdatachannel", "--timeout-ms",
            str(int(CONNECT_TIMEOUT_S * 1000)), "--send-opus", str(self.tone), self.url])
        self.callers = Callers(argv, {**os.environ, TOKEN_ENV: whip_token(self.lab)})   # the token: not in argv
        sampler, faults = asyncio.ensure_future(self._sampler()), asyncio.ensure_future(self._faults())
        try:
            await self._churn()
            self.draining = True
            await faults          # the disturbance under way ends (the agent serves again); no other begins
            await self.callers.close()
            await self._settle()
        finally:
            for task in (sampler, faults):
                task.cancel()
            await asyncio.gather(sampler, faults, return_exceptions=True)
        self.samples.append(await asyncio.to_thread(self.sample))

    async def _churn(self) -> None:
        """Keep ``concurrency`` callers up: the first spread over the shortest call, then one new caller
        whenever one ends, while a call still fits before the end (so the last minutes drain)."""
        p, rng, running = self.plan, random.Random(os.getpid()), set()
        # arrivals at most twice the steady rate (concurrency / mean length): slots freed together, say by
        # refusals while the agent was down, do not all set up at once
        self._spacing = (p.call_min_s + p.call_max_s) / 2 / p.concurrency / 2
        self._next_start = 0.0
        for i in range(p.concurrency):
            running.add(asyncio.ensure_future(self._call(rng, delay=i * p.call_min_s / p.concurrency)))
        while running:
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                connected = task.result()
                if p.duration_s - self.now() >= p.call_min_s + CONNECT_TIMEOUT_S / 3 and not self.draining:
                    running.add(asyncio.ensure_future(self._call(rng, 0.0 if connected else SETUP_BACKOFF_S)))

    async def _call(self, rng: random.Random, delay: float = 0.0) -> bool:
        """One caller from offer to hang-up; True when it connected."""
        await asyncio.sleep(delay)
        start = max(time.monotonic(), self._next_start)
        self._next_start = start + self._spacing
        await asyncio.sleep(start - time.monotonic())
        left = self.plan.duration_s - self.now() - 5.0
        hold = round(min(rng.uniform(self.plan.call_min_s, self.plan.call_max_s), max(left, 1.0)), 1)
        call = {"index": len(self.calls), "hold_s": hold, "started_at": time.time(), "report": None}
        self.calls.append(call)
        self.calls_live += 1
        try:
            report = await self.callers.call(call["index"], int(hold * 1000), hold + CONNECT_TIMEOUT_S + 30)
        finally:
            self.calls_live -= 1
            call["ended_at"] = time.time()
        report.pop("events", None)
        if not report.get("ok") and self.callers.stderr_tail:
            report.setdefault("stderr", self.callers.stderr_tail.decode(errors="replace"))
        call["report"] = report
        return "audio" in call["report"]

    async def _faults(self) -> None:
        p = self.plan
        restarts = [k * p.restart_every_s for k in range(1, int(p.duration_s // p.restart_every_s) + 1)
                    if k * p.restart_every_s < p.duration_s - p.call_min_s]
        reloads = [k * p.reload_every_s for k in range(1, int(p.duration_s // p.reload_every_s) + 1)
                   if k * p.reload_every_s < p.duration_s - p.call_min_s and k * p.reload_every_s not in restarts]
        schedule = sorted([(t, "reload", self.reload_program) for t in reloads]
                          + [(t, "agent_restart", self.restart_agent) for t in restarts], key=lambda e: e[0])
        kill = asyncio.ensure_future(self._disturb(p.kill_at_s, "worker_kill", self.kill_worker))
        try:   # the relay's, one at a time; one more than half a reload late (a slow compile) is skipped
            for at, what, action in schedule:
                if self.now() - at > p.reload_every_s / 2:
                    self.log(f"{what} of {at:.0f} s skipped: the one before ended late")
                    continue
                await self._disturb(at, what, action)
            await kill
        finally:
            kill.cancel()

    async def _disturb(self, at: float, what: str, action) -> None:  # noqa: ANN001
        await asyncio.sleep(max(0.0, at - self.now()))
        if self.draining:
            return
        started = time.time()
        detail = await asyncio.to_thread(action)
        self.events.append({"what": what, "at": started, "done": time.time(), **(detail or {})})
        self.log(f"{what} done in {time.time() - started:.1f} s")

    async def _sampler(self) -> None:
        while True:
            sample = await asyncio.to_thread(self.sample)
            self.samples.append(sample)
            self.log(f"{sample['calls_live']} calls live, {len(self.calls)} started; flows {sample['flows']}, "
                     f"in {sample.get('in_forwarded_pps', 0):.0f} pkt/s")
            await asyncio.sleep(self.plan.sample_s)

    async def _settle(self) -> None:
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:   # the supervisor counts each worker's sessions every 0.5 s
            with contextlib.suppress(ControlError):
                fill = await asyncio.to_thread(self.map_fill)
                live = sum(w["sessions"] for w in await asyncio.to_thread(self.workers))
                if fill["flows"] == fill["call_sessions"] == live == 0:
                    return
            await asyncio.sleep(1.0)

    # -- what is measured -------------------------------------------------------------------

    def map_fill(self) -> dict:
        flows = control(self.lab, lambda c: c.flows())
        sessions = control(self.lab, lambda c: c.sessions())
        return {"flows": len(flows), "pending": sum(1 for f in flows if f["pending"]), "sessions": len(sessions),
                # a session no packet used yet is one of the transceivers' ready ufrags (transceiver/ufrag_pool.py)
                "call_sessions": sum(1 for s in sessions if s["flows_opened"])}

    def sample(self) -> dict:
        at = time.time()
        procs = {"agent": self.agent_pid, "supervisor": self.supervisor_pid}
        live_sessions = None
        with contextlib.suppress(Exception):   # a worker being restarted, the supervisor polling it
            workers = self.workers()
            live_sessions = sum(w["sessions"] for w in workers)
            procs.update({f"worker{w['worker']}": w["pid"] for w in workers if w["pid"]})
        usage = {name: {"pid": pid, "rss_kib": u[0], "fds": u[1], "cpu_s": u[2]} for name, pid in procs.items()
                 if pid and (u := proc_usage(pid))}
        callers = proc_usage(self.callers.pid) if self.callers and self.callers.pid else None
        if callers:
            usage["callers"] = {"pid": self.callers.pid, "rss_kib": callers[0], "fds": callers[1],
                                "cpu_s": callers[2], "calls": self.calls_live}
        own = proc_usage(os.getpid())
        usage["soak"] = {"pid": os.getpid(), "rss_kib": own[0], "fds": own[1]}
        sample = {"t": at - self.t0, "calls_live": self.calls_live, "calls_started": len(self.calls),
                  "loadavg": float(Path("/proc/loadavg").read_text().split()[0]),   # the host is shared
                  "transceiver_sessions": live_sessions, "procs": usage}
        with contextlib.suppress(ControlError):   # the agent being restarted
            counters = control(self.lab, lambda c: c.stats())["counters"]
            sample["counters"] = {c["name"]: c["packets"] for c in counters}
            sample["verdicts"] = {}
            for c in counters:
                key = f"{c['direction']}_{c['verdict']}"
                sample["verdicts"][key] = sample["verdicts"].get(key, 0) + c["packets"]
            sample.update(self.map_fill())
        previous = next((s for s in reversed(self.samples) if "verdicts" in s), None)
        if previous and "verdicts" in sample:
            dt = sample["t"] - previous["t"]
            for direction, key in FORWARDED.items():
                sample[key] = (sample["verdicts"].get(f"{direction}_forwarded", 0)
                               - previous["verdicts"].get(f"{direction}_forwarded", 0)) / dt
        with contextlib.suppress(Exception):   # a worker being restarted: the next sample has it
            text = admin_get(self.lab, admin_url(self.lab.transceivers[0]), "/metrics").decode()
            sample["loop_lag"] = {w: {str(le): n for le, n in b.items()}
                                  for w, b in lag_buckets(text, by="worker").items()}
            sample["unfreed"] = gauge_by_worker(text, UNFREED_METRIC)
        sample.setdefault("flows", None)
        return sample

    def results(self) -> dict:
        return {"plan": asdict(self.plan), "lab": self.lab.name if self.lab else None, "t0": self.t0,
                "baseline_sessions": self.baseline_sessions, "killed_worker": self.killed_worker,
                "events": self.events, "calls": self.calls, "samples": self.samples}



def run_soak(p: SoakPlan, name: str | None = None, progress=None) -> dict:  # noqa: ANN001
    """Run the soak described by ``p`` in a new lab (removed after); returns its results with ``summary``
    and ``failures`` (what ``assess`` found)."""
    import tempfile

    reason = unavailable_reason("libdatachannel")
    if reason:
        raise SoakError(reason)
    soak = Soak(p, name, progress)
    with tempfile.TemporaryDirectory(prefix="splitrelay-soak-") as tmp:
        tone = write_tone(Path(tmp) / "tone.opus")
        try:
            soak.start(tone)
            soak.log(f"lab {soak.lab.name} up; {p.concurrency} callers of {p.call_min_s:g}-{p.call_max_s:g} s for "
                     f"{p.minutes:g} min; reload every {p.reload_every_s:g} s, agent restart every "
                     f"{p.restart_every_s:g} s, worker kill at {p.kill_at_s:g} s")
            asyncio.run(soak.run())
        finally:
            soak.stop()
    results = soak.results()
    results["summary"] = summary(results)
    results["failures"] = assess(results, results["summary"])
    return results


def _call_range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition("-")
    try:
        pair = float(lo), float(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--call-seconds must be LO-HI, got {text!r}") from None
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"--call-seconds must be LO-HI with 1 <= LO <= HI, got {text!r}")
    return pair


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m splitrelay.bench.soak",
        description="Call churn through the XDP relay while its program is reloaded, its agent restarted and "
                    "a transceiver worker killed; exit 1 when a call dropped, memory grew, a map did not empty or "
                    "a counter went back. Needs root (a lab); progress lines on stderr.")
    parser.add_argument("--minutes", type=float, default=NOMINAL_MINUTES, help="length of the run (default 60)")
    parser.add_argument("--concurrency", type=int, help="calls kept up (default 30, 3 below 10 minutes)")
    parser.add_argument("--call-seconds", type=_call_range, metavar="LO-HI",
                        help="each call's random length (default 10-120, at most a sixth of the run)")
    parser.add_argument("--name", help="lab name (default: a random one)")
    parser.add_argument("--json", action="store_true", help="print the summary and failures as JSON")
    parser.add_argument("--results", type=Path, help="write every call, event and sample here (JSON)")
    parser.add_argument("--plots", type=Path, help="write soak-<minutes>min.png into this directory")
    args = parser.parse_args(argv)
    p = plan(args.minutes, args.concurrency, args.call_seconds)
    try:
        results = run_soak(p, args.name)
    except SplitrelayError as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 2
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(compact(results), indent=None, separators=(",", ":")) + "\n")
    if args.plots:
        print(f"soak: plot {plot(results, args.plots)}", file=sys.stderr)
    if args.json:
        print(json.dumps({"plan": results["plan"], "summary": results["summary"], "failures": results["failures"]},
                         indent=1))
    else:
        s = results["summary"]
        print(f"soak {p.minutes:g} min: {s['calls_started']} calls started, {s['calls_completed']} completed, "
              f"{s['calls_dropped']} dropped, {s['calls_killed']} taken by the worker kill, {s['calls_refused']} "
              f"refused while the agent was down, {s['calls_rejected']} rejected, {s['calls_failed']} failed to "
              f"connect; events {s['events']}; "
              f"final fill {s['final_fill']}; ended sessions still in memory at most {s['unfreed_max']}; "
              f"worker loops late by 250 ms or more: {s['loop_stalls'] or 'never'}")
        for line in results["failures"]:
            print(f"FAIL: {line}")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
