// Many concurrent WHIP calls from one node process, cheap enough that the transceiver is what a
// capacity bench measures (issue 24): libdatachannel (C++: real ICE, DTLS and SRTP) sends pre-encoded
// Opus and times the echo by packet size, without decoding anything.
//
//   node load.js --frames FILE --sessions N --duration-s S [--connect-concurrency K]
//                [--connect-timeout-ms MS] [--connect-phase-ms MS] [--drain-ms MS]
//                [--speak-cycle-ms MS --speak-share F] [--phase-spread-ms MS] WHIP_URL
//
// FILE (splitrelay.client.load_client.write_frames): {"frame_ms", "cycle": [base64 Opus packets],
// "pulse_index", "echo_threshold"}: one cycle of a quiet stream with one loud frame (the pulse) at
// pulse_index, encoded once in Python. The transceiver re-encodes what it hears: its packets of the
// quiet stream stay below echo_threshold bytes and the pulse's echo starts a packet at or above it
// (checked against the transceiver's own encoder when the file is written), so the first loud packet
// after a pulse times the audio round trip at the client's socket, with no client jitter buffer.
//
// The N calls connect (K at a time; calls not connected within --connect-phase-ms in all fail), then all talk together for S seconds (each session's frames
// offset by i/N of a frame, so the transceiver is not hit by N packets at once), then stay up
// --drain-ms for the echo's tail, DELETE and close. Prints one JSON object: per session and in
// total, packets sent/received, downlink loss from RTP sequence gaps, pulses sent/echoed, RTT
// samples; the talking window in Unix seconds (the caller reads other processes' CPU over it) and
// this process's CPU over that window (process.cpuUsage: every thread, libdatachannel's included).
// Per session also the lateness of each returned packet (its gap after the previous one, beyond the
// RTP time between them): the transceiver's sending falling behind, for a profile that echoes nothing (voice).
// --speak-cycle-ms/--speak-share: the agent echoes only in the last share of each cycle of the
// caller's stream time (transceiver handler "conversation"): pulses outside it are not expected back.
// --phase-spread-ms MS: session i starts talking i/N of MS before the window, so at the window's start
// the calls' streams (and a conversation's phases) are spread over MS instead of in step; only the
// window is measured (its packets, pulses and CPU).
// The WHIP bearer token comes from SPLITRELAY_WHIP_TOKEN (not argv: any local user can read argv).
"use strict";

const fs = require("fs");
const ndc = require("node-datachannel");

const GATHERING_TIMEOUT_MS = 5000;
const PAYLOAD_TYPE = 111;
const CLOCK = 48000;
const TICK_MS = 5;          // the send timer: frames due are sent together (2 ms cost the same CPU at 20 calls)
const LARGE_PAYLOAD = 60;   // bytes: from the transceiver's encoder, sound (speech, a pulse's echo); quiet is 35-45
const SMALL_PAYLOAD = 12;   // bytes: an Opus frame of silence at a low bitrate (handler conversation's comfort
                            // frames are 6-7), where the transceiver's 32 kbit/s encoder spends 35-45

function parseArgs(argv) {
  const out = { frames: null, sessions: 1, durationS: 10, concurrency: 8, connectTimeoutMs: 20000,
                drainMs: 1500, speakCycleMs: 0, speakShare: 1, connectPhaseMs: 60000, phaseSpreadMs: 0, url: null };
  const num = { "--sessions": "sessions", "--duration-s": "durationS", "--connect-concurrency": "concurrency",
                "--connect-timeout-ms": "connectTimeoutMs", "--drain-ms": "drainMs",
                "--speak-cycle-ms": "speakCycleMs", "--speak-share": "speakShare",
                "--connect-phase-ms": "connectPhaseMs", "--phase-spread-ms": "phaseSpreadMs" };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--frames") out.frames = argv[++i];
    else if (num[argv[i]]) out[num[argv[i]]] = Number(argv[++i]);
    else out.url = argv[i];
  }
  if (!out.frames || !out.url || !(out.sessions >= 1) || !(out.durationS > 0) || !(out.concurrency >= 1)
      || !(out.speakShare >= 0 && out.speakShare <= 1) || !(out.speakCycleMs >= 0) || !(out.phaseSpreadMs >= 0)) {
    process.stderr.write("usage: node load.js --frames FILE --sessions N --duration-s S [--connect-concurrency K] "
                         + "[--connect-timeout-ms MS] [--connect-phase-ms MS] [--drain-ms MS] "
                         + "[--speak-cycle-ms MS --speak-share F] [--phase-spread-ms MS] WHIP_URL\n");
    process.exit(2);
  }
  return out;
}

