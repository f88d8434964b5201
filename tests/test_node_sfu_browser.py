"""The stock livekit-client (npm, 2.x UMD build as `make setup` fetches it) in Chromium joins our
SFU with its default options, with a token bought from the real gateway.

Its default is signal v1 (one peer connection) on /rtc/v1; our SFU serves v0 (/rtc, two peer
connections) and answers /rtc/v1/validate with a 404, open to any origin, that the client reads
as "no v1 here" and retries on /rtc. The test checks that path (the page's WebSockets and its
validate fetch), then audio both ways: the page's fake microphone (a 660 Hz WAV) is heard by a
``livekit`` Python SDK participant, and the page hears the SDK's 440 Hz tone (Web Audio).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from livekit import rtc as lk
from solders.keypair import Keypair

from gateway.client import GatewayClient, WebrtcSession
from tests.conftest import Chain
from tests.support.audio import tone_hz
from tests.support.browser import chromium, console_log, page_site, write_tone_wav
from tests.support.sfu_net import SfuNet, sfu_and_gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Far from the other test nodes, so the gateway routes these sessions to this module's node.
WHERE = {"lat": -36.85, "lon": 174.76, "country": "NZ"}
MIC_HZ, SDK_HZ = 660.0, 440.0

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sfu browser test</title>
<script src="/vendor/livekit-client.umd.js"></script></head>
<body><p id="state">idle</p>
<script>
const LK = window.LivekitClient;
window.heard = null;

// Joins with the client's default connect options; only the capture processing is off, so the
// fake microphone's tone reaches the other side unchanged.
async function join(url, token) {
  const room = new LK.Room({audioCaptureDefaults: {
    echoCancellation: false, noiseSuppression: false, autoGainControl: false}});
  window.room = room;
  room.on(LK.RoomEvent.TrackSubscribed, (track) => {
    if (track.kind === 'audio') window.heard = listen(track);
  });
  await room.connect(url, token);
  await room.localParticipant.setMicrophoneEnabled(true);
  document.getElementById('state').textContent = room.state;
  return room.state;
}

// A camera page: Chromium's fake camera, published with the client's defaults (VP8, three
// simulcast layers).
async function joinCamera(url, token) {
  const room = new LK.Room();
  window.room = room;
  await room.connect(url, token);
  await room.localParticipant.setCameraEnabled(true);
  return room.state;
}

// A viewer page: plays the first video track it gets and counts the frames it shows.
window.video = {frames: 0, width: 0, height: 0};
async function joinViewer(url, token) {
  const room = new LK.Room();
  window.room = room;
  room.on(LK.RoomEvent.TrackSubscribed, (track, publication) => {
    if (track.kind !== 'video') return;
    window.publication = publication;
    const element = track.attach();
    element.muted = true;
    document.body.appendChild(element);
    const count = () => {
      window.video = {frames: window.video.frames + 1,
                      width: element.videoWidth, height: element.videoHeight};
      element.requestVideoFrameCallback(count);
    };
    element.requestVideoFrameCallback(count);
  });
  await room.connect(url, token);
  return room.state;
}

// Web Audio on the received track: RMS and the strongest frequency, sampled every 100 ms.
function listen(track) {
  const element = track.attach();  // Chromium only runs a remote stream that is played
  document.body.appendChild(element);
  const ctx = new AudioContext();
  const source = ctx.createMediaStreamSource(new MediaStream([track.mediaStreamTrack]));
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 8192;
  source.connect(analyser);
  const samples = [];
  const wave = new Float32Array(analyser.fftSize);
  const spectrum = new Float32Array(analyser.frequencyBinCount);
  setInterval(() => {
    analyser.getFloatTimeDomainData(wave);
    analyser.getFloatFrequencyData(spectrum);
    let sum = 0;
    for (const v of wave) sum += v * v;
    let best = 0;
    for (let i = 1; i < spectrum.length; i++) if (spectrum[i] > spectrum[best]) best = i;
    samples.push({rms: Math.sqrt(sum / wave.length), hz: best * ctx.sampleRate / analyser.fftSize});
  }, 100);
  return samples;
}
</script></body></html>
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def net(chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SfuNet]:
    async with sfu_and_gateway(chain, tmp_path_factory.mktemp("sfu-browser"), WHERE) as n:
        yield n


async def tone(source: lk.AudioSource, freq: float) -> None:
    n = 0
    while True:
        t = (np.arange(480) + n) / 48000
        n += 480
        pcm = (np.sin(2 * np.pi * freq * t) * 12000).astype(np.int16)
        await source.capture_frame(lk.AudioFrame(pcm.tobytes(), 48000, 1, 480))


async def record_first_audio(room: lk.Room, identity: str, seconds: float) -> np.ndarray:
    """``seconds`` of 48 kHz PCM from ``identity``'s first audio track."""
    subscribed: asyncio.Future[lk.Track] = asyncio.get_running_loop().create_future()

    def on_track(track: lk.Track, pub: Any, participant: lk.RemoteParticipant) -> None:
        if participant.identity == identity and not subscribed.done():
            subscribed.set_result(track)

    room.on("track_subscribed", on_track)
    for participant in room.remote_participants.values():
        for pub in participant.track_publications.values():
            if participant.identity == identity and pub.track is not None:
                on_track(pub.track, pub, participant)
    track = await asyncio.wait_for(subscribed, 20)
    chunks: list[np.ndarray] = []
    async for event in lk.AudioStream(track, sample_rate=48000, num_channels=1):
        chunks.append(np.frombuffer(event.frame.data, dtype=np.int16).copy())
        if sum(len(c) for c in chunks) >= seconds * 48000:
            break
    return np.concatenate(chunks)


