// One WHIP call (RFC 9725) from a standard non-browser WebRTC stack, timed at the client.
//
//   node whip_call.js --stack libdatachannel|werift [--timeout-ms N] [--calls N] [--hold-ms N]
//                     [--dead-candidate IP:PORT] WHIP_URL
//
// Offers one sendrecv Opus audio m-line (what the transceiver requires, transceiver/whip.py check_offer)
// with all candidates (no trickle), POSTs it, applies the answer and waits for the client's own ICE
// "connected" and its peer connection "connected" (= DTLS done: the SRTP keys exist), then DELETEs the
// session and prints one JSON object (a line) on stdout. Times are ms from the POST leaving
// (performance.now()). Everything here is the stack's public API: nothing about the call is staged.
"use strict";

const STACKS = ["libdatachannel", "werift"];
const GATHERING_TIMEOUT_MS = 5000;

function parseArgs(argv) {
  const out = { stack: null, timeoutMs: 20000, calls: 1, holdMs: 0, deadCandidate: null, url: null };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--stack") out.stack = argv[++i];
    else if (argv[i] === "--timeout-ms") out.timeoutMs = Number(argv[++i]);
    else if (argv[i] === "--calls") out.calls = Number(argv[++i]);
    else if (argv[i] === "--hold-ms") out.holdMs = Number(argv[++i]);
    else if (argv[i] === "--dead-candidate") out.deadCandidate = argv[++i];
    else out.url = argv[i];
  }
  if (!STACKS.includes(out.stack) || !out.url || !(out.timeoutMs > 0) || !(out.calls >= 1) || !(out.holdMs >= 0)) {
    process.stderr.write(`usage: node whip_call.js --stack ${STACKS.join("|")} [--timeout-ms N] [--calls N] [--hold-ms N] [--dead-candidate IP:PORT] WHIP_URL\n`);
    process.exit(2);
  }
  return out;
}

// Both stacks behind one face: offer() -> SDP with candidates, answer(sdp), on(kind, state), close().
function libdatachannel(record) {
  const ndc = require("node-datachannel");
  const pc = new ndc.PeerConnection("splitrelay", { iceServers: [] });
  const audio = new ndc.Audio("0", "SendRecv");
  audio.addOpusCodec(111);
  audio.addSSRC(1 + Math.floor(Math.random() * 0xfffffff0), "splitrelay", "splitrelay", "audio");
  const track = pc.addTrack(audio);
  track.onMessage(() => record("rtp", null));   // the transceiver's audio (it sends silence when quiet)
  pc.onIceStateChange((s) => record("ice", s));
  pc.onStateChange((s) => record("connection", s));
  return {
    version: packageVersion("node-datachannel"),
    offer() {
      return new Promise((resolve) => {
        const timer = setTimeout(() => resolve(pc.localDescription().sdp), GATHERING_TIMEOUT_MS);
        pc.onGatheringStateChange((s) => {
          if (s === "complete") { clearTimeout(timer); resolve(pc.localDescription().sdp); }
        });
        pc.setLocalDescription();
      });
    },
    async answer(sdp) { pc.setRemoteDescription(sdp, "answer"); },
    close() { pc.close(); },  // ndc.cleanup() here segfaults node-datachannel 0.33.4 (exit 139)
  };
}

function werift(record) {
  const w = require("werift");
  const pc = new w.RTCPeerConnection({ iceServers: [] });
  pc.addTransceiver("audio", { direction: "sendrecv" });
  pc.onTrack.subscribe((track) => track.onReceiveRtp.subscribe(() => record("rtp", null)));
  pc.iceConnectionStateChange.subscribe((s) => record("ice", s));
  pc.connectionStateChange.subscribe((s) => record("connection", s));
  return {
    version: packageVersion("werift"),
    async offer() {
      const gathered = new Promise((resolve) => {
        const timer = setTimeout(resolve, GATHERING_TIMEOUT_MS);
        pc.iceGatheringStateChange.subscribe((s) => { if (s === "complete") { clearTimeout(timer); resolve(); } });
      });
      await pc.setLocalDescription(await pc.createOffer());
      await gathered;
      return pc.localDescription.sdp;
    },
    async answer(sdp) { await pc.setRemoteDescription({ type: "answer", sdp }); },
    close() { return pc.close(); },
  };
}

function packageVersion(name) {
  // neither package lists package.json in its "exports": find it by path above the entry point
  const fs = require("fs");
  const path = require("path");
  let dir = path.dirname(require.resolve(name));
  while (path.basename(dir) !== name && path.dirname(dir) !== dir) dir = path.dirname(dir);
  return JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8")).version;
}