const unixNow = () => (performance.timeOrigin + performance.now()) / 1000;

class Session {
  constructor(index, frames, args) {
    this.index = index;
    this.frames = frames;
    this.args = args;
    this.ssrc = 1 + Math.floor(Math.random() * 0xfffffff0);
    this.seq = Math.floor(Math.random() * 0xffff);
    this.k = 0;                       // frames sent; RTP timestamp = k * samples per frame (from 0)
    this.retries = 0;
    this.reset();
    this.error = null;
    this.connectMs = null;
    this.sent = 0;
    this.received = 0;
    this.receivedSmall = 0;
    this.receivedLarge = 0;
    this.firstSeq = null;             // extended sequence numbers of the returned stream
    this.maxSeq = null;
    this.lastSeq16 = null;
    this.cycles = 0;
    this.loud = false;                // the previous returned packet was at or above the threshold
    this.pulses = [];                 // {t, expected, echoed} of pulses not yet old
    this.pulsesSent = 0;
    this.pulsesExpected = 0;
    this.pulsesEchoed = 0;
    this.pulsesExpectedEchoed = 0;
    this.rtts = [];
    this.lastArrival = null;
    this.lastTs = 0;
    this.lateness = [];               // ms each returned packet came after the previous one, beyond its RTP time
    this.receiving = false;           // counts only while talking + draining
  }

  reset() {
    this.state = { ice: null, connection: null, open: false };
    this.waiters = [];
    this.location = null;
  }

  wake() { for (const w of this.waiters.splice(0)) w(); }

  async connect() {
    const pc = new ndc.PeerConnection(`load${this.index}`, { iceServers: [] });
    this.pc = pc;
    const audio = new ndc.Audio("0", "SendRecv");
    audio.addOpusCodec(PAYLOAD_TYPE);
    audio.addSSRC(this.ssrc, "splitrelay-load", "splitrelay-load", "audio");
    this.track = pc.addTrack(audio);
    this.track.onOpen(() => { this.state.open = true; this.wake(); });
    this.track.onMessage((buf) => this.onPacket(buf));
    pc.onIceStateChange((s) => { this.state.ice = s; this.wake(); });
    pc.onStateChange((s) => { this.state.connection = s; this.wake(); });
    const offer = await new Promise((resolve) => {
      const timer = setTimeout(() => resolve(pc.localDescription().sdp), GATHERING_TIMEOUT_MS);
      pc.onGatheringStateChange((s) => {
        if (s === "complete") { clearTimeout(timer); resolve(pc.localDescription().sdp); }
      });
      pc.setLocalDescription();
    });
    const t0 = performance.now();
    const headers = { "Content-Type": "application/sdp" };
    const token = process.env.SPLITRELAY_WHIP_TOKEN;
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(this.args.url, { method: "POST", headers, body: offer });
    const answer = await response.text();
    if (response.status !== 201) throw new Error(`WHIP POST answered ${response.status}: ${answer.trim().slice(0, 200)}`);
    this.location = new URL(response.headers.get("Location"), this.args.url).href;
    pc.setRemoteDescription(answer, "answer");
    const deadline = t0 + this.args.connectTimeoutMs;
    while (!(this.state.connection === "connected" && this.state.open)) {
      if (["failed", "closed"].includes(this.state.connection)) throw new Error(`the peer connection failed (ICE ${this.state.ice}, track ${this.state.open ? "open" : "not open"})`);
      const left = deadline - performance.now();
      if (left <= 0) throw new Error(`not connected within ${this.args.connectTimeoutMs} ms`);
      await new Promise((resolve) => { this.waiters.push(resolve); setTimeout(resolve, Math.min(left, 250)); });
    }
    this.connectMs = performance.now() - t0;
  }

  // one RTP packet of ours: 12-byte header + the cycle's next pre-encoded frame
  sendFrame(now) {
    const f = this.frames;
    const pos = this.k % f.cycle.length;
    const payload = f.cycle[pos];
    const packet = Buffer.allocUnsafe(12 + payload.length);
    packet[0] = 0x80;
    packet[1] = PAYLOAD_TYPE | (this.k === 0 ? 0x80 : 0);
    packet.writeUInt16BE(this.seq, 2);
    packet.writeUInt32BE((this.k * f.samples) >>> 0, 4);
    packet.writeUInt32BE(this.ssrc >>> 0, 8);
    payload.copy(packet, 12);
    if (pos === f.pulseIndex && this.receiving) {   // a pulse of the measured window
      const expected = this.speaking(this.k);
      this.pulses.push({ t: now, expected, echoed: false });
      this.pulsesSent++;
      if (expected) this.pulsesExpected++;
    }
    try { this.track.sendMessageBinary(packet); this.sent++; } catch (e) { /* closed under us: counted as not sent */ }
    this.seq = (this.seq + 1) & 0xffff;
    this.k++;
  }

