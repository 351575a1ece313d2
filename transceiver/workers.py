"""One transceiver process per core: a supervisor, its workers, and the one WHIP URL in front of them.

Python runs one core per process, so a host serves calls on every core by running one
``transceiver serve --processes 1`` per core.  Each worker is its own backend (its own id, carried
in its ufrags' routing hint, and its own UDP port) and registers itself and its sessions with every
relay, so relays need nothing new.  The supervisor holds no session: it starts the workers, restarts
a dead one (counting the restart and the calls it took with it), stops them all on SIGTERM/SIGINT,
and serves the host's one WHIP URL, passing each offer to the least-loaded worker and each session's
later requests (DELETE, PATCH) to the worker that owns it.  Like a single transceiver it has two
listeners: the public one serves WHIP, ``/healthz`` and ``/readyz`` only; the admin one (service.py's
rules and guard) serves ``/workers``, ``/sessions`` and ``/metrics``, which join every worker's admin
listener (loopback) under one answer, each metric sample labelled with its ``worker``.  Workers check
offer tokens and answer CORS themselves; the supervisor forwards ``Authorization`` and ``Origin`` and
shapes its own refusals with the same CORS rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from splitrelay.errors import SplitrelayError
from splitrelay.transceiver.admission import Admission, Refused
from splitrelay.transceiver.relays import SignalingFacts
from splitrelay.transceiver.listeners import admin_auth, serve_app
from splitrelay.transceiver.whip import MAX_OFFER, cors_headers
from splitrelay.wire.whip import SESSION_ID

log = logging.getLogger(__name__)

READY = re.compile(r"transceiver ready: WHIP (http://\S+?)/whip admin (http://\S+)")
READY_TIMEOUT = 60.0      # a worker's start (aiortc import, relay registration); bounds failures only
POLL_INTERVAL = 0.5       # how often each worker's live sessions are read (offer placement, lost calls)
RESTART_DELAY = 0.5       # between a worker's death and its restart; doubles up to RESTART_DELAY_MAX
RESTART_DELAY_MAX = 10.0  # while it keeps dying within STABLE_AFTER of its start
STABLE_AFTER = 10.0
STOP_GRACE = 10.0         # after the workers' own drain timeout, SIGKILL what is left
BODY_TIMEOUT = 5.0        # a client must send its whole request within this (as the worker's own WHIP)
PREFERRED = "X-Splitrelay-Relay"   # the relay the supervisor chose for an offer; workers' --prefer-header
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}
PR_SET_PDEATHSIG = 1


class SupervisorError(SplitrelayError):
    """The workers could not be started (one-line reason)."""


@dataclass(eq=False)
class Worker:
    """One worker process slot: the process now in it, and what the supervisor knows of it."""

    index: int
    backend_id: int
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    base_url: str | None = None          # its own WHIP listener, loopback, e.g. http://127.0.0.1:41234
    admin_url: str | None = None         # its own admin listener, loopback
    sessions: int = 0                    # live sessions at the last poll
    placed: int = 0                      # offers it answered that the last poll may not have seen
    offering: int = 0                    # offers it is answering now
    started_at: float = 0.0
    last_words: str | None = None        # the last log line of a process that died before it was ready
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    @property
    def load(self) -> int:
        return self.sessions + self.placed + self.offering


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the supervisor dies, even by SIGKILL (no orphans)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class SupervisorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.restarts = Counter("splitrelay_transceiver_worker_restarts", "Worker processes restarted after "
                                "they died", ["worker"], registry=r)
        self.sessions_lost = Counter("splitrelay_transceiver_worker_sessions_lost",
                                     "Live sessions a dying worker took with it (as last polled, and those "
                                     "answered since)", ["worker"],
                                     registry=r)
        self.refused = Counter("splitrelay_transceiver_front_offers_refused", "Offers and ICE restarts the "
                               "supervisor refused for their source's rate (workers count the rest)", ["reason"],
                               registry=r)
        self.up = Gauge("splitrelay_transceiver_worker_up", "1 while the worker process runs and serves WHIP",
                        ["worker", "backend"], registry=r)


def merge_scrapes(texts: dict[str, str]) -> list[Metric]:
    """Every worker's Prometheus text as one set of families, each sample labelled ``worker``."""
    families: dict[str, Metric] = {}
    for worker, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            for s in family.samples:
                merged.add_sample(s.name, {"worker": worker, **s.labels}, s.value, s.timestamp)
    return list(families.values())


