// The talk page: joins a tutor's room with the stock livekit-client, plays the tutor, shows the
// captions of both sides (the agent's `transcript` data messages), who is speaking, each turn's
// latency and the credit left.
//
// Latency by the page's own clock (Web Audio time): the end of the person's speech in the
// microphone (its last loud 10 ms) -> the first loud 10 ms of the tutor's voice received after
// it. Shown next to the agent's own figure from the transcript message. `window.demo` holds what
// the page measured and received (tests and bench/demo.py read it).
'use strict';

const LK = window.LivekitClient;
const $ = (id) => document.getElementById(id);
const LOUD = 0.015;          // RMS of a block (512 samples, about 10 ms) counted as sound (about -36 dBFS)
const END_OF_SPEECH = 0.25;  // seconds of quiet after which the person has stopped
const RECORD_SECONDS = 240;  // the tutor's voice kept for tests, at most

const demo = window.demo = {
  status: 'idle', identity: null, room: null, turns: [], captions: [], sampleRate: 0,
  heard: [], heardSamples: 0, micLevels: [], agentLevels: [], listening: false,
  clock: () => (ctx ? ctx.currentTime : 0),  // the Web Audio time the levels are stamped with
};

let ctx = null;
let agentIdentity = null;
let lastVoiced = null;       // Web Audio time of the person's last loud block
let awaiting = false;        // the person spoke since the tutor last began an answer
let agentLoudAt = -1, youLoudAt = -1, agentWasLoud = false;
let pendingHeardMs = null;   // the page's figure for the answer being spoken
let liveYou = null;          // the caption line of what the person is saying now
let creditTimer = null;

function setStatus(text, error = false) {
  demo.status = text;
  $('status').textContent = text;
  $('status').classList.toggle('error', error);
}

function identity() {
  let name = $('identity').value.trim();
  if (!name) {
    name = localStorage.getItem('voicenet-identity') ||
      'student-' + Math.random().toString(36).slice(2, 8);
    $('identity').value = name;
  }
  localStorage.setItem('voicenet-identity', name);
  return name;
}

// ------------------------------------------------------------------ audio

// A 10 ms-block meter (and, for the tutor, a recorder) on a MediaStreamTrack.
function meter(track, onBlock) {
  const source = ctx.createMediaStreamSource(new MediaStream([track]));
  const node = ctx.createScriptProcessor(512, 1, 1);
  node.onaudioprocess = (e) => {
    const data = e.inputBuffer.getChannelData(0);
    let sum = 0;
    for (let i = 0; i < data.length; i++) sum += data[i] * data[i];
    onBlock(e.playbackTime, Math.sqrt(sum / data.length), data);
  };
  const mute = ctx.createGain();
  mute.gain.value = 0;  // a processor runs only when connected to the output
  source.connect(node).connect(mute).connect(ctx.destination);
  return node;
}

function onMicBlock(t, rms) {
  if (demo.micLevels.length < RECORD_SECONDS * 100) demo.micLevels.push([t, rms]);
  if (rms < LOUD) return;
  youLoudAt = t;
  lastVoiced = t;
  awaiting = true;
}

function onAgentBlock(t, rms, data) {
  if (demo.heardSamples < RECORD_SECONDS * ctx.sampleRate) {
    demo.heard.push([t, Float32Array.from(data)]);
    demo.heardSamples += data.length;
    demo.agentLevels.push([t, rms]);
  }
  const loud = rms >= LOUD;
  if (loud) agentLoudAt = t;
  if (loud && !agentWasLoud && awaiting && lastVoiced !== null && t - lastVoiced > END_OF_SPEECH) {
    awaiting = false;
    pendingHeardMs = (t - lastVoiced) * 1000;
    demo.turns.push({page_ms: pendingHeardMs, speech_end: lastVoiced, first_audio: t});
  }
  agentWasLoud = loud;
}

function indicators() {
  if (ctx) {
    const now = ctx.currentTime;
    $('you-speaking').classList.toggle('on', now - youLoudAt < 0.3);
    $('agent-speaking').classList.toggle('on', now - agentLoudAt < 0.3);
  }
  requestAnimationFrame(indicators);
}

// The tutor's voice as received, 16-bit PCM at the context's rate, base64 (for the tests).
demo.recording = function (since = 0) {
  const blocks = demo.heard.filter(([t]) => t >= since).map(([, b]) => b);
  const total = blocks.reduce((n, b) => n + b.length, 0);
  const pcm = new Int16Array(total);
  let k = 0;
  for (const b of blocks) for (const v of b) pcm[k++] = Math.max(-1, Math.min(1, v)) * 32767;
  const bytes = new Uint8Array(pcm.buffer);
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
};

// ------------------------------------------------------------------ captions

function caption(who, text, cls) {
  const li = document.createElement('li');
  li.className = cls;
  const name = document.createElement('span');
  name.className = 'who';
  name.textContent = who;
  const words = document.createElement('span');
  words.className = 'text';
  words.textContent = text;
  li.append(name, words);
  $('captions').append(li);
  li.scrollIntoView({block: 'nearest'});
  return li;
}

function seconds(ms) {
  return ms === null || ms === undefined ? '–' : (ms / 1000).toFixed(2) + ' s';
}

