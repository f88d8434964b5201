"""A minimal static linker for Solana programs: one relocatable EM_BPF object in, an SBPFv0 shared
object out.

No linker on the package registries produces an ELF that Solana's loader accepts (ld.lld rejects
the BPF relocations of a shared object, newer lld rejects e_machine 247), so the project carries
this one. It handles exactly what ``clang -target bpf -mcpu=v2 -O2`` emits for a program without
mutable globals, and refuses everything else loudly:

* all executable input sections must be one ``.text``; ``.rodata*`` sections are concatenated into
  one ``.rodata``; ``.data*``/``.bss*``/COMMON (mutable globals) are refused;
* ``R_BPF_64_64`` on an ``lddw`` of read-only data: the address (= file offset, since
  ``sh_addr == sh_offset``) is written into the instruction and an ``R_BPF_64_RELATIVE`` dynamic
  relocation is emitted, so the loader rebases it into the VM's program region;
* ``R_BPF_64_32`` on a ``call`` of a function defined in the object: resolved to a pc-relative
  call (``imm = target - (pc + 1)``), which is how the SBPFv0 loader recognises internal calls;
* ``R_BPF_64_32`` on a ``call`` of an undefined symbol (a syscall such as ``sol_log_``): the
  immediate stays ``-1`` and an ``R_BPF_64_32`` dynamic relocation against a ``.dynsym`` entry of
  that name is emitted; the loader puts the murmur3 hash of the name there.

Output layout (every allocated section has ``sh_addr == sh_offset``; ``e_flags`` 0 = SBPFv0):
ELF header, program headers, ``.text``, ``.rodata``, ``.dynamic``, ``.dynsym``, ``.dynstr``,
``.rel.dyn``, ``.shstrtab``, section headers. The output is a pure function of the input bytes.

The input object is read with pyelftools; the output is written here, field by field, because
no library writes this layout (and byte-for-byte reproducibility wants every byte chosen here).

Usage: ``python link.py input.o -o output.so [--allow-undefined NAME ...]``
"""

from __future__ import annotations

import argparse
import io
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

# ---------------------------------------------------------------- ELF constants of the output

EM_BPF = 247
ET_DYN = 3
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1

SHT_NULL = 0
SHT_PROGBITS = 1
SHT_STRTAB = 3
SHT_DYNAMIC = 6
SHT_REL = 9
SHT_DYNSYM = 11

SHF_WRITE = 0x1
SHF_ALLOC = 0x2
SHF_EXECINSTR = 0x4

SHN_UNDEF = 0
STB_GLOBAL = 1
STT_NOTYPE = 0
STT_FUNC = 2

PT_LOAD = 1
PT_DYNAMIC = 2
PF_X = 1
PF_W = 2
PF_R = 4

DT_NULL = 0
DT_STRTAB = 5
DT_SYMTAB = 6
DT_STRSZ = 10
DT_SYMENT = 11
DT_REL = 17
DT_RELSZ = 18
DT_RELENT = 19
DT_TEXTREL = 22
DT_FLAGS = 30
DF_TEXTREL = 0x4

R_BPF_NONE = 0
R_BPF_64_64 = 1
R_BPF_64_RELATIVE = 8
R_BPF_64_32 = 10

OP_LDDW = 0x18
OP_CALL = 0x85

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR = struct.Struct("<IIQQQQIIQQ")
SYM = struct.Struct("<IBBHQQ")
REL = struct.Struct("<QQ")
DYN = struct.Struct("<qQ")
INSN = 8
ENTRY_SYMBOL = "entrypoint"
TEXT_SHNDX = 1  # .text is the output's first section


class LinkError(Exception):
    """The object cannot be turned into a Solana program; the message says why."""


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a if a > 1 else n


# ---------------------------------------------------------------- the input object


@dataclass(frozen=True)
class Section:
    """An input section: what placement and relocation need of its header, and its bytes."""

    index: int
    name: str
    type: str  # pyelftools' name: "SHT_PROGBITS", "SHT_REL", ...
    flags: int
    size: int
    info: int
    align: int
    data: bytes


@dataclass(frozen=True)
class Symbol:
    """An entry of the input's symbol table, with pyelftools' names for bind, type and index."""

    name: str
    bind: str  # "STB_GLOBAL", ...
    type: str  # "STT_FUNC", ...
    shndx: int | str  # a section index, or "SHN_UNDEF", "SHN_ABS", "SHN_COMMON"
    value: int
    size: int


