"""Node configs: every shipped config loads; mistakes name the key and the fix."""

import re
from pathlib import Path

import pytest

from node import cli
from node.config import ConfigError, load_config

pytestmark = pytest.mark.fast  # unit tests: no process, no model (make test-fast)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BASE = (CONFIGS / "node-stt.yaml").read_text()


@pytest.mark.parametrize("role", ["sfu", "stt", "tts"])
def test_shipped_configs_load(role: str) -> None:
    config = load_config(CONFIGS / f"node-{role}.yaml", role)
    assert config.role == role
    assert config.capacity >= 1
    assert config.public_url.startswith("http://127.0.0.1:")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'capcity'"):
        load_config(write(tmp_path, BASE + "capcity: 3\n"), "stt")


def test_bad_values_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="location.country"):
        load_config(write(tmp_path, BASE.replace("country: DE", "country: Germany")), "stt")
    with pytest.raises(ConfigError, match="location.lat"):
        load_config(write(tmp_path, BASE.replace("lat: 52.52", "lat: 123")), "stt")
    with pytest.raises(ConfigError, match="capacity"):
        load_config(write(tmp_path, re.sub(r"(?m)^capacity: \d+", "capacity: 0", BASE)), "stt")
    with pytest.raises(ConfigError, match="public_url"):
        load_config(write(tmp_path, BASE.replace("public_url: http://", "public_url: ")), "stt")


@pytest.mark.parametrize(
    "line",
    [
        "gateway_url: 127.0.0.1:8402",
        "gateway_url: ftp://gw.example",
        "report_to: [https://gw.example, gw2.example]",
        "report_to: ['http://']",
    ],
)
def test_a_gateway_url_that_is_not_one_is_named(tmp_path: Path, line: str) -> None:
    with pytest.raises(ConfigError, match="is not a gateway URL.*https://"):
        text = BASE.replace("gateway_url: http://127.0.0.1:8402", line)
        load_config(write(tmp_path, text), "stt")


def test_gateway_urls_are_accepted(tmp_path: Path) -> None:
    text = BASE + "report_to: [https://gw.example:8443]\n"
    config = load_config(write(tmp_path, text), "stt")
    assert (config.gateway_url, config.report_to) == (
        "http://127.0.0.1:8402",
        ["https://gw.example:8443"],
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://stt.example.net:8001",
        "ws://10.0.0.5",
        "ftp://x.example",
        "http://127.0.0.1.evil.example",
    ],
)
def test_public_url_must_be_tls_or_loopback(tmp_path: Path, url: str) -> None:
    """The registry program would refuse these (InsecureUrl): the config says so first."""
    text = BASE.replace("public_url: http://127.0.0.1:8001", f"public_url: {url}")
    with pytest.raises(ConfigError, match="public_url.*https://"):
        load_config(write(tmp_path, text), "stt")


@pytest.mark.parametrize(
    "url",
    [
        "https://stt.example.net",
        "wss://sfu.example.net:7880",
        "http://localhost:8001",
        "http://[::1]:8001",
    ],
)
def test_public_url_tls_or_loopback_is_accepted(tmp_path: Path, url: str) -> None:
    text = BASE.replace("public_url: http://127.0.0.1:8001", f"public_url: {url}")
    assert load_config(write(tmp_path, text), "stt").public_url == url


def test_missing_key_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing required key 'public_url'"):
        load_config(write(tmp_path, BASE.replace("public_url:", "# public_url:")), "stt")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "keypair: [unclosed\n"), "stt")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", "stt")


def test_no_role_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no role"):
        load_config(write(tmp_path, BASE))


def test_cli_refuses_a_bad_config_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--role", "stt", "--config", str(write(tmp_path, BASE + "bogus: 1\n"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("node: ") and "bogus" in err and "Traceback" not in err


def test_a_role_that_is_not_built_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from node import roles

    monkeypatch.setitem(roles.ROLE_MODULES, "stt", "node.not_built_role")
    with pytest.raises(roles.RoleNotBuilt, match="stt role is not built"):
        roles.load_role("stt", None)  # type: ignore[arg-type]
    with pytest.raises(roles.RoleNotBuilt, match="unknown role"):
        roles.load_role("mixer", None)  # type: ignore[arg-type]