  // whether the agent echoes frame k (its position in our stream decides the conversation's phase)
  speaking(k) {
    const { speakCycleMs, speakShare } = this.args;
    if (!speakCycleMs) return true;
    const cycleFrames = Math.round(speakCycleMs / this.frames.frameMs);
    const from = Math.round(cycleFrames * (1 - speakShare));
    const at = k % cycleFrames;
    return at >= from + 1 && at < cycleFrames - 1;    // one frame of margin at each edge
  }

  onPacket(buf) {
    if (!this.receiving || buf.length < 12 || (buf[0] & 0xc0) !== 0x80) return;
    const pt = buf[1] & 0x7f;
    if (pt >= 64 && pt < 96) return;                  // RTCP (200..207 with the marker bit's place)
    const now = performance.now();
    this.received++;
    const ts = buf.readUInt32BE(4);
    // the gap after the previous packet beyond the RTP time between them (a pause sent as DTX is not late)
    if (this.lastArrival !== null) this.lateness.push(Math.round((now - this.lastArrival - ((ts - this.lastTs) >>> 0) * 1000 / CLOCK) * 100) / 100);
    this.lastArrival = now;
    this.lastTs = ts;
    const seq16 = buf.readUInt16BE(2);
    if (this.lastSeq16 === null) {
      this.firstSeq = this.maxSeq = seq16;
    } else {
      const delta = ((seq16 - this.lastSeq16 + 0x8000) & 0xffff) - 0x8000;
      const ext = this.maxSeq + delta;
      if (ext > this.maxSeq) this.maxSeq = ext;
    }
    if (this.lastSeq16 === null || ((seq16 - this.lastSeq16) & 0xffff) < 0x8000) this.lastSeq16 = seq16;
    let header = 12 + 4 * (buf[0] & 0x0f);
    if (buf[0] & 0x10 && buf.length >= header + 4) header += 4 + 4 * buf.readUInt16BE(header + 2);
    let size = buf.length - header;
    if (buf[0] & 0x20) size -= buf[buf.length - 1];
    if (size <= SMALL_PAYLOAD) this.receivedSmall++;
    if (size >= LARGE_PAYLOAD) this.receivedLarge++;
    const loud = size >= this.frames.threshold;
    if (loud && !this.loud) this.onset(now);
    this.loud = loud;
  }

  // a loud run began in the returned stream: the echo of the newest pulse still within one cycle
  onset(now) {
    const window = this.frames.cycle.length * this.frames.frameMs;
    this.pulses = this.pulses.filter((p) => now - p.t < window);
    const p = this.pulses[this.pulses.length - 1];
    if (!p || p.echoed) return;
    p.echoed = true;
    this.pulsesEchoed++;
    if (!p.expected) return;   // sent while the agent listened: the loud run is its speech starting, not an echo
    this.pulsesExpectedEchoed++;
    this.rtts.push(Math.round((now - p.t) * 100) / 100);
  }

  async hangUp() {
    if (this.location) {
      try { await fetch(this.location, { method: "DELETE" }); } catch (e) { /* the transceiver may be gone */ }
    }
    try { this.pc.close(); } catch (e) { /* closing a failed peer */ }
  }

  report() {
    const expected = this.maxSeq === null ? 0 : this.maxSeq - this.firstSeq + 1;
    return { index: this.index, ok: !this.error && this.sent > 0, error: this.error, connect_ms: this.connectMs,
             connect_retries: this.retries, sent: this.sent,
             received: this.received, received_small: this.receivedSmall, received_large: this.receivedLarge,
             received_expected: expected,
             pulses_sent: this.pulsesSent, pulses_expected: this.pulsesExpected, pulses_echoed: this.pulsesEchoed,
             pulses_expected_echoed: this.pulsesExpectedEchoed, rtt_ms: this.rtts,
             gap_lateness_ms: this.lateness };
  }
}