async def bought_sessions(
    net: SfuNet, prefix: str, *identities: str
) -> tuple[str, list[WebrtcSession]]:
    """A fresh room's name and one 5-minute WebRTC session per identity, bought from the real
    gateway by a new wallet with granted credits."""
    wallet = Keypair()
    await net.ledger.grant("solana", str(wallet.pubkey()), 2_000_000, memo=f"{prefix} test")
    room_name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    async with GatewayClient(net.gateway_url, wallet, session=net.http) as gw:
        return room_name, [await gw.create_webrtc_token(room_name, i, 5) for i in identities]


async def test_stock_client_joins_with_default_options_and_audio_flows_both_ways(
    net: SfuNet, tmp_path: Path
) -> None:
    room_name, (page_s, sdk_s) = await bought_sessions(net, "browser", "browser", "python")
    assert page_s.ws_url == net.ws_url, "the gateway routed the page's session to our node"

    sdk = lk.Room()
    await asyncio.wait_for(sdk.connect(sdk_s.ws_url, sdk_s.token), 20)
    source = lk.AudioSource(48000, 1)
    await sdk.local_participant.publish_track(
        lk.LocalAudioTrack.create_audio_track("tone", source),
        lk.TrackPublishOptions(source=lk.TrackSource.SOURCE_MICROPHONE),
    )
    player = asyncio.ensure_future(tone(source, SDK_HZ))
    mic = write_tone_wav(tmp_path / "mic.wav", MIC_HZ)
    try:
        async with chromium(mic) as browser, page_site(PAGE) as site:
            page = await browser.new_page()
            log = console_log(page)
            sockets: list[str] = []
            validates: list[tuple[str, int, str | None]] = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            page.on(
                "response",
                lambda r: (
                    validates.append(
                        (r.url, r.status, r.headers.get("access-control-allow-origin"))
                    )
                    if "/validate" in r.url
                    else None
                ),
            )
            await page.goto(site + "/")
            state = await page.evaluate("([u, t]) => join(u, t)", [page_s.ws_url, page_s.token])
            assert state == "connected", "\n".join(log)

            # The default path: /rtc/v1 first, its validate read cross-origin (404), then /rtc.
            paths = [s.split("?")[0].removeprefix(net.ws_url) for s in sockets]
            assert paths[:1] == ["/rtc/v1"] and paths[-1] == "/rtc", (paths, log)
            assert any(
                url.split("?")[0].endswith("/rtc/v1/validate") and status == 404 and cors == "*"
                for url, status, cors in validates
            ), validates

            # The page's fake microphone, as the Python SDK hears it.
            heard_by_sdk = await asyncio.wait_for(record_first_audio(sdk, "browser", 3.0), 40)
            assert abs(tone_hz(heard_by_sdk[-48000 * 2 :]) - MIC_HZ) < 10, "the page's 660 Hz"

            # The SDK's tone, as the page's Web Audio measured it (the last second of samples).
            await page.wait_for_function(
                "window.heard && window.heard.length >= 20", timeout=20_000
            )
            samples = json.loads(await page.evaluate("JSON.stringify(window.heard.slice(-10))"))
            loud = [s for s in samples if s["rms"] > 0.05]
            assert len(loud) >= 8, (samples, log)
            peak = float(np.median([s["hz"] for s in loud]))
            assert abs(peak - SDK_HZ) < 15, (peak, samples)
            print(
                f"page heard rms={np.median([s['rms'] for s in loud]):.3f} peak={peak:.0f} Hz;"
                f" sdk heard {tone_hz(heard_by_sdk[-96000:]):.0f} Hz"
            )
            await page.screenshot(path=str(tmp_path / "sfu-browser.png"))
            await page.evaluate("window.room.disconnect()")
    finally:
        player.cancel()
        await sdk.disconnect()