class Relocation(NamedTuple):
    """One REL entry: patch the instruction at ``offset`` of its section for ``symbol``
    (a tuple, so relocations sort by offset)."""

    offset: int
    symbol: int
    type: int


@dataclass(frozen=True)
class ObjectFile:
    """What the linker needs of the input: every section, the symbol table, the REL entries."""

    sections: list[Section]
    symbols: list[Symbol]
    relocations: dict[int, list[Relocation]]  # target section index -> its REL entries
    rela_sections: list[str]


def read_object(raw: bytes) -> ObjectFile:
    """The sections, symbols and relocations of a 64-bit little-endian EM_BPF ET_REL object."""
    try:
        elf = ELFFile(io.BytesIO(raw))
        _check_header(elf)
        return _object_of(elf)
    except ELFError as exc:
        raise LinkError(f"input is not an ELF file ({exc})") from None


def _check_header(elf: ELFFile) -> None:
    if elf.elfclass != 64 or not elf.little_endian:
        raise LinkError("input must be a 64-bit little-endian ELF")
    if elf["e_type"] != "ET_REL":
        raise LinkError(f"input must be a relocatable object (ET_REL), got {elf['e_type']}")
    if elf["e_machine"] != "EM_BPF":
        raise LinkError(f"input must be EM_BPF (247), got {elf['e_machine']}")


def _object_of(elf: ELFFile) -> ObjectFile:
    sections, symtabs, relocations, rela = [], [], {}, []
    for index, sec in enumerate(elf.iter_sections()):
        nobits = sec["sh_type"] == "SHT_NOBITS"
        sections.append(
            Section(
                index,
                sec.name,
                sec["sh_type"],
                sec["sh_flags"],
                sec["sh_size"],
                sec["sh_info"],
                max(sec["sh_addralign"], 1),
                b"" if nobits else sec.data(),
            )
        )
        if isinstance(sec, SymbolTableSection) and sec["sh_type"] == "SHT_SYMTAB":
            symtabs.append(sec)
        elif isinstance(sec, RelocationSection) and sec.is_RELA():
            rela.append(sec.name)
        elif isinstance(sec, RelocationSection) and sec["sh_size"]:
            relocations.setdefault(sec["sh_info"], []).extend(
                Relocation(r["r_offset"], r["r_info_sym"], r["r_info_type"])
                for r in sec.iter_relocations()
            )
    if len(symtabs) != 1:
        raise LinkError("input must have exactly one symbol table")
    symbols = [
        Symbol(
            s.name,
            s["st_info"]["bind"],
            s["st_info"]["type"],
            s["st_shndx"],
            s["st_value"],
            s["st_size"],
        )
        for s in symtabs[0].iter_symbols()
    ]
    return ObjectFile(sections, symbols, relocations, rela)


# ---------------------------------------------------------------- what the program is made of


def program_sections(obj: ObjectFile) -> tuple[Section, list[Section]]:
    """The one ``.text`` and the ``.rodata*`` sections; anything writable or unknown refused."""
    text_secs: list[Section] = []
    ro_secs: list[Section] = []
    for s in obj.sections:
        if s.type == "SHT_NOBITS" and s.flags & SHF_ALLOC and s.size:
            raise LinkError(f"section {s.name}: mutable globals (.bss) are not supported")
        if not s.flags & SHF_ALLOC:
            continue
        if s.flags & SHF_EXECINSTR:
            text_secs.append(s)
        elif s.name.startswith(".rodata") and not s.flags & SHF_WRITE:
            ro_secs.append(s)
        elif s.size == 0:
            continue
        elif s.name.startswith((".data", ".bss")) or s.flags & SHF_WRITE:
            raise LinkError(f"section {s.name}: mutable globals are not supported")
        else:
            raise LinkError(f"section {s.name}: unsupported allocated section")
    text_secs = [s for s in text_secs if s.size]
    if len(text_secs) != 1 or text_secs[0].name != ".text":
        names = ", ".join(s.name for s in text_secs) or "none"
        raise LinkError(
            f"expected exactly one executable section .text, found: {names} "
            "(do not use -ffunction-sections)"
        )
    return text_secs[0], ro_secs


