// One WHIP call (RFC 9725) from a standard non-browser WebRTC stack, timed at the client.
//
//   node whip_call.js --stack libdatachannel|werift [--timeout-ms N] [--calls N | --serve] [--hold-ms N]
//                     [--dead-candidate IP:PORT] [--send-opus FILE] WHIP_URL
//
// Offers one sendrecv Opus audio m-line (what the transceiver requires, transceiver/whip.py check_offer)
// with all candidates (no trickle), POSTs it, applies the answer and waits for the client's own ICE
// "connected" and its peer connection "connected" (= DTLS done: the SRTP keys exist), then DELETEs the
// session and prints one JSON object (a line) on stdout (with libdatachannel, "certificate": what its
// DTLS hashed our certificate to, under which algorithm, also when it refused it). Times are ms from the POST leaving
// (performance.now()). Everything here is the stack's public API: nothing about the call is staged.
"use strict";

const STACKS = ["libdatachannel", "werift"];
const GATHERING_TIMEOUT_MS = 5000;
const OPUS_PT = 111;
const FRAME_MS = 20;            // one pre-encoded Opus frame per RTP packet, 960 samples at 48 kHz
const VOICED_MIN_BYTES = 55;    // an Opus payload at least this long carries the tone: the transceiver sends
                                // 32-40 byte frames of silence when the echo has nothing, the tone is 74-115
const GAP_REPORT_MS = 200;      // gaps in the heard audio at least this long are listed (absolute times)
const GAPS_LISTED = 100;

function parseArgs(argv) {
  const out = { stack: null, timeoutMs: 20000, calls: 1, holdMs: 0, deadCandidate: null, sendOpus: null, serve: false,
                url: null };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--stack") out.stack = argv[++i];
    else if (argv[i] === "--timeout-ms") out.timeoutMs = Number(argv[++i]);
    else if (argv[i] === "--calls") out.calls = Number(argv[++i]);
    else if (argv[i] === "--hold-ms") out.holdMs = Number(argv[++i]);
    else if (argv[i] === "--dead-candidate") out.deadCandidate = argv[++i];
    else if (argv[i] === "--send-opus") out.sendOpus = argv[++i];
    else if (argv[i] === "--serve") out.serve = true;
    else out.url = argv[i];
  }
  const sendOk = out.sendOpus === null || out.stack === "libdatachannel";
  if (!STACKS.includes(out.stack) || !out.url || !(out.timeoutMs > 0) || !(out.calls >= 1) || !(out.holdMs >= 0) || !sendOk) {
    process.stderr.write(`usage: node whip_call.js --stack ${STACKS.join("|")} [--timeout-ms N] [--calls N | --serve] [--hold-ms N] [--dead-candidate IP:PORT] [--send-opus FILE (libdatachannel)] WHIP_URL\n`);
    process.exit(2);
  }
  return out;
}

// Both stacks behind one face: offer() -> SDP with candidates, answer(sdp), on(kind, state), close().
function libdatachannel(record, onRtp) {
  const ndc = require("node-datachannel");
  const pc = new ndc.PeerConnection("splitrelay", { iceServers: [] });
  const audio = new ndc.Audio("0", "SendRecv");
  const ssrc = 1 + Math.floor(Math.random() * 0xfffffff0);
  audio.addOpusCodec(OPUS_PT);
  audio.addSSRC(ssrc, "splitrelay", "splitrelay", "audio");
  const track = pc.addTrack(audio);
  track.onMessage((msg) => {   // the transceiver's audio (it sends silence when quiet)
    record("rtp", null);
    if (onRtp) onRtp(msg);
  });
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
    certificate() {   // the server certificate's fingerprint as its DTLS computed it, once one arrived
      const f = pc.remoteFingerprint();
      return f && f.value ? { algorithm: f.algorithm, value: f.value } : null;
    },
    ssrc,
    send(packet) { return track.sendMessageBinary(packet); },   // a whole RTP packet: libdatachannel adds SRTP
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
                   answer_ms: null, answer_setup: null, answer_fingerprints: [], certificate: null,
                   delete_status: null, events, error: null };
  const heard = args.sendOpus ? new HeardAudio() : null;
  const peer = args.stack === "werift" ? werift(record) : libdatachannel(record, heard && ((m) => heard.packet(m)));
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
    result.answer_fingerprints = [...answer.matchAll(/^a=fingerprint:(\S+) (\S+?)\r?$/gm)].map((m) => [m[1], m[2]]);
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
  if (peer.certificate) {
    try { result.certificate = peer.certificate(); } catch (e) { /* a closed peer: stays null */ }
  }
  if (!result.error && args.holdMs > 0) {   // --hold-ms: stay in the call, count the audio that comes
    const sender = heard ? new OpusSender(args.sendOpus, peer) : null;
    if (heard) heard.start();
    await new Promise((resolve) => setTimeout(resolve, args.holdMs));
    if (sender) result.audio = { frames_sent: sender.stop(), ...heard.stop() };
    if (firstAt("connection", ["failed", "closed", "disconnected"]) !== null) result.error = "the call dropped";
  }
  const rtp = events.filter((e) => e.what === "rtp" && e.t !== null);
  result.rtp_in = rtp.length;
  result.last_rtp_ms = rtp.length ? rtp[rtp.length - 1].t : null;
  result.events = events.filter((e) => e.what !== "rtp");
  if (result.error) result.ok = false;
  result.location = location;
  if (location) {
    try { result.delete_status = (await fetch(location, { method: "DELETE" })).status; } catch (e) { /* stays null */ }
  }
  try { await peer.close(); } catch (e) { /* closing a failed peer */ }
  return result;
}

