// The page side of splitrelay.client.browser: one WHIP call (RFC 9725) from a real browser.
//
// Python drives it through window.splitrelay (start, iceRestart, hangUp, samples); everything
// here is what any web page would do with the standard APIs, so the browser sees no test hooks.
// Every STATS_INTERVAL_MS the page records one sample from getStats(): the selected candidate
// pair and the inbound/outbound audio counters. The Python side judges "audio flows" from
// consecutive samples, so the same samples serve the tests and the failover-gap measurement.
"use strict";

const STATS_INTERVAL_MS = 100;
const MAX_SAMPLES = 6000;          // 10 min at 100 ms: a bounded page whatever the test does
const GATHERING_TIMEOUT_MS = 5000;

const call = { pc: null, whipUrl: null, location: null, etag: null, samples: [], events: [], timer: null,
               analyser: null, ctx: null, local: null, levels: [] };
const LEVEL_BUFFER = 256;          // samples per level reading: 5.3 ms at 48 kHz
const LOUD = 0.01;                 // RMS, -40 dBFS: the caller's and the agent's speech are far above it
const MAX_LEVELS = 20000;

// Barge-in at the browser's output: the moments the caller's outgoing audio and the decoded audio the
// browser plays cross -40 dBFS, on one clock (performance.now()), from one AudioContext's callbacks.
function watchLevel(stream, which) {
  const ctx = call.ctx;
  const node = ctx.createScriptProcessor(LEVEL_BUFFER, 1, 1);
  let loud = false;
  node.onaudioprocess = (e) => {
    const x = e.inputBuffer.getChannelData(0);
    let sum = 0;
    for (let i = 0; i < x.length; i++) sum += x[i] * x[i];
    const now = Math.sqrt(sum / x.length) >= LOUD;
    if (now !== loud && call.levels.length < MAX_LEVELS) call.levels.push({ t: performance.now(), which, loud: now });
    loud = now;
  };
  const mute = ctx.createGain();
  mute.gain.value = 0;
  ctx.createMediaStreamSource(stream).connect(node);
  node.connect(mute).connect(ctx.destination);   // a processor runs only while connected to an output
}

function event(what, value) {
  call.events.push({ t: performance.now(), what, value });
}

// Set a local description and wait for the end of its candidates (WHIP without trickle sends them
// all at once). Listening before setLocalDescription also catches an ICE restart's new gathering,
// which iceGatheringState would not show: it still reads "complete" from the last one.
function describeAndGather(pc, description) {
  const ended = new Promise((resolve) => {
    const done = () => { clearTimeout(timer); pc.removeEventListener("icecandidate", onCandidate); resolve(); };
    const onCandidate = (e) => { if (!e.candidate) done(); };
    const timer = setTimeout(done, GATHERING_TIMEOUT_MS);  // send what we have
    pc.addEventListener("icecandidate", onCandidate);
  });
  return pc.setLocalDescription(description).then(() => ended);
}

async function whipRequest(method, url, headers, body) {
  const response = await fetch(url, { method, headers, body });
  const text = await response.text();
  if (!response.ok) throw new Error(`WHIP ${method} ${url}: ${response.status} ${text.trim()}`);
  return { response, text };
}

// The loudest frequency (Hz) the remote audio carries now, or null without WebAudio.
function remotePeakHz() {
  const a = call.analyser;
  if (!a) return null;
  const bins = new Float32Array(a.frequencyBinCount);
  a.getFloatFrequencyData(bins);
  let best = 0;
  for (let i = 1; i < bins.length; i++) if (bins[i] > bins[best]) best = i;
  return bins[best] > -90 ? best * a.context.sampleRate / a.fftSize : null;
}

function listenTo(track) {
  const stream = new MediaStream([track]);
  const audio = document.getElementById("remote");  // Chrome decodes remote audio only while it plays
  audio.srcObject = stream;
  audio.play().catch((e) => event("play", String(e)));
  try {
    const ctx = call.ctx = new AudioContext();
    call.analyser = ctx.createAnalyser();
    call.analyser.fftSize = 4096;
    ctx.createMediaStreamSource(stream).connect(call.analyser);
    ctx.resume().catch(() => {});
    watchLevel(stream, "agent");
    if (call.local) watchLevel(call.local, "caller");
  } catch (e) {
    event("webaudio", String(e));
  }
}

async function sample() {
  const pc = call.pc;
  if (!pc) return;
  const s = { t: performance.now(), ice: pc.iceConnectionState, conn: pc.connectionState, inPackets: 0,
              inEnergy: 0, inLevel: 0, outPackets: 0, pair: null, peakHz: remotePeakHz() };
  const report = await pc.getStats();
  let pairId = null;
  report.forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "audio") {
      s.inPackets = r.packetsReceived || 0;
      s.inLost = r.packetsLost || 0;
      s.inEnergy = r.totalAudioEnergy || 0;
      s.inLevel = r.audioLevel || 0;
      // NetEQ, Chrome's receive buffer (cumulative over emitted samples): what plays after a barge-in
      s.jbDelay = r.jitterBufferDelay || 0;
      s.jbTarget = r.jitterBufferTargetDelay || 0;
      s.jbEmitted = r.jitterBufferEmittedCount || 0;
    } else if (r.type === "remote-outbound-rtp" && r.kind === "audio") {   // the transceiver's RTCP SRs
      s.srPackets = r.packetsSent || 0;
      s.srReports = r.reportsSent || 0;
    } else if (r.type === "outbound-rtp" && r.kind === "audio") {
      s.outPackets = r.packetsSent || 0;
    } else if (r.type === "transport" && r.selectedCandidatePairId) {
      pairId = r.selectedCandidatePairId;
    }
  });
  const pair = pairId && report.get(pairId);
  if (pair) {
    const local = report.get(pair.localCandidateId) || {};
    const remote = report.get(pair.remoteCandidateId) || {};
    s.pair = { local: `${local.address}:${local.port}`, remote: `${remote.address}:${remote.port}`,
               remoteUfrag: remote.usernameFragment || null, state: pair.state,
               protocol: remote.protocol || null,   // "udp", or "tcp" over ICE-TCP
               rttMs: pair.currentRoundTripTime != null ? pair.currentRoundTripTime * 1000 : null };
  }
  call.samples.push(s);
  if (call.samples.length > MAX_SAMPLES) call.samples.splice(0, call.samples.length - MAX_SAMPLES);
}

