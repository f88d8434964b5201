"""The registry program's build: clang-19 + programs/registry/link.py, reproducible byte for byte.

These tests need Debian's clang-19 (CI installs it: `apt-get install clang-19 llvm-19`). They do
not skip without it: a missing compiler fails them with the install hint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from solders.litesvm import LiteSVM
from solders.pubkey import Pubkey

from registry import program as P


def _load_build():
    """programs/registry/build.py, loaded by path under a name that cannot collide."""
    name = "registry_program_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, P.PROGRAM_DIR / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


build = _load_build()
link = build.link

BPF_CFLAGS = ["-target", "bpf", "-mcpu=v2", "-O2", "-fno-builtin", "-ffreestanding"]


def clang() -> str:
    try:
        return build.find_clang()
    except build.BuildError as exc:
        pytest.fail(str(exc))


def compile_c(tmp_path: Path, source: str, *flags: str, name: str = "t") -> bytes:
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    obj = tmp_path / f"{name}.o"
    proc = subprocess.run(
        [clang(), *(flags or BPF_CFLAGS), "-c", str(src), "-o", str(obj)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return obj.read_bytes()


# ---------------------------------------------------------------- reproducibility


def test_rebuild_reproduces_committed_so(tmp_path: Path):
    clang()
    assert P.SO_PATH.exists(), f"{P.SO_PATH} is missing: run python programs/registry/build.py"
    out = tmp_path / "registry.so"
    so = build.build(out)
    committed = P.SO_PATH.read_bytes()
    assert hashlib.sha256(so).hexdigest() == hashlib.sha256(committed).hexdigest(), (
        "programs/registry/registry.so is stale or the build is not reproducible: rebuild with "
        "`python programs/registry/build.py` and commit it. The committed one was built with "
        f"{build.REFERENCE_CLANG!r}; this machine has {build.clang_version()!r}."
    )
    # And the CLI entry point writes the same bytes.
    out2 = tmp_path / "cli.so"
    proc = subprocess.run(
        [sys.executable, str(P.PROGRAM_DIR / "build.py"), "--out", str(out2)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert out2.read_bytes() == committed
    assert hashlib.sha256(committed).hexdigest() in proc.stdout


@pytest.mark.fast
def test_missing_clang_names_the_package(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("CLANG", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(build.BuildError, match=r"apt-get install clang-19 llvm-19"):
        build.build(tmp_path / "x.so")


@pytest.mark.fast
def test_discriminators_header_matches_anchor():
    import json

    header = build.discriminators_header(json.loads(P.IDL_PATH.read_text()))
    values = {m[0]: int(m[1], 16) for m in re.findall(r"#define (\w+) 0x([0-9a-f]+)ULL", header)}
    owner, key = Pubkey.new_unique(), Pubkey.new_unique()
    ixs = {
        "IX_INITIALIZE_REGISTRY": P.initialize_registry_ix(owner, 60),
        "IX_ADD_ISSUER": P.add_issuer_ix(owner, key, "https://gw.example"),
        "IX_REMOVE_ISSUER": P.remove_issuer_ix(owner, key),
        "IX_UPDATE_ISSUER": P.update_issuer_ix(owner, key, "https://gw.example"),
        "IX_REGISTER_NODE": P.register_node_ix(
            owner, P.Role.SFU, P.NodeFields("u", 0, 0, "DE", 1, "1")
        ),
        "IX_HEARTBEAT": P.heartbeat_ix(owner, 0, 1),
        "IX_UPDATE_NODE": P.update_node_ix(owner, P.NodeFields("u", 0, 0, "DE", 1, "1")),
        "IX_DEREGISTER_NODE": P.deregister_node_ix(owner),
        "IX_SET_NODE_STATUS": P.set_node_status_ix(owner, key, P.NodeStatus.ACTIVE),
        "IX_APPROVE_NODE": P.approve_node_ix(owner, key),
    }
    assert set(ixs) == {k for k in values if k.startswith("IX_")}, "every instruction is checked"
    for name, ix in ixs.items():
        assert values[name] == int.from_bytes(bytes(ix.data)[:8], "little"), name
    for acc in ("Registry", "Issuer", "Node"):
        expected = int.from_bytes(P.account_discriminator(acc), "little")
        assert values[f"DISC_{acc.upper()}"] == expected
    codes = dict(re.findall(r"#define E_(\w+) (\d+)", header))
    assert {k: int(v) for k, v in codes.items()} == P.error_codes()


# ---------------------------------------------------------------- the ELF itself


def parse_elf(raw: bytes):
    ehdr = link.EHDR.unpack_from(raw, 0)
    e_shoff, e_shnum, e_shstrndx = ehdr[6], ehdr[12], ehdr[13]
    shdrs = [link.SHDR.unpack_from(raw, e_shoff + i * link.SHDR.size) for i in range(e_shnum)]
    strtab = shdrs[e_shstrndx]
    names = raw[strtab[4] : strtab[4] + strtab[5]]
    sections = {}
    for sh in shdrs[1:]:
        name = names[sh[0] : names.index(b"\0", sh[0])].decode()
        sections[name] = sh
    return ehdr, sections


@pytest.mark.fast
def test_so_layout():
    raw = P.SO_PATH.read_bytes()
    ehdr, sections = parse_elf(raw)
    ident, e_type, e_machine, _v, e_entry, _phoff, _shoff, e_flags = ehdr[:8]
    assert ident[:4] == b"\x7fELF" and ident[4] == 2 and ident[5] == 1
    assert (e_type, e_machine, e_flags) == (link.ET_DYN, link.EM_BPF, 0)  # SBPFv0
    assert list(sections) == [
        ".text",
        ".rodata",
        ".dynamic",
        ".dynsym",
        ".dynstr",
        ".rel.dyn",
        ".shstrtab",
    ]
    for name, sh in sections.items():
        if sh[2] & link.SHF_ALLOC:
            assert sh[3] == sh[4], f"{name}: sh_addr != sh_offset"
        assert not sh[2] & link.SHF_WRITE or name == ".dynamic"
    text = sections[".text"]
    assert text[3] <= e_entry < text[3] + text[5] and (e_entry - text[3]) % 8 == 0
    # dynsym: entrypoint (defined) and the syscalls (undefined), nothing else.
    dynsym, dynstr = sections[".dynsym"], sections[".dynstr"]
    strs = raw[dynstr[4] : dynstr[4] + dynstr[5]]
    syms = []
    for i in range(1, dynsym[5] // link.SYM.size):
        st_name, _info, _o, shndx, value, _size = link.SYM.unpack_from(raw, dynsym[4] + i * 24)
        syms.append((strs[st_name : strs.index(b"\0", st_name)].decode(), shndx, value))
    assert syms[0] == ("entrypoint", 1, e_entry)
    assert {s[0] for s in syms[1:]} <= build.SYSCALLS and all(s[1] == 0 for s in syms[1:])
    # Relocations: only RELATIVE (lddw of .rodata) and 64_32 (syscalls), all inside .text.
    rel = sections[".rel.dyn"]
    for i in range(rel[5] // 16):
        off, info = link.REL.unpack_from(raw, rel[4] + i * 16)
        assert text[4] <= off < text[4] + text[5]
        assert info & 0xFFFFFFFF in (link.R_BPF_64_RELATIVE, link.R_BPF_64_32)
        opcode = raw[off]
        assert opcode == (link.OP_LDDW if info & 0xFFFFFFFF == 8 else link.OP_CALL)
    # Every call is a syscall (imm -1, relocated) or an in-range pc-relative call.
    n = text[5] // 8
    for pc in range(n):
        if raw[text[4] + pc * 8] == link.OP_CALL:
            (imm,) = struct.unpack_from("<i", raw, text[4] + pc * 8 + 4)
            assert imm == -1 or 0 <= pc + 1 + imm < n


# ---------------------------------------------------------------- the loader's verdict


def _add(raw: bytes) -> None:
    LiteSVM().add_program(Pubkey.new_unique(), raw)


@pytest.mark.fast
def test_committed_so_loads():
    _add(P.SO_PATH.read_bytes())


@pytest.mark.fast
@pytest.mark.parametrize(
    "mutate",
    [
        lambda raw: b"not an elf at all",
        lambda raw: b"",
        lambda raw: raw[:200],
        lambda raw: raw[:18] + struct.pack("<H", 62) + raw[20:],  # e_machine x86-64
        lambda raw: raw[:16] + struct.pack("<H", 1) + raw[18:],  # ET_REL
        lambda raw: raw[:48] + struct.pack("<I", 99) + raw[52:],  # unknown SBPF version
    ],
    ids=["garbage", "empty", "truncated", "x86-64-machine", "relocatable", "bad-flags"],
)
def test_bad_elf_is_rejected(mutate):
    bad = mutate(P.SO_PATH.read_bytes())
    # pyo3's PanicException derives from BaseException, not Exception.
    with pytest.raises(BaseException) as info:
        _add(bad)
    assert not isinstance(info.value, (KeyboardInterrupt, SystemExit))


@pytest.mark.fast
def test_foreign_elf_is_rejected():
    host_binary = Path(shutil.which("true") or "/bin/true").read_bytes()
    assert host_binary[:4] == b"\x7fELF"
    with pytest.raises(BaseException) as info:
        _add(host_binary)
    assert not isinstance(info.value, (KeyboardInterrupt, SystemExit))


# ---------------------------------------------------------------- link.py refusals


def test_link_minimal_program_runs(tmp_path: Path):
    obj = compile_c(
        tmp_path,
        """
        typedef unsigned long long u64;
        extern void sol_log_(const char *, u64);
        static const char greeting[] = "hello from link.py";
        __attribute__((noinline)) u64 twice(u64 x) { return x * 2; }
        u64 entrypoint(const unsigned char *input) {
            sol_log_(greeting, sizeof(greeting) - 1);
            return twice(21) == 42 ? 0 : 1;
        }
    """,
    )
    so = link.link(obj, allow_undefined={"sol_log_"})
    assert link.link(obj, allow_undefined={"sol_log_"}) == so  # deterministic
    from solders.instruction import Instruction
    from solders.keypair import Keypair
    from solders.transaction import Transaction

    svm = LiteSVM()
    pid = Pubkey.new_unique()
    svm.add_program(pid, so)
    payer = Keypair()
    svm.airdrop(payer.pubkey(), 10**9)
    tx = Transaction.new_signed_with_payer(
        [Instruction(pid, b"", [])], payer.pubkey(), [payer], svm.latest_blockhash()
    )
    meta = svm.send_transaction(tx)
    assert "Program log: hello from link.py" in meta.logs()


@pytest.mark.parametrize(
    "source,flags,message",
    [
        (
            "unsigned long long n; unsigned long long entrypoint(void) { return ++n; }",
            (),
            "mutable globals",
        ),
        (
            "static unsigned long long n = 3; unsigned long long entrypoint(void) { return ++n; }",
            (),
            "mutable globals",
        ),
        (
            (
                "extern void memcpy_like(void *, unsigned long long);"
                "unsigned long long entrypoint(unsigned char *p) "
                "{ memcpy_like(p, p[0]); return 0; }"
            ),
            (),
            "not a known syscall",
        ),
        ("unsigned long long helper(void) { return 1; }", (), "entrypoint"),
        (
            (
                "__attribute__((noinline)) unsigned long long f(void) { return 1; }"
                "unsigned long long entrypoint(void) { return f(); }"
            ),
            ("-ffunction-sections",),
            "exactly one executable section",
        ),
    ],
)
def test_link_refuses(tmp_path: Path, source: str, flags: tuple, message: str):
    obj = compile_c(tmp_path, source, *BPF_CFLAGS, *flags)
    with pytest.raises(link.LinkError, match=message):
        link.link(obj, allow_undefined=build.SYSCALLS)


def test_link_refuses_non_bpf_object(tmp_path: Path):
    obj = compile_c(tmp_path, "int entrypoint(void) { return 0; }", "-O2")
    with pytest.raises(link.LinkError, match="EM_BPF"):
        link.link(obj)
    with pytest.raises(link.LinkError, match="not an ELF"):
        link.link(b"hello")