def refuse_mutable_symbols(obj: ObjectFile) -> None:
    for sym in obj.symbols:
        if sym.shndx == "SHN_COMMON":
            raise LinkError(f"symbol {sym.name}: common (mutable) globals are not supported")
        if isinstance(sym.shndx, int) and 0 < sym.shndx < len(obj.sections):
            sec = obj.sections[sym.shndx]
            if sec.flags & SHF_ALLOC and sec.flags & SHF_WRITE and sec.size:
                raise LinkError(f"symbol {sym.name}: mutable globals are not supported")


def text_relocations(obj: ObjectFile, text_in: Section) -> list[Relocation]:
    """The relocations of ``.text``, by offset: the only ones that matter at run time."""
    if obj.rela_sections:
        raise LinkError(f"section {obj.rela_sections[0]}: RELA relocations are not supported")
    for target_index in obj.relocations:
        target = obj.sections[target_index]
        if target.index != text_in.index and target.flags & SHF_ALLOC:
            raise LinkError(
                f"relocations against {target.name} are not supported "
                "(no pointers in read-only data)"
            )
    return sorted(obj.relocations.get(text_in.index, []))


def entry_symbol(obj: ObjectFile, text_in: Section) -> Symbol:
    entry = [s for s in obj.symbols if s.name == ENTRY_SYMBOL and s.shndx == text_in.index]
    if len(entry) != 1 or entry[0].bind != "STB_GLOBAL" or entry[0].type != "STT_FUNC":
        raise LinkError(f"the object must define one global function `{ENTRY_SYMBOL}`")
    return entry[0]


# ---------------------------------------------------------------- where code and data land


@dataclass(frozen=True)
class Layout:
    """``.text`` and ``.rodata`` in the output: every file offset is also the address."""

    text_index: int  # the input .text section
    text_off: int
    text_size: int
    ro_off: int
    rodata: bytes
    ro_align: int
    ro_base: dict[int, int]  # input .rodata* section index -> output address

    @property
    def has_rodata(self) -> bool:
        return bool(self.rodata)

    def address_of(self, sym: Symbol) -> int | None:
        if sym.shndx == self.text_index:
            return self.text_off + sym.value
        if sym.shndx in self.ro_base:
            return self.ro_base[sym.shndx] + sym.value
        return None


def place_code_and_data(text_in: Section, ro_secs: list[Section]) -> Layout:
    if text_in.size % INSN:
        raise LinkError(".text size is not a multiple of 8")
    has_rodata = any(s.size for s in ro_secs)
    n_phdrs = 4 if has_rodata else 3
    text_off = _align(EHDR.size + n_phdrs * PHDR.size, 8)
    ro_off = _align(text_off + text_in.size, 8) if has_rodata else text_off + text_in.size
    rodata = bytearray()
    ro_base: dict[int, int] = {}
    for s in ro_secs:
        rodata += b"\0" * (_align(len(rodata), s.align) - len(rodata))
        ro_base[s.index] = ro_off + len(rodata)
        rodata += s.data
    ro_align = max((s.align for s in ro_secs), default=1)
    return Layout(text_in.index, text_off, text_in.size, ro_off, bytes(rodata), ro_align, ro_base)


# ---------------------------------------------------------------- relocations


@dataclass(frozen=True)
class DynReloc:
    """One entry of the output's ``.rel.dyn``: what the loader patches at ``offset``."""

    offset: int
    symbol: str | None  # a syscall's name; None for R_BPF_64_RELATIVE
    type: int


def relocate(
    text: bytearray,
    relocations: list[Relocation],
    obj: ObjectFile,
    layout: Layout,
    allow_undefined: set[str] | None,
) -> list[DynReloc]:
    """Patch ``text`` in place; return what is left for the loader to patch."""
    dyn_rels: list[DynReloc] = []
    for rel in relocations:
        if rel.offset % INSN or rel.offset + INSN > len(text):
            raise LinkError(f"misaligned relocation at .text+{rel.offset:#x}")
        sym = obj.symbols[rel.symbol]
        if rel.type == R_BPF_64_64:
            dyn_rels.append(_relocate_lddw(text, rel.offset, sym, layout))
        elif rel.type == R_BPF_64_32:
            dyn = _relocate_call(text, rel.offset, sym, layout, allow_undefined)
            if dyn:
                dyn_rels.append(dyn)
        elif rel.type != R_BPF_NONE:
            raise LinkError(f"unsupported relocation type {rel.type} at .text+{rel.offset:#x}")
    return dyn_rels