// --send-opus FILE: frames of pre-encoded Opus (each a 2-byte big-endian length, then the packet), sent
// in a loop, one every FRAME_MS, as RTP from the SSRC the offer declared. Pre-encoded so that a call
// costs the caller no codec: the bench measures the relay and the transceiver, not this process.
class OpusSender {
  constructor(file, peer) {
    const data = require("fs").readFileSync(file);
    this.frames = [];
    for (let i = 0; i + 2 <= data.length; i += 2 + data.readUInt16BE(i)) {
      this.frames.push(data.subarray(i + 2, i + 2 + data.readUInt16BE(i)));
    }
    if (!this.frames.length) throw new Error(`${file} holds no Opus frame`);
    this.peer = peer;
    this.sent = 0;
    this.seq = Math.floor(Math.random() * 0x10000);
    this.ts = Math.floor(Math.random() * 0x100000000);
    this.t0 = performance.now();
    this.timer = setInterval(() => this.tick(), FRAME_MS);
  }

  tick() {   // what is due by the clock; after a stall of more than 5 frames, skip ahead instead of bursting
    let due = Math.floor((performance.now() - this.t0) / FRAME_MS) + 1 - this.sent;
    if (due > 5) { this.t0 += (due - 1) * FRAME_MS; due = 1; }
    for (; due > 0; due--) {
      const payload = this.frames[this.sent % this.frames.length];
      const packet = Buffer.alloc(12 + payload.length);
      packet[0] = 0x80;
      packet[1] = OPUS_PT;
      packet.writeUInt16BE(this.seq, 2);
      packet.writeUInt32BE(this.ts >>> 0, 4);
      packet.writeUInt32BE(this.peer.ssrc >>> 0, 8);
      payload.copy(packet, 12);
      try { this.peer.send(packet); } catch (e) { /* the track closed under us: the report says so */ }
      this.seq = (this.seq + 1) & 0xffff;
      this.ts = (this.ts + 48 * FRAME_MS) % 0x100000000;
      this.sent++;
    }
  }

  stop() { clearInterval(this.timer); return this.sent; }
}

// The echo this caller hears: RTP payloads of VOICED_MIN_BYTES or more (its own tone, decoded and
// encoded again by the transceiver), and the gaps between them, in wall-clock ms (Date.now()) so the
// bench can set them against what it did to the relay and the transceiver at that time.
class HeardAudio {
  constructor() { Object.assign(this, { rtpIn: 0, voicedIn: 0, startedAt: null, last: null, firstMs: null,
                                        maxGap: 0, gaps: [], seq: null, ts: null, seqJumps: 0, tsJumps: 0 }); }

  start() { this.startedAt = this.last = Date.now(); }

  packet(msg) {
    const size = rtpPayloadSize(msg);
    if (size < 0) return;
    this.rtpIn++;
    this.continuity(msg.readUInt16BE(2), msg.readUInt32BE(4));
    if (size < VOICED_MIN_BYTES || this.startedAt === null) return;
    const now = Date.now();
    if (this.firstMs === null) this.firstMs = now - this.startedAt;
    this.gap(now);
    this.voicedIn++;
    this.last = now;
  }