// Replace the ICE credentials (and candidates) of the current answer with those of a PATCH answer.
function restartedAnswer(sdp, fragment) {
  const pick = (re) => (fragment.match(re) || [])[0];
  const ufrag = pick(/^a=ice-ufrag:\S+/m);
  const pwd = pick(/^a=ice-pwd:\S+/m);
  if (!ufrag || !pwd) throw new Error(`ICE restart answer has no credentials: ${fragment.trim()}`);
  const candidates = fragment.match(/^a=candidate:.*$/gm) || [];
  const out = [];
  for (const line of sdp.split(/\r?\n/)) {
    if (line.startsWith("a=ice-ufrag:")) out.push(ufrag);
    else if (line.startsWith("a=ice-pwd:")) out.push(pwd);
    else if (candidates.length && (line.startsWith("a=candidate:") || line === "a=end-of-candidates")) continue;
    else out.push(line);
    if (candidates.length && line.startsWith("a=mid:")) out.push(...candidates, "a=end-of-candidates");
  }
  return out.join("\r\n");
}

window.splitrelay = {
  // Capture (the fake device plays the WAV), offer, POST, apply the answer; resolves once answered.
  async start(whipUrl, token) {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
    const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle" });
    call.pc = pc;
    call.local = stream;
    call.whipUrl = whipUrl;
    pc.addTransceiver(stream.getAudioTracks()[0], { direction: "sendrecv", streams: [stream] });
    pc.ontrack = (e) => listenTo(e.track);
    pc.oniceconnectionstatechange = () => event("ice", pc.iceConnectionState);
    pc.onconnectionstatechange = () => event("connection", pc.connectionState);
    await describeAndGather(pc, await pc.createOffer());
    event("whip", "post");    // the origin of the setup times (bench/dtls_setup.py)
    const headers = { "Content-Type": "application/sdp" };
    if (token) headers.Authorization = `Bearer ${token}`;
    const { response, text } = await whipRequest("POST", whipUrl, headers, pc.localDescription.sdp);
    if (response.status !== 201) throw new Error(`WHIP POST answered ${response.status}, not 201`);
    call.location = new URL(response.headers.get("Location"), whipUrl).href;
    call.etag = response.headers.get("ETag");
    await pc.setRemoteDescription({ type: "answer", sdp: text });
    call.timer = setInterval(() => { sample().catch((e) => event("stats", String(e))); }, STATS_INTERVAL_MS);
    return { location: call.location, offer: pc.localDescription.sdp, answer: text };
  },

  // ICE restart through WHIP (RFC 9725 section 4.4): new local credentials in an SDP fragment,
  // PATCHed with If-Match "*"; the 200 answer's fragment carries the server's new credentials.
  async iceRestart() {
    const pc = call.pc;
    await describeAndGather(pc, await pc.createOffer({ iceRestart: true }));
    const sdp = pc.localDescription.sdp;
    const lines = sdp.split(/\r?\n/);
    const mid = lines.find((l) => l.startsWith("a=mid:"));
    const mline = lines.find((l) => l.startsWith("m="));
    const frag = [lines.find((l) => l.startsWith("a=ice-ufrag:")), lines.find((l) => l.startsWith("a=ice-pwd:")),
                  lines.find((l) => l.startsWith("a=group:BUNDLE")), mline, mid,
                  ...lines.filter((l) => l.startsWith("a=candidate:")), "a=end-of-candidates"]
      .filter(Boolean).join("\r\n") + "\r\n";
    const started = performance.now();
    const { response, text } = await whipRequest("PATCH", call.location, {
      "Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*" }, frag);
    if (response.status !== 200) throw new Error(`WHIP PATCH answered ${response.status}, not 200`);
    call.etag = response.headers.get("ETag") || call.etag;
    await pc.setRemoteDescription({ type: "answer", sdp: restartedAnswer(pc.remoteDescription.sdp, text) });
    event("ice-restart", text);
    return { started, fragment: frag, answer: text };
  },

  async hangUp() {
    clearInterval(call.timer);
    let status = null;
    if (call.location) status = (await fetch(call.location, { method: "DELETE" })).status;
    if (call.pc) call.pc.close();
    return status;
  },

  now() { return performance.now(); },
  // Samples (and events) recorded at or after time t (performance.now() milliseconds).
  samples(t = 0) { return call.samples.filter((s) => s.t >= t); },
  events(t = 0) { return call.events.filter((e) => e.t >= t); },
  // Level crossings ({t, which: "caller" | "agent", loud}) at or after time t.
  levels(t = 0) { return call.levels.filter((l) => l.t >= t); },
};