class Supervisor:
    """Starts ``len(argvs)`` workers and serves the host's WHIP URL in front of them.

    ``argvs[i]`` starts worker ``i`` (``backend_ids[i]``); each must print the transceiver's ready line.
    """

    def __init__(self, argvs: list[list[str]], backend_ids: list[int], whip_host: str, whip_port: int,
                 drain_timeout: float = 0.0, env: dict[str, str] | None = None,
                 echo: Callable[[str], None] | None = None,
                 prefer: Callable[[SignalingFacts], str | None] | None = None,
                 admission: Admission | None = None, admin_host: str = "127.0.0.1", admin_port: int = 0,
                 admin_token: str | None = None, cors_origins: tuple[str, ...] = ()) -> None:
        self.workers = [Worker(i, b, argv) for i, (argv, b) in enumerate(zip(argvs, backend_ids, strict=True))]
        self.whip_host, self.whip_port = whip_host, whip_port
        self.admin_host, self.admin_port, self.admin_token = admin_host, admin_port, admin_token
        self.cors_origins = cors_origins   # the workers' --cors-origin: for the front's own refusals
        self.drain_timeout = drain_timeout
        self.env = env
        self.prefer = prefer      # --prefer/--prefer-header, applied here where the client's address is known
        self.admission = admission  # the offer rate per source, for the same reason (workers run without)
        self.echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.metrics = SupervisorMetrics()
        for w in self.workers:  # present (0) from the first scrape, so a rate() sees the first restart
            self.metrics.restarts.labels(str(w.index))
            self.metrics.sessions_lost.labels(str(w.index))
        self.draining = False
        self.stopping = False
        self._tasks: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    # -- the workers ------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker, wait until each serves WHIP, then open the host's WHIP listener."""
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._tasks = [asyncio.ensure_future(self._keep(w)) for w in self.workers]
        self._tasks.append(asyncio.ensure_future(self._poll()))
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(w.ready.is_set() for w in self.workers):
            failed = next((w for w in self.workers if w.last_words is not None and not w.ready.is_set()), None)
            if failed:
                raise SupervisorError(f"worker {failed.index} (backend {failed.backend_id}) exited before it "
                                      f"was ready: {failed.last_words.removeprefix('splitrelay: error: ')}")
            if time.monotonic() > deadline:
                late = [w.index for w in self.workers if not w.ready.is_set()]
                raise SupervisorError(f"workers {late} did not become ready within {READY_TIMEOUT:.0f} s")
            await asyncio.sleep(0.05)
        self._runner, self.whip_port = await serve_app(self.app(), self.whip_host, self.whip_port, public=True)
        self._admin_runner, self.admin_port = await serve_app(self.admin_app(), self.admin_host, self.admin_port)

    @property
    def whip_url(self) -> str:
        host = f"[{self.whip_host}]" if ":" in self.whip_host else self.whip_host
        return f"http://{host}:{self.whip_port}/whip"

    @property
    def admin_url(self) -> str:
        """The admin listener's base URL: ``/workers``, ``/sessions`` and ``/metrics`` are under it."""
        host = f"[{self.admin_host}]" if ":" in self.admin_host else self.admin_host
        return f"http://{host}:{self.admin_port}"

    async def _spawn(self, w: Worker) -> None:
        w.ready.clear()
        w.base_url, w.admin_url, w.sessions, w.placed, w.offering, w.last_words = None, None, 0, 0, 0, None
        w.started_at = time.monotonic()
        w.proc = await asyncio.create_subprocess_exec(
            *w.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=self.env, preexec_fn=_die_with_parent,
            start_new_session=True)  # a terminal's Ctrl-C reaches the supervisor only; it stops them
        log.info("worker %d (backend %d) started, pid %d", w.index, w.backend_id, w.proc.pid)

    async def _follow(self, w: Worker) -> None:
        """Copy the worker's log lines to ours (prefixed) and learn its WHIP address from its ready line."""
        assert w.proc is not None and w.proc.stderr is not None
        last = ""
        while line := await w.proc.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip()
            last = text or last
            if not w.ready.is_set() and (found := READY.search(text)):
                # not echoed as is: "transceiver ready" is the supervisor's own line, once all are
                w.base_url, w.admin_url = found.group(1), found.group(2)
                self.metrics.up.labels(str(w.index), str(w.backend_id)).set(1)
                w.ready.set()
                self.echo(f"[worker {w.index}] serving backend {w.backend_id}, pid {w.pid}, WHIP {w.base_url}")
                continue
            self.echo(f"[worker {w.index}] {text}")
        if not w.ready.is_set():
            w.last_words = last or "no output"

    async def _keep(self, w: Worker) -> None:
        """Run worker ``w`` until the supervisor stops, restarting it whenever it dies."""
        delay = RESTART_DELAY
        while not self.stopping:
            await self._spawn(w)
            await self._follow(w)
            code = await w.proc.wait()
            self.metrics.up.labels(str(w.index), str(w.backend_id)).set(0)
            w.ready.clear()
            if self.stopping:
                return
            lost = w.sessions + w.placed   # as last polled, and those answered since
            self.metrics.restarts.labels(str(w.index)).inc()
            self.metrics.sessions_lost.labels(str(w.index)).inc(lost)
            self.echo(f"worker {w.index} (pid {w.proc.pid}, backend {w.backend_id}) exited with {code}, "
                      f"taking {lost} sessions; restarting")
            delay = RESTART_DELAY if time.monotonic() - w.started_at > STABLE_AFTER else min(
                delay * 2, RESTART_DELAY_MAX)
            await asyncio.sleep(delay)

    async def _poll(self) -> None:
        """Each worker's live session count: where the next offer goes, and what a death costs."""
        while True:
            await asyncio.gather(*(self._count(w) for w in self.workers))
            await asyncio.sleep(POLL_INTERVAL)

    async def _count(self, w: Worker) -> None:
        if not (w.ready.is_set() and w.base_url):
            return
        seen = w.placed   # answered before this request left: counted in its answer
        try:
            async with self._http.get(w.base_url + "/healthz", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                w.sessions = int((await resp.json())["sessions"])
                w.placed -= seen
        except Exception as exc:  # noqa: BLE001 - a busy or dying worker; the count stays as it was
            log.info("worker %d: no session count (%s)", w.index, exc)

    def begin_stop(self) -> None:
        """From now on refuse offers and restart no worker (a worker may see the same signal first)."""
        self.stopping = self.draining = True

    async def stop(self) -> None:
        """SIGTERM every worker (by its PID: each drains for its own --drain-timeout), SIGKILL the
        ones still running after that plus STOP_GRACE, and close the WHIP listener."""
        self.begin_stop()
        running = [w.proc for w in self.workers if w.pid]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        if running:
            waits = [asyncio.ensure_future(p.wait()) for p in running]
            await asyncio.wait(waits, timeout=self.drain_timeout + STOP_GRACE)
            for proc in running:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    await proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self.workers:  # one spawned while the signal arrived: not drained, not left behind
            if w.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
                await w.proc.wait()
        for runner in (self._runner, self._admin_runner):
            if runner:
                await runner.cleanup()
        if self._http:
            await self._http.close()

    # -- the host's WHIP URL ------------------------------------------------------------

    def app(self) -> web.Application:
        """The public listener: WHIP and the probes a load balancer needs, nothing that names a call."""
        app = web.Application(client_max_size=MAX_OFFER)
        app.add_routes([
            web.post("/whip", self.offer),
            web.options("/whip", self.offer),
            web.route("*", "/whip/sessions/{id}", self.session_request),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
        ])
        return app

    def admin_app(self) -> web.Application:
        """The admin listener, behind the same guard as a single transceiver's."""
        app = web.Application(middlewares=[admin_auth(self.admin_token)])
        app.add_routes([
            web.get("/sessions", self.list_sessions),
            web.get("/metrics", self.scrape),
            web.get("/workers", self.list_workers),
            web.get("/healthz", self.healthz),
        ])
        return app

    def refusal(self, request: web.Request, status: int, reason: str,
                retry_after: int | None = None) -> web.Response:
        """The front's own refusal, shaped as a worker's (whip.py): one line, the workers' CORS rule,
        Retry-After for 429/503."""
        headers = {**cors_headers(request, self.cors_origins),
                   **({"Retry-After": str(retry_after)} if retry_after else {})}
        return web.Response(status=status, text=reason + "\n", headers=headers)

    def _choose(self) -> Worker | None:
        ready = [w for w in self.workers if w.ready.is_set() and w.base_url]
        return min(ready, key=lambda w: (w.load, w.index)) if ready else None

    async def offer(self, request: web.Request) -> web.Response:
        """An offer goes to the worker with the fewest live sessions; its answer names the session
        ``<worker>.<id>`` so that the session's later requests find their way back to it."""
        if request.method == "POST" and self.draining:
            return self.refusal(request, 503, "this transceiver is draining; try another", retry_after=5)
        if request.method == "POST" and (refused := self._over_rate(request)):
            return refused
        w = self._choose()
        if w is None:
            return self.refusal(request, 503, "no worker is ready; try again", retry_after=1)
        if request.method != "POST":
            return await self._forward(request, w, "/whip")
        w.offering += 1
        try:
            response = await self._forward(request, w, "/whip")
        finally:
            w.offering -= 1
        w.placed += response.status == 201
        return response

    async def session_request(self, request: web.Request) -> web.Response:
        worker, _, session_id = request.match_info["id"].partition(".")
        w = self.workers[int(worker)] if worker.isdigit() and int(worker) < len(self.workers) else None
        if w is None or not session_id or not w.ready.is_set():
            return self.refusal(request, 404, "no such session")
        if request.method == "PATCH" and (refused := self._over_rate(request)):
            return refused
        return await self._forward(request, w, f"/whip/sessions/{session_id}")

    def _over_rate(self, request: web.Request) -> web.Response | None:
        """429 when the client's source is past its offer rate (admission.py), else None."""
        if self.admission is None:
            return None
        try:
            self.admission.check_rate(request.remote)
        except Refused as exc:
            self.metrics.refused.labels(exc.why).inc()
            return self.refusal(request, exc.status, exc.reason, exc.retry_after)
        return None

    async def _forward(self, request: web.Request, w: Worker, path: str) -> web.Response:
        try:
            body = await asyncio.wait_for(request.read(), BODY_TIMEOUT)
        except TimeoutError:
            return self.refusal(request, 408, f"the request did not arrive within {BODY_TIMEOUT:g} s")
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in HOP_HEADERS and k.lower() != PREFERRED.lower()}   # a client's is forged
        if self.prefer and request.method == "POST" and path == "/whip":
            relay = self.prefer(SignalingFacts(remote=request.remote, headers=dict(request.headers)))
            if relay:
                headers[PREFERRED] = relay
        url = aiohttp.client.URL(w.base_url + path).with_query(request.query)
        try:
            async with self._http.request(request.method, url, data=body, headers=headers) as resp:
                answer = await resp.read()
                out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}
        except (aiohttp.ClientError, TimeoutError):
            return self.refusal(request, 503, f"worker {w.index} did not answer; try again", retry_after=1)
        if "Location" in out:   # the session's capability, prefixed with its worker: later requests find it
            out["Location"] = out["Location"].replace("/whip/sessions/", f"/whip/sessions/{w.index}.", 1)
        if SESSION_ID in out:   # its public id, as the admin listener's /sessions names it
            out[SESSION_ID] = f"{w.index}.{out[SESSION_ID]}"
        return web.Response(status=resp.status, body=answer, headers=out)

    async def _each(self, path: str) -> dict[Worker, bytes | None]:
        """GET ``path`` from every ready worker's admin listener at once (with the admin token: the
        workers have it too): its body, None if it did not answer 200."""
        async def one(w: Worker) -> tuple[Worker, bytes | None]:
            if not (w.ready.is_set() and w.admin_url):
                return w, None
            auth = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
            try:
                async with self._http.get(w.admin_url + path, headers=auth,
                                          timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    return w, await resp.read() if resp.status == 200 else None
            except (aiohttp.ClientError, TimeoutError):
                return w, None
        return dict(await asyncio.gather(*(one(w) for w in self.workers)))

    async def list_sessions(self, request: web.Request) -> web.Response:
        out = []
        path = "/sessions?ended=1" if request.query.get("ended") else "/sessions"
        for w, body in (await self._each(path)).items():
            for record in json.loads(body) if body else []:
                out.append({**record, "id": f"{w.index}.{record['id']}", "worker": w.index,
                            "backend_id": w.backend_id})
        return web.json_response(out)

    async def scrape(self, request: web.Request) -> web.Response:
        texts = {str(w.index): body.decode() for w, body in (await self._each("/metrics")).items() if body}
        registry = CollectorRegistry()
        families = merge_scrapes(texts)
        registry.register(type("Workers", (), {"collect": lambda self: families})())
        body = generate_latest(self.metrics.registry) + generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_workers(self, request: web.Request) -> web.Response:
        return web.json_response([
            {"worker": w.index, "pid": w.pid, "backend_id": w.backend_id, "ready": w.ready.is_set(),
             "sessions": w.sessions, "whip_url": w.base_url and w.base_url + "/whip"} for w in self.workers])

    async def healthz(self, request: web.Request) -> web.Response:
        up = sum(w.ready.is_set() for w in self.workers)
        return web.json_response({"status": "ok" if up else "down", "workers": len(self.workers), "up": up,
                                  "sessions": sum(w.sessions for w in self.workers)}, status=200 if up else 503)

    async def readyz(self, request: web.Request) -> web.Response:
        up = sum(w.ready.is_set() for w in self.workers)
        status = "draining" if self.draining else "ready" if up else "down"
        return web.json_response({"status": status, "workers": len(self.workers), "up": up},
                                 status=200 if status == "ready" else 503)