async def test_stock_client_publishes_the_fake_camera_and_another_page_sees_it(
    net: SfuNet, tmp_path: Path
) -> None:
    room_name, (camera_s, viewer_s) = await bought_sessions(net, "camera", "camera", "viewer")
    async with chromium() as browser, page_site(PAGE) as site:
        camera, viewer = await browser.new_page(), await browser.new_page()
        logs = console_log(camera), console_log(viewer)
        await camera.goto(site + "/")
        await viewer.goto(site + "/")
        args = [viewer_s.ws_url, viewer_s.token]
        assert await viewer.evaluate("([u, t]) => joinViewer(u, t)", args) == "connected"
        args = [camera_s.ws_url, camera_s.token]
        assert await camera.evaluate("([u, t]) => joinCamera(u, t)", args) == "connected"

        # The viewer's <video> shows frames the SFU forwarded as they came (VP8, not decoded).
        await viewer.wait_for_function("window.video.frames >= 30", timeout=30_000)
        shown = await viewer.evaluate("window.video")
        assert shown["width"] > 0 and shown["height"] > 0, (shown, logs)
        room = next(r for n, r in net.role.rooms.items() if n.startswith(room_name))
        owner = room.by_identity("camera")
        assert owner is not None
        (track,) = [t for t in owner.tracks.values() if t.kind == "video"]
        assert track.mime_type == "video/vp8" and track.frames >= 30
        print(f"viewer showed {shown['frames']} frames at {shown['width']}x{shown['height']}")
        # Simulcast: the stock client sends three layers; the viewer moves between them on asking.
        assert track.rids == ("q", "h", "f"), track.rids
        for quality, width in (("MEDIUM", 640), ("LOW", 320)):
            await viewer.evaluate(f"window.publication.setVideoQuality(LK.VideoQuality.{quality})")
            await viewer.wait_for_function(f"window.video.width === {width}", timeout=30_000)
        (forward,) = track.subscribers.values()
        assert forward.layer == 0 and forward.switches >= 2
        await viewer.screenshot(path=str(tmp_path / "viewer.png"))
        for page in (camera, viewer):
            await page.evaluate("window.room.disconnect()")