def _relocate_lddw(text: bytearray, off: int, sym: Symbol, layout: Layout) -> DynReloc:
    """An ``lddw`` of read-only data: its address now, rebased by the loader at run time."""
    if text[off] != OP_LDDW or off + 2 * INSN > len(text):
        raise LinkError(f"R_BPF_64_64 at .text+{off:#x} is not on an lddw")
    addr = layout.address_of(sym)
    if addr is None or sym.shndx == layout.text_index:
        raise LinkError(
            f"lddw of {sym.name or 'a section'} at .text+{off:#x}: "
            "only read-only data can be referenced"
        )
    lo = struct.unpack_from("<I", text, off + 4)[0]
    hi = struct.unpack_from("<I", text, off + INSN + 4)[0]
    value = addr + (lo | hi << 32)
    struct.pack_into("<I", text, off + 4, value & 0xFFFFFFFF)
    struct.pack_into("<I", text, off + INSN + 4, value >> 32)
    return DynReloc(layout.text_off + off, None, R_BPF_64_RELATIVE)


def _relocate_call(
    text: bytearray, off: int, sym: Symbol, layout: Layout, allow_undefined: set[str] | None
) -> DynReloc | None:
    """A call of a syscall (left to the loader) or of a function in ``.text`` (pc-relative)."""
    if text[off] != OP_CALL:
        raise LinkError(f"R_BPF_64_32 at .text+{off:#x} is not on a call")
    if sym.shndx == "SHN_UNDEF":
        if allow_undefined is not None and sym.name not in allow_undefined:
            raise LinkError(
                f"call of undefined symbol `{sym.name}`, which is not a "
                "known syscall (builtins like memcpy/memset must not be "
                "emitted; use sol_memcpy_/sol_memset_)"
            )
        struct.pack_into("<i", text, off + 4, -1)
        return DynReloc(layout.text_off + off, sym.name, R_BPF_64_32)
    if sym.shndx != layout.text_index:
        raise LinkError(f"call of {sym.name} at .text+{off:#x}: not in .text")
    # imm -1 means "symbol value"; otherwise LLVM stored (addend / 8 - 1).
    (imm,) = struct.unpack_from("<i", text, off + 4)
    target = sym.value + (0 if imm == -1 else (imm + 1) * INSN)
    if target % INSN or target >= len(text):
        raise LinkError(f"call target out of .text at .text+{off:#x}")
    struct.pack_into("<i", text, off + 4, target // INSN - (off // INSN + 1))
    return None


def check_calls(text: bytes) -> None:
    """Every call with imm != -1 must be an in-range pc-relative call: the loader treats it as
    one."""
    for pc in range(len(text) // INSN):
        if text[pc * INSN] == OP_CALL:
            (imm,) = struct.unpack_from("<i", text, pc * INSN + 4)
            if imm != -1 and not 0 <= pc + 1 + imm < len(text) // INSN:
                raise LinkError(f"call at pc {pc} jumps outside .text")


# ---------------------------------------------------------------- dynamic tables


@dataclass
class StringTable:
    data: bytearray = field(default_factory=lambda: bytearray(b"\0"))
    offsets: dict[str, int] = field(default_factory=dict)

    def offset(self, name: str) -> int:
        if name not in self.offsets:
            self.offsets[name] = len(self.data)
            self.data += name.encode("ascii") + b"\0"
        return self.offsets[name]


@dataclass(frozen=True)
class DynamicTables:
    dynsym: bytes
    dynstr: bytes
    reldyn: bytes


def dynamic_tables(entry: Symbol, entry_addr: int, dyn_rels: list[DynReloc]) -> DynamicTables:
    """``.dynsym`` (null, entrypoint, then the syscalls by name), ``.dynstr`` and ``.rel.dyn``."""
    strings = StringTable()
    dynsym = bytearray(SYM.size)
    dynsym += SYM.pack(
        strings.offset(ENTRY_SYMBOL),
        (STB_GLOBAL << 4) | STT_FUNC,
        0,
        TEXT_SHNDX,
        entry_addr,
        entry.size,
    )
    sym_index: dict[str, int] = {}
    for name in sorted({r.symbol for r in dyn_rels if r.symbol}):
        sym_index[name] = len(dynsym) // SYM.size
        dynsym += SYM.pack(strings.offset(name), (STB_GLOBAL << 4) | STT_NOTYPE, 0, SHN_UNDEF, 0, 0)
    reldyn = b"".join(
        REL.pack(r.offset, (sym_index[r.symbol] if r.symbol else 0) << 32 | r.type)
        for r in sorted(dyn_rels, key=lambda r: r.offset)
    )
    return DynamicTables(bytes(dynsym), bytes(strings.data), reldyn)


# ---------------------------------------------------------------- the output file


@dataclass(frozen=True)
class TailLayout:
    """Where everything after ``.rodata`` lands."""

    dynamic_off: int
    dynamic: bytes
    dynsym_off: int
    dynstr_off: int
    reldyn_off: int
    dyn_end: int  # the end of the last dynamic table: .shstrtab follows


def place_dynamic(layout: Layout, tables: DynamicTables) -> TailLayout:
    dynamic_off = _align(layout.ro_off + len(layout.rodata), 8)
    n_dyn = 10 if tables.reldyn else 5
    dynsym_off = _align(dynamic_off + n_dyn * DYN.size, 8)
    dynstr_off = dynsym_off + len(tables.dynsym)
    reldyn_off = _align(dynstr_off + len(tables.dynstr), 8)
    dyn_end = reldyn_off + len(tables.reldyn) if tables.reldyn else dynstr_off + len(tables.dynstr)
    entries = [
        (DT_SYMTAB, dynsym_off),
        (DT_STRTAB, dynstr_off),
        (DT_STRSZ, len(tables.dynstr)),
        (DT_SYMENT, SYM.size),
    ]
    if tables.reldyn:
        entries += [
            (DT_REL, reldyn_off),
            (DT_RELSZ, len(tables.reldyn)),
            (DT_RELENT, REL.size),
            (DT_TEXTREL, 0),
            (DT_FLAGS, DF_TEXTREL),
        ]
    entries.append((DT_NULL, 0))
    dynamic = b"".join(DYN.pack(t, v) for t, v in entries)
    assert len(dynamic) == n_dyn * DYN.size
    return TailLayout(dynamic_off, dynamic, dynsym_off, dynstr_off, reldyn_off, dyn_end)


def section_headers(
    layout: Layout, tables: DynamicTables, tail: TailLayout
) -> tuple[bytes, int, list[bytes], int]:
    """``.shstrtab``, its offset, the section headers and the index of ``.shstrtab``."""
    names = [".text", ".rodata", ".dynamic", ".dynsym", ".dynstr", ".rel.dyn", ".shstrtab"]
    if not layout.has_rodata:
        names.remove(".rodata")
    if not tables.reldyn:
        names.remove(".rel.dyn")
    shstrtab = StringTable()
    for n in names:
        shstrtab.offset(n)
    shstrtab_off = tail.dyn_end
    idx = {n: i + 1 for i, n in enumerate(names)}
    assert idx[".text"] == TEXT_SHNDX
    shdrs = [SHDR.pack(0, SHT_NULL, 0, 0, 0, 0, 0, 0, 0, 0)]

    def sh(
        name: str,
        typ: int,
        flags: int,
        off: int,
        size: int,
        link: int = 0,
        info: int = 0,
        align: int = 1,
        entsize: int = 0,
    ) -> None:
        addr = off if flags & SHF_ALLOC else 0
        shdrs.append(
            SHDR.pack(
                shstrtab.offsets[name], typ, flags, addr, off, size, link, info, align, entsize
            )
        )

    sh(".text", SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR, layout.text_off, layout.text_size, align=8)
    if layout.has_rodata:
        sh(
            ".rodata",
            SHT_PROGBITS,
            SHF_ALLOC,
            layout.ro_off,
            len(layout.rodata),
            align=layout.ro_align,
        )
    sh(
        ".dynamic",
        SHT_DYNAMIC,
        SHF_ALLOC | SHF_WRITE,
        tail.dynamic_off,
        len(tail.dynamic),
        link=idx[".dynstr"],
        align=8,
        entsize=DYN.size,
    )
    sh(
        ".dynsym",
        SHT_DYNSYM,
        SHF_ALLOC,
        tail.dynsym_off,
        len(tables.dynsym),
        link=idx[".dynstr"],
        info=1,
        align=8,
        entsize=SYM.size,
    )
    sh(".dynstr", SHT_STRTAB, SHF_ALLOC, tail.dynstr_off, len(tables.dynstr))
    if tables.reldyn:
        sh(
            ".rel.dyn",
            SHT_REL,
            SHF_ALLOC,
            tail.reldyn_off,
            len(tables.reldyn),
            link=idx[".dynsym"],
            align=8,
            entsize=REL.size,
        )
    sh(".shstrtab", SHT_STRTAB, 0, shstrtab_off, len(shstrtab.data))
    return bytes(shstrtab.data), shstrtab_off, shdrs, idx[".shstrtab"]


def program_headers(layout: Layout, tail: TailLayout) -> list[bytes]:
    """Code (r-x), read-only data (r--), the dynamic tables (r--) and PT_DYNAMIC."""

    def segment(kind: int, flags: int, off: int, size: int) -> bytes:
        return PHDR.pack(kind, flags, off, off, off, size, size, 8)

    phdrs = [segment(PT_LOAD, PF_R | PF_X, layout.text_off, layout.text_size)]
    if layout.has_rodata:
        phdrs.append(segment(PT_LOAD, PF_R, layout.ro_off, len(layout.rodata)))
    phdrs.append(segment(PT_LOAD, PF_R, tail.dynamic_off, tail.dyn_end - tail.dynamic_off))
    phdrs.append(segment(PT_DYNAMIC, PF_R | PF_W, tail.dynamic_off, len(tail.dynamic)))
    return phdrs


def write_shared_object(
    layout: Layout, text: bytes, entry_addr: int, tables: DynamicTables
) -> bytes:
    tail = place_dynamic(layout, tables)
    shstrtab, shstrtab_off, shdrs, shstrndx = section_headers(layout, tables, tail)
    phdrs = program_headers(layout, tail)
    assert EHDR.size + len(phdrs) * PHDR.size <= layout.text_off
    shoff = _align(shstrtab_off + len(shstrtab), 8)
    ident = b"\x7fELF" + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT, 0]) + b"\0" * 8
    ehdr = EHDR.pack(
        ident,
        ET_DYN,
        EM_BPF,
        EV_CURRENT,
        entry_addr,
        EHDR.size,
        shoff,
        0,
        EHDR.size,
        PHDR.size,
        len(phdrs),
        SHDR.size,
        len(shdrs),
        shstrndx,
    )
    out = bytearray(shoff + len(shdrs) * SHDR.size)
    for off, data in (
        (0, ehdr),
        (EHDR.size, b"".join(phdrs)),
        (layout.text_off, text),
        (layout.ro_off, layout.rodata),
        (tail.dynamic_off, tail.dynamic),
        (tail.dynsym_off, tables.dynsym),
        (tail.dynstr_off, tables.dynstr),
        (tail.reldyn_off, tables.reldyn),
        (shstrtab_off, shstrtab),
        (shoff, b"".join(shdrs)),
    ):
        out[off : off + len(data)] = data
    return bytes(out)


