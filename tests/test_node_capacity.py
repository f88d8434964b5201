"""node/capacity.py: the advertised capacity comes from a measured cost, within 1..config, and the
measurement is cached per role, model and machine (the TTS test measures with the real model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from node.capacity import (
    CACHE_FILE,
    HEADROOM,
    CalibrationError,
    calibrate,
    derive_capacity,
    machine_id,
    usable_cores,
)


def test_capacity_is_what_the_cores_carry_within_one_and_the_config() -> None:
    # 0.68 core-seconds per second of speech (Kokoro on 2 cores, issue 18): 2 streams fit
    assert derive_capacity(0.68, 2, 16) == 2
    # 8 real-time STT streams per core: 0.1 core-seconds each -> 16 on 2 cores with headroom
    assert derive_capacity(0.1, 2, 64) == math.floor(2 * HEADROOM / 0.1) == 16
    assert derive_capacity(0.001, 2, 16) == 16  # the config stays the upper bound
    assert derive_capacity(5.0, 2, 16) == 1  # a slow box still serves one


@pytest.mark.parametrize("cost", [0.0, -1.0, float("nan"), float("inf")])
def test_a_measurement_that_did_no_work_is_refused(cost: float, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="not a positive number"):
        derive_capacity(cost, 2, 16)
    with pytest.raises(CalibrationError, match="not a positive number"):
        calibrate("tts", "m", lambda: cost, tmp_path)
    assert not (tmp_path / CACHE_FILE).exists()  # nothing cached


def test_upper_bound_below_one_is_refused() -> None:
    with pytest.raises(CalibrationError, match="upper bound 0"):
        derive_capacity(0.5, 2, 0)


def test_measured_once_per_role_model_and_machine(tmp_path: Path) -> None:
    calls: list[str] = []

    def measure(name: str, cost: float):
        def run() -> float:
            calls.append(name)
            return cost

        return run

    a = calibrate("stt", "tiny.en", measure("a", 0.1), tmp_path)
    assert not a.cached and a.cost == 0.1 and a.cores == usable_cores()
    again = calibrate("stt", "tiny.en", measure("again", 9.0), tmp_path)
    assert again.cached and again.cost == 0.1 and again.machine == machine_id()
    other = calibrate("stt", "base", measure("other", 0.3), tmp_path)
    assert not other.cached and other.cost == 0.3
    assert calls == ["a", "other"]
    keys = json.loads((tmp_path / CACHE_FILE).read_text())
    assert sorted(keys) == sorted(f"stt|{m}|{machine_id()}" for m in ("tiny.en", "base"))


def test_a_damaged_cache_is_measured_again(tmp_path: Path) -> None:
    (tmp_path / CACHE_FILE).write_text("{not json")
    assert not calibrate("sfu", "fwd", lambda: 0.01, tmp_path).cached
    (tmp_path / CACHE_FILE).write_text(json.dumps({f"sfu|fwd|{machine_id()}": {"cost": -2}}))
    fresh = calibrate("sfu", "fwd", lambda: 0.02, tmp_path)
    assert not fresh.cached and fresh.cost == 0.02


def test_without_a_state_dir_nothing_is_cached() -> None:
    assert not calibrate("tts", "m", lambda: 0.5, None).cached
    assert not calibrate("tts", "m", lambda: 0.5, None).cached