function onTranscript(message) {
  const mine = message.who !== agentIdentity;
  demo.captions.push({who: mine ? 'you' : 'agent', text: message.text, final: message.final,
                      latency: message.latency || {}});
  if (mine) {
    if (!liveYou) liveYou = caption('You', '', 'you interim');
    liveYou.querySelector('.text').textContent = message.text;
    if (message.final) {
      liveYou.classList.remove('interim');
      liveYou = null;
    }
    return;
  }
  const li = caption('Lina', message.text, 'agent');
  const agentMs = (message.latency || {}).voice_to_voice_ms;
  if (agentMs !== null && agentMs !== undefined) {  // an answer (not the greeting)
    const note = document.createElement('span');
    note.className = 'latency';
    note.textContent = `answered ${seconds(pendingHeardMs)} after you stopped ` +
      `(agent: ${seconds(agentMs)})`;
    li.append(note);
    const turn = demo.turns[demo.turns.length - 1];
    if (turn && pendingHeardMs !== null) turn.agent_ms = agentMs;
    pendingHeardMs = null;
  }
  refreshCredit();
}

async function refreshCredit() {
  try {
    const resp = await fetch('/api/credit');
    const body = await resp.json();
    if (resp.ok) {
      demo.credit = body.available_usd;
      $('credit').textContent = `credit left: $${body.available_usd.toFixed(4)}`;
    }
  } catch (e) { /* the next refresh tries again */ }
}

// ------------------------------------------------------------------ the call

async function talk() {
  $('talk').disabled = true;
  setStatus('starting the tutor…');
  try {
    ctx = ctx || new AudioContext();
    await ctx.resume();
    demo.sampleRate = ctx.sampleRate;
    const resp = await fetch('/api/start', {
      method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({identity: identity()}),
    });
    const grant = await resp.json();
    if (!resp.ok) throw new Error(grant.error || resp.statusText);
    agentIdentity = grant.agent_identity;
    demo.identity = grant.identity;
    demo.bundle_id = grant.bundle_id;
    await join(grant);
  } catch (e) {
    setStatus(`could not start: ${e.message}`, true);
    $('talk').disabled = false;
    hangUp(null);
  }
}

const TALKING = 'Talking with Lina: just speak, and speak over her to interrupt.';

async function join(grant) {
  const room = demo.room = new LK.Room();
  demo.listening = false;
  room.on(LK.RoomEvent.TrackSubscribed, (track, pub, participant) => {
    if (track.kind !== 'audio' || participant.identity !== agentIdentity) return;
    const element = track.attach();  // plays the tutor (Chromium runs a remote stream it plays)
    document.body.append(element);
    meter(track.mediaStreamTrack, onAgentBlock);
    // The agent speaks first once the page can hear it (the reference's client-ready).
    room.localParticipant.publishData(new TextEncoder().encode('client-ready'),
                                      {reliable: true, topic: 'client-ready'});
  });
  // Lina hears the page once the SFU carries the microphone to her (LiveKit's track_subscribed):
  // until then, what the person says is lost, so the page says she is still joining.
  room.on(LK.RoomEvent.LocalTrackSubscribed, (pub) => {
    if (pub.source !== LK.Track.Source.Microphone) return;
    demo.listening = true;
    if (demo.room === room && !$('hangup').disabled) setStatus(TALKING);  // else join() does
  });
  room.on(LK.RoomEvent.DataReceived, (payload, participant, kind, topic) => {
    const text = new TextDecoder().decode(payload);
    if (topic === 'transcript') onTranscript(JSON.parse(text));
    if (topic === 'demo' && JSON.parse(text).type === 'replaced') {
      hangUp('This conversation moved to another tab.');
    }
  });
  room.on(LK.RoomEvent.ParticipantDisconnected, (participant) => {
    if (participant.identity === agentIdentity) hangUp('Lina left the conversation.');
  });
  room.on(LK.RoomEvent.Disconnected, () => {
    if (demo.room === room) hangUp('Disconnected.');
  });
  await room.connect(grant.ws_url, grant.token);
  await room.localParticipant.setMicrophoneEnabled(true);
  const mic = room.localParticipant.getTrackPublication(LK.Track.Source.Microphone).track;
  let micMeter = meter(mic.mediaStreamTrack, onMicBlock);
  mic.on(LK.TrackEvent.Restarted, () => {  // another device, or the same one opened again
    micMeter.onaudioprocess = null;
    micMeter = meter(mic.mediaStreamTrack, onMicBlock);
  });
  $('hangup').disabled = false;
  setStatus(demo.listening ? TALKING : 'Lina is joining…');
  refreshCredit();
  creditTimer = setInterval(refreshCredit, 5000);
}

function hangUp(why = 'You hung up.') {
  const room = demo.room;
  demo.room = null;
  if (room) room.disconnect();
  clearInterval(creditTimer);
  $('hangup').disabled = true;
  $('talk').disabled = false;
  if (why) setStatus(why);
}

$('talk').addEventListener('click', talk);
$('hangup').addEventListener('click', () => hangUp());
$('identity').value = localStorage.getItem('voicenet-identity') || '';
refreshCredit();
requestAnimationFrame(indicators);