// One call: offer, POST, answer, wait until connected (or the deadline), DELETE, close. Never throws.
async function oneCall(args) {
  const t0 = { at: null };
  const events = [];
  const waiters = [];
  const record = (what, value) => {
    events.push({ t: t0.at === null ? null : performance.now() - t0.at, what, value });
    for (const w of waiters.splice(0)) w();
  };
  const firstAt = (what, values) => {
    const e = events.find((e) => e.what === what && values.includes(e.value) && e.t !== null);
    return e ? e.t : null;
  };
  const result = { stack: args.stack, ok: false, ice_connected_ms: null, dtls_connected_ms: null, gap_ms: null,
                   answer_ms: null, answer_setup: null, delete_status: null, events, error: null };
  const peer = args.stack === "werift" ? werift(record) : libdatachannel(record);
  result.version = peer.version;
  let location = null;
  let timer = null;
  const deadline = new Promise((resolve) => {
    timer = setTimeout(() => resolve(`timeout: not connected within ${args.timeoutMs} ms`), args.timeoutMs);
  });

  async function connect() {
    const offer = await peer.offer();
    t0.at = performance.now();
    const headers = { "Content-Type": "application/sdp" };
    const token = process.env.SPLITRELAY_WHIP_TOKEN;   // the offer token (splitrelay/tokens.py TOKEN_ENV)
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(args.url, { method: "POST", headers, body: offer });
    const answer = await response.text();
    result.answer_ms = performance.now() - t0.at;
    if (response.status !== 201) return `WHIP POST answered ${response.status}: ${answer.trim().slice(0, 200)}`;
    location = new URL(response.headers.get("Location"), args.url).href;
    const setup = /^a=setup:(\S+)/m.exec(answer);
    result.answer_setup = setup ? setup[1] : null;
    await peer.answer(args.deadCandidate ? withDeadCandidate(answer, args.deadCandidate) : answer);
    for (;;) {
      const ice = firstAt("ice", ["connected", "completed"]);
      const dtls = firstAt("connection", ["connected"]);
      if (firstAt("connection", ["failed", "closed"]) !== null) return "the peer connection failed";
      if (ice !== null && dtls !== null) {
        Object.assign(result, { ok: true, ice_connected_ms: ice, dtls_connected_ms: dtls, gap_ms: dtls - ice });
        return null;
      }
      await new Promise((resolve) => waiters.push(resolve));
    }
  }

  try {
    result.error = await Promise.race([connect(), deadline]);
  } catch (e) {
    result.error = String(e && e.message || e).split("\n")[0];
  }
  clearTimeout(timer);
  if (!result.error && args.holdMs > 0) {   // --hold-ms: stay in the call, count the audio that comes
    await new Promise((resolve) => setTimeout(resolve, args.holdMs));
    if (firstAt("connection", ["failed", "closed", "disconnected"]) !== null) result.error = "the call dropped";
  }
  const rtp = events.filter((e) => e.what === "rtp" && e.t !== null);
  result.rtp_in = rtp.length;
  result.last_rtp_ms = rtp.length ? rtp[rtp.length - 1].t : null;
  result.events = events.filter((e) => e.what !== "rtp");
  if (result.error) result.ok = false;
  if (location) {
    try { result.delete_status = (await fetch(location, { method: "DELETE" })).status; } catch (e) { /* stays null */ }
  }
  try { await peer.close(); } catch (e) { /* closing a failed peer */ }
  return result;
}

// --dead-candidate IP:PORT: the answer gets one more server candidate, of the highest priority, at an
// address that never answers (a broken path, e.g. IPv6 in the field), so its pair stays in progress.
function withDeadCandidate(sdp, hostPort) {
  const [host, port] = [hostPort.slice(0, hostPort.lastIndexOf(":")), hostPort.slice(hostPort.lastIndexOf(":") + 1)];
  return sdp.replace(/^(a=candidate:.*)$/m, `a=candidate:deadpath 1 udp 2147483647 ${host} ${port} typ host\r\n$1`);
}

// --hold-ms N: each call stays up N ms once connected (rtp_in, last_rtp_ms: the audio werift's track
// received; libdatachannel's track reports none here, though the transceiver sends it audio).
// --calls N: N calls one after another in this process, one JSON line each (a long-running agent's
// view: the first call also pays for loading and compiling the stack's JavaScript and crypto code).
async function main() {
  const args = parseArgs(process.argv.slice(2));
  let failed = false;
  for (let i = 0; i < args.calls; i++) {
    const result = await oneCall(args);
    process.stdout.write(JSON.stringify(result) + "\n");
    failed = failed || !result.ok;
  }
  process.exit(failed ? 1 : 0);
}

main();
