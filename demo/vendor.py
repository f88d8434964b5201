"""Fetches the demo's third-party browser files from the npm registry into demo/static/vendor/.

The pages are plain HTML and JS with no build step and no CDN, so the few files they load from
packages are copied out of the published tarballs (``npm pack``) once, by ``make setup``. A stamp
holding the pin list makes a second run a no-op; changing a pin re-fetches.

The map is the smallest honest option: Natural Earth's countries at 1:110m as TopoJSON
(world-atlas, about 105 KB) decoded by topojson-client (about 7 KB). The projection is
equirectangular, a linear map of longitude and latitude that needs no library (d3-geo would bring
d3-array along for a projection we do not need).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VENDOR = Path(__file__).parent / "static" / "vendor"
STAMP = VENDOR / ".stamp"

# (package, exact version, file inside the package, name under static/vendor/)
PINS: tuple[tuple[str, str, str, str], ...] = (
    ("livekit-client", "2.23.0", "dist/livekit-client.umd.js", "livekit-client.umd.js"),
    ("world-atlas", "2.0.2", "countries-110m.json", "countries-110m.json"),
    ("topojson-client", "3.1.0", "dist/topojson-client.min.js", "topojson-client.min.js"),
)


def stamp_text() -> str:
    return "".join(f"{name}@{version} {inner} -> {dest}\n" for name, version, inner, dest in PINS)


def fetch(vendor: Path = VENDOR) -> None:
    """Packs each pinned package with npm into a temp dir and copies the named file out."""
    vendor.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="voicenet-vendor-") as tmp:
        specs = [f"{name}@{version}" for name, version, _, _ in PINS]
        subprocess.run(
            ["npm", "pack", "--silent", *specs], cwd=tmp, check=True, stdout=subprocess.DEVNULL
        )
        for name, version, inner, dest in PINS:
            tarball = Path(tmp) / f"{name.replace('/', '-').lstrip('@')}-{version}.tgz"
            with tarfile.open(tarball) as archive:
                member = archive.extractfile(f"package/{inner}")
                if member is None:
                    raise SystemExit(
                        f"{name}@{version} has no file {inner}: fix PINS in {__file__}"
                    )
                with open(vendor / dest, "wb") as out:
                    shutil.copyfileobj(member, out)
            print(f"vendor: {name}@{version} {inner} -> {vendor / dest}")


def main() -> None:
    vendor = VENDOR
    if (
        STAMP.exists()
        and STAMP.read_text() == stamp_text()
        and all((vendor / dest).exists() for _, _, _, dest in PINS)
    ):
        return
    fetch(vendor)
    STAMP.write_text(stamp_text())


if __name__ == "__main__":
    sys.exit(main())
