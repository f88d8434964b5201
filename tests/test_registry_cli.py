"""The operator's `registry` command, run as a real subprocess against the session localnet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from solders.keypair import Keypair

from registry.keys import load_keypair
from registry.tokens import verify_token
from tests.conftest import ROOT, Chain, free_port


def registry(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "registry.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"registry {' '.join(args)} failed: {proc.stderr}")
    return proc


def test_keygen_writes_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    proc = registry("keygen", str(out))
    assert str(load_keypair(out).pubkey()) in proc.stdout
    again = registry("keygen", str(out), check=False)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"


def test_register_list_deregister(chain: Chain, tmp_path: Path) -> None:
    key = tmp_path / "node.json"
    registry("keygen", str(key))
    pub = str(load_keypair(key).pubkey())
    registry(
        "node",
        "register",
        "--rpc",
        chain.url,
        "--keypair",
        str(key),
        "--role",
        "tts",
        "--url",
        "http://127.0.0.1:8002",
        "--lat",
        "48.8566",
        "--lon",
        "2.3522",
        "--country",
        "fr",
        "--capacity",
        "12",
        "--version",
        "0.1.0",
    )
    nodes = json.loads(registry("nodes", "--rpc", chain.url, "--role", "tts", "--json").stdout)
    mine = next(n for n in nodes if n["pubkey"] == pub)
    for field in (
        "pubkey",
        "role",
        "url",
        "lat",
        "lon",
        "country",
        "load",
        "capacity",
        "version",
        "status",
        "stale",
        "last_heartbeat",
    ):
        assert field in mine
    assert (mine["role"], mine["url"], mine["country"], mine["capacity"], mine["status"]) == (
        "tts",
        "http://127.0.0.1:8002",
        "FR",
        12,
        "active",
    )
    assert (mine["lat"], mine["lon"], mine["stale"]) == (48.8566, 2.3522, False)

    table = registry("nodes", "--rpc", chain.url).stdout
    assert "ROLE" in table.splitlines()[0]
    assert any(pub in line and "tts" in line and "12" in line for line in table.splitlines())

    twice = registry(
        "node",
        "register",
        "--rpc",
        chain.url,
        "--keypair",
        str(key),
        "--role",
        "tts",
        "--url",
        "https://x.example",
        "--lat",
        "0",
        "--lon",
        "0",
        "--country",
        "FR",
        "--capacity",
        "1",
        check=False,
    )
    assert twice.returncode == 1
    assert "AlreadyInitialized" in twice.stderr and "Traceback" not in twice.stderr

    registry("node", "deregister", "--rpc", chain.url, "--keypair", str(key))
    nodes = json.loads(registry("nodes", "--rpc", chain.url, "--json").stdout)
    assert pub not in {n["pubkey"] for n in nodes}


def test_suspend_and_activate_by_authority(chain: Chain, tmp_path: Path) -> None:
    key = tmp_path / "node.json"
    registry("keygen", str(key))
    pub = str(load_keypair(key).pubkey())
    registry(
        "node",
        "register",
        "--rpc",
        chain.url,
        "--keypair",
        str(key),
        "--role",
        "sfu",
        "--url",
        "http://127.0.0.1:7880",
        "--lat",
        "1",
        "--lon",
        "2",
        "--country",
        "SG",
        "--capacity",
        "3",
    )
    registry("node", "suspend", pub, "--rpc", chain.url, "--keypair", str(chain.authority_path))
    nodes = json.loads(registry("nodes", "--rpc", chain.url, "--json").stdout)
    assert next(n for n in nodes if n["pubkey"] == pub)["status"] == "suspended"
    refused = registry(
        "node", "activate", pub, "--rpc", chain.url, "--keypair", str(key), check=False
    )
    assert refused.returncode == 1 and "NotAuthority" in refused.stderr
    registry("node", "activate", pub, "--rpc", chain.url, "--keypair", str(chain.authority_path))
    registry("node", "deregister", "--rpc", chain.url, "--keypair", str(key))


def test_issuer_add_update_remove_with_its_url(chain: Chain) -> None:
    key = str(Keypair().pubkey())
    auth = ["--rpc", chain.url, "--keypair", str(chain.authority_path)]

    def listed() -> dict[str, str]:
        out = registry("issuer", "list", "--rpc", chain.url, "--json").stdout
        return {i["key"]: i["url"] for i in json.loads(out)}

    bad = registry("issuer", "add", key, *auth, "--url", "http://gw.example", check=False)
    assert bad.returncode == 2 and "https://" in bad.stderr and key not in listed()
    missing = registry("issuer", "add", key, *auth, check=False)
    assert missing.returncode == 2 and "--url" in missing.stderr
    added = registry("issuer", "add", key, *auth, "--url", "https://gw-a.example")
    assert "added at https://gw-a.example" in added.stdout
    assert listed()[key] == "https://gw-a.example"
    registry("issuer", "update", key, *auth, "--url", "http://127.0.0.1:8402")
    assert listed()[key] == "http://127.0.0.1:8402"
    text = registry("issuer", "list", "--rpc", chain.url).stdout
    assert f"{key}  http://127.0.0.1:8402  added" in text
    registry("issuer", "remove", key, *auth)
    assert key not in listed()


def test_issuer_list_and_token_mint(chain: Chain) -> None:
    listed = json.loads(registry("issuer", "list", "--rpc", chain.url, "--json").stdout)
    assert str(chain.issuer.pubkey()) in {i["key"] for i in listed}
    node = str(Keypair().pubkey())
    token = registry(
        "token",
        "mint",
        "--issuer-key",
        str(chain.issuer_path),
        "--service",
        "webrtc",
        "--identity",
        "alice",
        "--ttl",
        "60",
        "--room",
        "demo",
        "--audience",
        node,
    ).stdout.strip()
    claims = verify_token(token, {i["key"] for i in listed}, "webrtc", audience=node)
    assert (claims.identity, claims.room) == ("alice", "demo")
    bad = registry(
        "token",
        "mint",
        "--issuer-key",
        str(chain.issuer_path),
        "--service",
        "stt",
        "--identity",
        "a",
        "--ttl",
        "60",
        "--audience",
        node,
        check=False,
    )
    assert bad.returncode == 1 and "limit" in bad.stderr
    bad = registry(
        "token",
        "mint",
        "--issuer-key",
        str(chain.issuer_path),
        "--service",
        "stt",
        "--identity",
        "a",
        "--ttl",
        "60",
        "--limit",
        "5",
        "--audience",
        "nope",
        check=False,
    )
    assert bad.returncode != 0 and "'nope' is not a base58" in bad.stderr


def test_airdrop_is_localnet_only(chain: Chain, tmp_path: Path) -> None:
    key = tmp_path / "w.json"
    registry("keygen", str(key))
    pub = str(load_keypair(key).pubkey())
    out = registry("airdrop", "--rpc", chain.url, "--to", pub, "--sol", "1.5").stdout
    assert "balance 1.5 SOL" in out
    remote = registry("airdrop", "--rpc", "https://api.devnet.solana.com", "--to", pub, check=False)
    assert remote.returncode == 1 and "localnet only" in remote.stderr


def test_bad_input_is_one_line(chain: Chain) -> None:
    proc = registry("airdrop", "--rpc", chain.url, "--to", "not-a-key", check=False)
    assert proc.returncode == 2 and "not a base58" in proc.stderr
    proc = registry("init", "--rpc", chain.url, "--keypair", "/nonexistent/k.json", check=False)
    assert proc.returncode == 1 and "registry keygen" in proc.stderr
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = registry("nodes", "--rpc", nobody, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"JSON-RPC at {nobody} did not answer" in proc.stderr and "--rpc" in proc.stderr
    for ttl in ("0", "-3", "nan", "inf", "1e9", "soon"):  # refused before any transaction
        proc = registry("init", "--rpc", chain.url, "--presence-ttl-hours", ttl, check=False)
        assert proc.returncode == 2 and "--presence-ttl-hours" in proc.stderr, (ttl, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_init_policy_and_approve(tmp_path: Path) -> None:
    """On a fresh localnet: init only by the upgrade authority, `--policy approval`, a new node is
    listed as pending until `registry node approve`, and cannot update its entry meanwhile."""
    from tests.conftest import start_localnet_process

    net = start_localnet_process(tmp_path / "ledger")
    try:
        stranger = tmp_path / "stranger.json"
        registry("keygen", str(stranger))
        refused = registry(
            "init", "--rpc", net.url, "--keypair", str(stranger), "--policy", "open", check=False
        )
        assert refused.returncode == 1 and "not the registry program's upgrade authority" in (
            refused.stderr
        )
        bad = registry(
            "init",
            "--rpc",
            net.url,
            "--keypair",
            str(net.authority_path),
            "--policy",
            "lax",
            check=False,
        )
        assert bad.returncode == 2 and "expected one of approval, open" in bad.stderr
        out = registry("init", "--rpc", net.url, "--keypair", str(net.authority_path)).stdout
        assert "policy approval" in out  # the default

        key = tmp_path / "node.json"
        registry("keygen", str(key))
        pub = str(load_keypair(key).pubkey())
        node_args = [
            "--rpc",
            net.url,
            "--keypair",
            str(key),
            "--url",
            "https://stt.example.net",
            "--lat",
            "1",
            "--lon",
            "2",
            "--country",
            "SG",
            "--capacity",
            "3",
        ]
        out = registry("node", "register", "--role", "stt", *node_args).stdout
        assert "(pending)" in out and f"registry node approve {pub}" in out
        table = registry("nodes", "--rpc", net.url).stdout.splitlines()
        assert any(pub in line and "pending" in line for line in table)
        update = registry("node", "update", *node_args[:-1], "4", check=False)
        assert update.returncode == 1 and "NodePending" in update.stderr
        insecure = registry(
            "node",
            "update",
            *[a if a != "https://stt.example.net" else "http://stt.example.net" for a in node_args],
            check=False,
        )
        assert insecure.returncode == 1 and "https://" in insecure.stderr

        not_authority = registry(
            "node", "approve", pub, "--rpc", net.url, "--keypair", str(key), check=False
        )
        assert not_authority.returncode == 1 and "NotAuthority" in not_authority.stderr
        registry("node", "approve", pub, "--rpc", net.url, "--keypair", str(net.authority_path))
        nodes = json.loads(registry("nodes", "--rpc", net.url, "--json").stdout)
        assert next(n for n in nodes if n["pubkey"] == pub)["status"] == "active"
        again = registry(
            "node",
            "approve",
            pub,
            "--rpc",
            net.url,
            "--keypair",
            str(net.authority_path),
            check=False,
        )
        assert again.returncode == 1 and "NodeNotPending" in again.stderr
        registry("node", "update", *node_args[:-1], "4")
    finally:
        net.stop()