  continuity(seq, ts) {   // packets whose sequence number is not the last one's + 1, or whose timestamp is
    if (this.seq !== null) {   // not one 20 ms frame (960 at 48 kHz) after the last one's
      if (seq !== ((this.seq + 1) & 0xffff)) this.seqJumps++;
      if (((ts - this.ts) >>> 0) !== 48 * FRAME_MS) this.tsJumps++;
    }
    this.seq = seq;
    this.ts = ts;
  }

  gap(now) {
    const gap = now - this.last;
    this.maxGap = Math.max(this.maxGap, gap);
    if (gap >= GAP_REPORT_MS && this.gaps.length < GAPS_LISTED) this.gaps.push([this.last, now]);
  }

  stop() {   // the silence at the end counts too: a call whose echo stopped for good has one long last gap
    if (this.startedAt !== null) this.gap(Date.now());
    return { rtp_in: this.rtpIn, voiced_in: this.voicedIn, first_voiced_ms: this.firstMs, max_gap_ms: this.maxGap,
             gaps: this.gaps, started_at: this.startedAt, ended_at: Date.now(), seq_jumps: this.seqJumps,
             ts_jumps: this.tsJumps };
  }
}

// An RTP packet's payload size (RFC 3550: CSRCs, header extension, padding), or -1 for RTCP and non-RTP.
function rtpPayloadSize(msg) {
  if (msg.length < 12 || (msg[0] >> 6) !== 2) return -1;
  if ((msg[1] & 0x7f) >= 72 && (msg[1] & 0x7f) <= 79) return -1;   // RTCP packet types 200..207
  let offset = 12 + 4 * (msg[0] & 0x0f);
  if (msg[0] & 0x10) {
    if (msg.length < offset + 4) return -1;
    offset += 4 + 4 * msg.readUInt16BE(offset + 2);
  }
  const size = msg.length - offset - ((msg[0] & 0x20) ? msg[msg.length - 1] : 0);
  return size >= 0 ? size : -1;
}

// --dead-candidate IP:PORT: the answer gets one more server candidate, of the highest priority, at an
// address that never answers (a broken path, e.g. IPv6 in the field), so its pair stays in progress.
function withDeadCandidate(sdp, hostPort) {
  const [host, port] = [hostPort.slice(0, hostPort.lastIndexOf(":")), hostPort.slice(hostPort.lastIndexOf(":") + 1)];
  return sdp.replace(/^(a=candidate:.*)$/m, `a=candidate:deadpath 1 udp 2147483647 ${host} ${port} typ host\r\n$1`);
}

// --hold-ms N: each call stays up N ms once connected (rtp_in, last_rtp_ms: the audio its track
// received); with --send-opus it sends that audio meanwhile and reports the echo it heard (audio: frames
// sent, voiced packets heard, the gaps between them).
// --calls N: N calls one after another in this process, one JSON line each (a long-running agent's
// view: the first call also pays for loading and compiling the stack's JavaScript and crypto code).
// --serve: calls on demand, many at once, in this one process (bench/soak.py: ~30 callers, each a node
// process of its own, starved the transceiver of this 2-core host; one process of them costs what
// load.js does). Each stdin line {"id": ID, "hold_ms": N} starts a call with those; its report is one
// stdout line with "id" added. Exits once stdin ends and every call has reported.
async function serve(args) {
  const running = new Set();
  let buffered = "";
  const start = (line) => {
    let request;
    try { request = JSON.parse(line); } catch (e) {
      process.stdout.write(JSON.stringify({ id: null, ok: false, error: `not a JSON request: ${line.slice(0, 80)}` }) + "\n");
      return;
    }
    const holdMs = Number(request.hold_ms);
    const call = oneCall({ ...args, holdMs: holdMs >= 0 ? holdMs : args.holdMs })
      .then((result) => process.stdout.write(JSON.stringify({ id: request.id, ...result }) + "\n"));
    running.add(call);
    call.finally(() => running.delete(call));
  };
  process.stdin.setEncoding("utf8");
  process.stdin.on("data", (chunk) => {
    buffered += chunk;
    const lines = buffered.split("\n");
    buffered = lines.pop();
    for (const line of lines) if (line.trim()) start(line);
  });
  await new Promise((resolve) => process.stdin.on("end", resolve));
  while (running.size) await Promise.allSettled([...running]);
  process.exit(0);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.serve) return serve(args);
  let failed = false;
  for (let i = 0; i < args.calls; i++) {
    const result = await oneCall(args);
    process.stdout.write(JSON.stringify(result) + "\n");
    failed = failed || !result.ok;
  }
  process.exit(failed ? 1 : 0);
}

main();
