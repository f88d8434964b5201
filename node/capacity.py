"""The capacity a node advertises, measured on this machine instead of typed into a config.

A config's ``capacity`` was a promise nobody checked: a 2-core box advertised 16 TTS streams and
served 15 of them with gaps. So at start each role measures what one unit of its work (one
real-time stream, one forwarded track) costs here, in core-seconds per second, with its real
model or forwarding path, and advertises what the cores it may use can carry with some headroom;
the config value stays an upper bound (an operator may promise less, never more).

Calibration takes seconds, so its result is cached per role, model and machine in the node's
state directory: a restart reuses it, a new CPU or a new model measures again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("node.capacity")

CACHE_FILE = "capacity-calibration.json"
# share of the cores the advertised streams may use: the rest absorbs the event loop, resampling,
# sockets and the jitter of a shared machine
HEADROOM = 0.8


class CalibrationError(ValueError):
    """A measurement that cannot be right (zero, negative or not a number)."""


@dataclass(frozen=True)
class Calibration:
    """One measurement: ``cost`` core-seconds per second of one unit of ``role`` work."""

    role: str
    model: str
    machine: str
    cores: int
    cost: float
    measured_at: float
    cached: bool = False

    def capacity(self, upper: int) -> int:
        return derive_capacity(self.cost, self.cores, upper)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_id() -> str:
    """What makes a measurement comparable: the CPU model and the cores this process may use."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}|{cpu}|{usable_cores()} cores"


def derive_capacity(cost: float, cores: int, upper: int, headroom: float = HEADROOM) -> int:
    """Units of work the cores carry at ``cost`` core-seconds per second each, within 1..upper.

    Never below 1: a node that cannot carry one unit still serves one (and says so in its log)
    rather than advertising nothing and registering an entry nobody can use.
    """
    _check_cost(cost)
    if upper < 1:
        raise CalibrationError(
            f"capacity upper bound {upper} must be at least 1 (the config's `capacity`)"
        )
    fits = math.floor(cores * headroom / cost + 1e-9)
    if fits < 1:
        log.warning(
            "one unit of work costs %.2f core-seconds per second here, more than %d "
            "cores carry with headroom %.0f%%: advertising 1",
            cost,
            cores,
            headroom * 100,
        )
    return max(1, min(upper, fits))


def _check_cost(cost: float) -> None:
    if not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost <= 0:
        raise CalibrationError(
            f"measured cost {cost!r} core-seconds per second is not a positive "
            "number: the calibration did no work; check the model loads"
        )


def calibrate(
    role: str, model: str, measure: Callable[[], float], state_dir: Path | str | None
) -> Calibration:
    """The cached calibration of ``role`` with ``model`` on this machine, or a new one.

    ``measure`` is blocking and returns core-seconds per second of one unit of work; it runs only
    when the cache (``state_dir/capacity-calibration.json``) has no entry for this role, model and
    machine. Without a state directory nothing is cached.
    """
    machine, cores = machine_id(), usable_cores()
    key = f"{role}|{model}|{machine}"
    path = Path(state_dir) / CACHE_FILE if state_dir else None
    entries = _read(path)
    hit = entries.get(key)
    if hit is not None:
        try:
            _check_cost(hit["cost"])
            return Calibration(
                role,
                model,
                machine,
                cores,
                float(hit["cost"]),
                float(hit["measured_at"]),
                cached=True,
            )
        except (CalibrationError, KeyError, TypeError, ValueError):
            log.warning("ignoring a bad calibration cache entry for %s in %s", key, path)
    t0 = time.monotonic()
    cost = measure()
    _check_cost(cost)
    result = Calibration(role, model, machine, cores, float(cost), time.time())
    log.info(
        "calibrated %s (%s): %.3f core-seconds per second of work, measured in %.1f s",
        role,
        model,
        cost,
        time.monotonic() - t0,
    )
    if path is not None:
        entries[key] = {k: v for k, v in asdict(result).items() if k in ("cost", "measured_at")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(path)
    return result


def _read(path: Path | None) -> dict[str, dict[str, float]]:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("calibration cache %s is unreadable: measuring again", path)
        return {}
    return data if isinstance(data, dict) else {}