function loadFrames(path) {
  const raw = JSON.parse(fs.readFileSync(path, "utf8"));
  return { frameMs: raw.frame_ms, samples: Math.round(CLOCK * raw.frame_ms / 1000),
           cycle: raw.cycle.map((b) => Buffer.from(b, "base64")), pulseIndex: raw.pulse_index,
           threshold: raw.echo_threshold };
}

async function connectAll(sessions, concurrency, phaseMs) {
  let next = 0;
  const deadline = performance.now() + phaseMs;
  async function worker() {
    while (next < sessions.length) {
      if (performance.now() > deadline) {
        sessions[next++].error = `not connected within the connect phase (${phaseMs} ms)`;
        continue;
      }
      const s = sessions[next++];
      // one retry on a fresh peer connection: on a loaded host libdatachannel's ICE now and then fails at
      // once; the bench is about calls that run, and counts the retries
      for (let attempt = 0; attempt < 2; attempt++) {
        if (attempt) { s.retries++; await s.hangUp(); s.reset(); }
        try { await s.connect(); s.error = null; break; } catch (e) { s.error = String(e && e.message || e).split("\n")[0]; }
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, sessions.length) }, worker));
}

// session i's frame k is due at start - lead_i + offset_i + k * frame (lead_i: i/N of the phase spread,
// offset_i: i/N of a frame, so the transceiver is not hit by N packets at once); one timer for all,
// TICK_MS apart. Resolves with the window's start and end (Unix s) and this process's CPU over it.
function talk(sessions, frames, durationMs, spreadMs) {
  return new Promise((resolve) => {
    const live = sessions.filter((s) => !s.error);
    const start = performance.now() + 5 + (spreadMs * (live.length - 1)) / Math.max(1, live.length);
    const end = start + durationMs;
    const begins = live.map((_, i) => start - (i * spreadMs) / live.length + (i * frames.frameMs) / live.length);
    let window = null;
    const tick = () => {
      const now = performance.now();
      if (window === null && now >= start) {
        for (const s of sessions) s.receiving = true;
        window = { t0: unixNow(), cpu0: process.cpuUsage() };
      }
      if (now >= end) {
        resolve({ t0: window.t0, t1: unixNow(), cpu: process.cpuUsage(window.cpu0) });
        return;
      }
      live.forEach((s, i) => {
        while (s.k * frames.frameMs + begins[i] <= now && s.k * frames.frameMs + begins[i] < end) s.sendFrame(now);
      });
      setTimeout(tick, TICK_MS);
    };
    tick();
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const frames = loadFrames(args.frames);
  const sessions = Array.from({ length: args.sessions }, (_, i) => new Session(i, frames, args));
  const connectStart = performance.now();
  await Promise.race([connectAll(sessions, args.concurrency, args.connectPhaseMs),
                      new Promise((resolve) => setTimeout(resolve, args.connectPhaseMs + 1000))]);
  for (const s of sessions) if (s.connectMs === null && !s.error) s.error = "still connecting at the phase's end";
  const connectS = (performance.now() - connectStart) / 1000;
  await new Promise((resolve) => setTimeout(resolve, 500));
  const { t0, t1, cpu } = await talk(sessions, frames, args.durationS * 1000, args.phaseSpreadMs);
  await new Promise((resolve) => setTimeout(resolve, args.drainMs));
  for (const s of sessions) s.receiving = false;
  const reports = sessions.map((s) => s.report());
  await Promise.all(sessions.map((s) => s.hangUp()));
  const sum = (key) => reports.reduce((a, r) => a + r[key], 0);
  const out = {
    stack: "libdatachannel", sessions: args.sessions, connected: reports.filter((r) => r.ok).length,
    connect_s: Math.round(connectS * 100) / 100, talk_started_unix: t0, talk_ended_unix: t1,
    connect_retries: reports.reduce((a, r) => a + r.connect_retries, 0), client_cpu_s: (cpu.user + cpu.system) / 1e6,
    sent: sum("sent"), received: sum("received"), received_small: sum("received_small"),
    received_large: sum("received_large"),
    received_expected: sum("received_expected"),
    pulses_sent: sum("pulses_sent"), pulses_expected: sum("pulses_expected"), pulses_echoed: sum("pulses_echoed"),
    pulses_expected_echoed: sum("pulses_expected_echoed"),
    errors: [...new Set(reports.filter((r) => r.error).map((r) => r.error))],
    per_session: reports,
  };
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exit(0);   // ndc.cleanup() segfaults node-datachannel 0.33.4 (see whip_call.js): exit without it
}

main();