# ---------------------------------------------------------------- the linker


def link(obj_bytes: bytes, allow_undefined: set[str] | None = None) -> bytes:
    """Link one relocatable BPF object into an SBPFv0 shared object; return its bytes."""
    obj = read_object(obj_bytes)
    text_in, ro_secs = program_sections(obj)
    refuse_mutable_symbols(obj)
    relocations = text_relocations(obj, text_in)
    layout = place_code_and_data(text_in, ro_secs)
    entry = entry_symbol(obj, text_in)
    text = bytearray(text_in.data)
    dyn_rels = relocate(text, relocations, obj, layout, allow_undefined)
    check_calls(text)
    entry_addr = layout.text_off + entry.value
    return write_shared_object(
        layout, bytes(text), entry_addr, dynamic_tables(entry, entry_addr, dyn_rels)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", type=Path, help="relocatable EM_BPF object (.o)")
    ap.add_argument("-o", "--output", type=Path, required=True, help="shared object to write")
    ap.add_argument(
        "--allow-undefined",
        action="append",
        default=None,
        metavar="NAME",
        help="a syscall name calls may refer to (repeatable; default: any)",
    )
    args = ap.parse_args(argv)
    try:
        so = link(
            args.input.read_bytes(), set(args.allow_undefined) if args.allow_undefined else None
        )
    except LinkError as exc:
        print(f"link.py: error: {exc}", file=sys.stderr)
        return 1
    args.output.write_bytes(so)
    return 0


if __name__ == "__main__":
    sys.exit(main())
