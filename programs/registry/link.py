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

Usage: ``python link.py input.o -o output.so [--allow-undefined NAME ...]``
"""

from __future__ import annotations

import argparse
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------- ELF constants

EM_BPF = 247
ET_REL = 1
ET_DYN = 3
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1

SHT_NULL = 0
SHT_PROGBITS = 1
SHT_SYMTAB = 2
SHT_STRTAB = 3
SHT_RELA = 4
SHT_DYNAMIC = 6
SHT_NOBITS = 8
SHT_REL = 9
SHT_DYNSYM = 11

SHF_WRITE = 0x1
SHF_ALLOC = 0x2
SHF_EXECINSTR = 0x4

SHN_UNDEF = 0
SHN_ABS = 0xFFF1
SHN_COMMON = 0xFFF2

STB_LOCAL = 0
STB_GLOBAL = 1
STT_NOTYPE = 0
STT_OBJECT = 1
STT_FUNC = 2
STT_SECTION = 3

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


class LinkError(Exception):
    """The object cannot be turned into a Solana program; the message says why."""


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a if a > 1 else n


# ---------------------------------------------------------------- input object


@dataclass
class Section:
    index: int
    name: str
    type: int
    flags: int
    offset: int
    size: int
    link: int
    info: int
    align: int
    entsize: int
    data: bytes


@dataclass
class Symbol:
    name: str
    bind: int
    type: int
    shndx: int
    value: int
    size: int


@dataclass
class ObjectFile:
    sections: list[Section]
    symbols: list[Symbol]

    @classmethod
    def parse(cls, raw: bytes) -> ObjectFile:
        if len(raw) < EHDR.size or raw[:4] != b"\x7fELF":
            raise LinkError("input is not an ELF file")
        (ident, e_type, e_machine, _v, _entry, _phoff, e_shoff, _flags, _ehsize, _phentsize,
         _phnum, e_shentsize, e_shnum, e_shstrndx) = EHDR.unpack_from(raw, 0)
        if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
            raise LinkError("input must be a 64-bit little-endian ELF")
        if e_type != ET_REL:
            raise LinkError(f"input must be a relocatable object (ET_REL), got e_type {e_type}")
        if e_machine != EM_BPF:
            raise LinkError(f"input must be EM_BPF (247), got e_machine {e_machine}")
        if e_shentsize != SHDR.size:
            raise LinkError("unexpected section header size")
        headers = [SHDR.unpack_from(raw, e_shoff + i * SHDR.size) for i in range(e_shnum)]
        shstr = headers[e_shstrndx]
        shstr_data = raw[shstr[4] : shstr[4] + shstr[5]]
        sections = []
        for i, (name, typ, flags, _addr, off, size, link, info, align, entsize) in enumerate(
            headers
        ):
            data = b"" if typ == SHT_NOBITS else raw[off : off + size]
            sections.append(
                Section(i, _cstr(shstr_data, name), typ, flags, off, size, link, info,
                        max(align, 1), entsize, data)
            )
        symtabs = [s for s in sections if s.type == SHT_SYMTAB]
        if len(symtabs) != 1:
            raise LinkError("input must have exactly one symbol table")
        symtab = symtabs[0]
        strtab = sections[symtab.link].data
        symbols = []
        for i in range(symtab.size // SYM.size):
            st_name, st_info, _o, shndx, value, size = SYM.unpack_from(symtab.data, i * SYM.size)
            symbols.append(
                Symbol(_cstr(strtab, st_name), st_info >> 4, st_info & 0xF, shndx, value, size)
            )
        return cls(sections, symbols)


def _cstr(table: bytes, offset: int) -> str:
    end = table.index(b"\0", offset)
    return table[offset:end].decode("ascii")


# ---------------------------------------------------------------- output builder


@dataclass
class DynSymbols:
    names: list[str] = field(default_factory=list)
    strtab: bytearray = field(default_factory=lambda: bytearray(b"\0"))
    offsets: dict[str, int] = field(default_factory=dict)

    def name_offset(self, name: str) -> int:
        if name not in self.offsets:
            self.offsets[name] = len(self.strtab)
            self.strtab += name.encode("ascii") + b"\0"
        return self.offsets[name]


def link(obj_bytes: bytes, allow_undefined: set[str] | None = None) -> bytes:
    """Link one relocatable BPF object into an SBPFv0 shared object; return its bytes."""
    obj = ObjectFile.parse(obj_bytes)

    text_secs: list[Section] = []
    ro_secs: list[Section] = []
    for s in obj.sections:
        if s.type in (SHT_NOBITS,) and s.flags & SHF_ALLOC and s.size:
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
        raise LinkError(f"expected exactly one executable section .text, found: {names} "
                        "(do not use -ffunction-sections)")
    text_in = text_secs[0]
    for sym in obj.symbols:
        if sym.shndx == SHN_COMMON:
            raise LinkError(f"symbol {sym.name}: common (mutable) globals are not supported")
        if sym.shndx not in (SHN_UNDEF, SHN_ABS) and sym.shndx < len(obj.sections):
            sec = obj.sections[sym.shndx]
            if sec.flags & SHF_ALLOC and sec.flags & SHF_WRITE and sec.size:
                raise LinkError(f"symbol {sym.name}: mutable globals are not supported")

    # Relocation sections: only .text may carry relocations that matter at run time.
    text_rels: list[tuple[int, int, int]] = []
    for s in obj.sections:
        if s.type == SHT_RELA:
            raise LinkError(f"section {s.name}: RELA relocations are not supported")
        if s.type != SHT_REL:
            continue
        target = obj.sections[s.info]
        if target.index == text_in.index:
            for i in range(s.size // REL.size):
                r_offset, r_info = REL.unpack_from(s.data, i * REL.size)
                text_rels.append((r_offset, r_info >> 32, r_info & 0xFFFFFFFF))
        elif target.flags & SHF_ALLOC and s.size:
            raise LinkError(f"relocations against {target.name} are not supported "
                            "(no pointers in read-only data)")

    # ---- layout (sh_addr == sh_offset for every allocated section)
    has_rodata = any(s.size for s in ro_secs)
    n_phdrs = 4 if has_rodata else 3
    text_off = _align(EHDR.size + n_phdrs * PHDR.size, 8)
    text = bytearray(text_in.data)
    if len(text) % INSN:
        raise LinkError(".text size is not a multiple of 8")
    ro_off = _align(text_off + len(text), 8)
    rodata = bytearray()
    ro_base: dict[int, int] = {}  # input section index -> output address
    for s in ro_secs:
        pad = _align(len(rodata), s.align) - len(rodata)
        rodata += b"\0" * pad
        ro_base[s.index] = ro_off + len(rodata)
        rodata += s.data
    if not has_rodata:
        ro_off = text_off + len(text)

    def sym_addr(sym: Symbol) -> int | None:
        if sym.shndx == text_in.index:
            return text_off + sym.value
        if sym.shndx in ro_base:
            return ro_base[sym.shndx] + sym.value
        return None

    entry = [s for s in obj.symbols if s.name == ENTRY_SYMBOL and s.shndx == text_in.index]
    if len(entry) != 1 or entry[0].bind != STB_GLOBAL or entry[0].type != STT_FUNC:
        raise LinkError(f"the object must define one global function `{ENTRY_SYMBOL}`")
    entry_addr = text_off + entry[0].value

    # ---- apply relocations
    dyn_rels: list[tuple[int, str | None, int]] = []  # (file offset, symbol name, type)
    syscalls: set[str] = set()
    for r_offset, r_sym, r_type in sorted(text_rels):
        if r_offset % INSN or r_offset + INSN > len(text):
            raise LinkError(f"misaligned relocation at .text+{r_offset:#x}")
        sym = obj.symbols[r_sym]
        opcode = text[r_offset]
        (imm,) = struct.unpack_from("<i", text, r_offset + 4)
        if r_type == R_BPF_64_64:
            if opcode != OP_LDDW or r_offset + 2 * INSN > len(text):
                raise LinkError(f"R_BPF_64_64 at .text+{r_offset:#x} is not on an lddw")
            addr = sym_addr(sym)
            if addr is None or sym.shndx == text_in.index:
                raise LinkError(f"lddw of {sym.name or 'a section'} at .text+{r_offset:#x}: "
                                "only read-only data can be referenced")
            lo = struct.unpack_from("<I", text, r_offset + 4)[0]
            hi = struct.unpack_from("<I", text, r_offset + INSN + 4)[0]
            value = addr + (lo | hi << 32)
            struct.pack_into("<I", text, r_offset + 4, value & 0xFFFFFFFF)
            struct.pack_into("<I", text, r_offset + INSN + 4, value >> 32)
            dyn_rels.append((text_off + r_offset, None, R_BPF_64_RELATIVE))
        elif r_type == R_BPF_64_32:
            if opcode != OP_CALL:
                raise LinkError(f"R_BPF_64_32 at .text+{r_offset:#x} is not on a call")
            if sym.shndx == SHN_UNDEF:
                if allow_undefined is not None and sym.name not in allow_undefined:
                    raise LinkError(f"call of undefined symbol `{sym.name}`, which is not a "
                                    "known syscall (builtins like memcpy/memset must not be "
                                    "emitted; use sol_memcpy_/sol_memset_)")
                struct.pack_into("<i", text, r_offset + 4, -1)
                syscalls.add(sym.name)
                dyn_rels.append((text_off + r_offset, sym.name, R_BPF_64_32))
            elif sym.shndx == text_in.index:
                # imm -1 means "symbol value"; otherwise LLVM stored (addend / 8 - 1).
                target = sym.value + (0 if imm == -1 else (imm + 1) * INSN)
                if target % INSN or target >= len(text):
                    raise LinkError(f"call target out of .text at .text+{r_offset:#x}")
                rel = target // INSN - (r_offset // INSN + 1)
                struct.pack_into("<i", text, r_offset + 4, rel)
            else:
                raise LinkError(f"call of {sym.name} at .text+{r_offset:#x}: not in .text")
        elif r_type == R_BPF_NONE:
            continue
        else:
            raise LinkError(f"unsupported relocation type {r_type} at .text+{r_offset:#x}")

    # Every remaining call with imm != -1 must be an in-range pc-relative call: the loader
    # treats it as one.
    for pc in range(len(text) // INSN):
        if text[pc * INSN] == OP_CALL:
            (imm,) = struct.unpack_from("<i", text, pc * INSN + 4)
            if imm != -1 and not 0 <= pc + 1 + imm < len(text) // INSN:
                raise LinkError(f"call at pc {pc} jumps outside .text")

    # ---- dynamic symbols: null, entrypoint, then syscalls sorted by name
    dyn = DynSymbols()
    dynsym = bytearray(SYM.size)
    sym_index: dict[str, int] = {}
    text_shndx = 1
    dynsym += SYM.pack(dyn.name_offset(ENTRY_SYMBOL), (STB_GLOBAL << 4) | STT_FUNC, 0,
                       text_shndx, entry_addr, entry[0].size)
    for name in sorted(syscalls):
        sym_index[name] = len(dynsym) // SYM.size
        dynsym += SYM.pack(dyn.name_offset(name), (STB_GLOBAL << 4) | STT_NOTYPE, 0,
                           SHN_UNDEF, 0, 0)
    dynstr = bytes(dyn.strtab)
    reldyn = bytearray()
    for off, name, typ in sorted(dyn_rels, key=lambda r: r[0]):
        reldyn += REL.pack(off, (sym_index[name] if name else 0) << 32 | typ)

    # ---- remaining layout
    dynamic_off = _align(ro_off + len(rodata), 8)
    n_dyn = 10 if reldyn else 5
    dynamic_size = n_dyn * DYN.size
    dynsym_off = _align(dynamic_off + dynamic_size, 8)
    dynstr_off = dynsym_off + len(dynsym)
    reldyn_off = _align(dynstr_off + len(dynstr), 8)
    dyn_entries = [(DT_SYMTAB, dynsym_off), (DT_STRTAB, dynstr_off), (DT_STRSZ, len(dynstr)),
                   (DT_SYMENT, SYM.size)]
    if reldyn:
        dyn_entries += [(DT_REL, reldyn_off), (DT_RELSZ, len(reldyn)), (DT_RELENT, REL.size),
                        (DT_TEXTREL, 0), (DT_FLAGS, DF_TEXTREL)]
    dyn_entries.append((DT_NULL, 0))
    dynamic = b"".join(DYN.pack(t, v) for t, v in dyn_entries)
    assert len(dynamic) == dynamic_size

    shnames = [".text", ".rodata", ".dynamic", ".dynsym", ".dynstr", ".rel.dyn", ".shstrtab"]
    if not has_rodata:
        shnames.remove(".rodata")
    if not reldyn:
        shnames.remove(".rel.dyn")
    shstrtab = bytearray(b"\0")
    shname_off = {}
    for n in shnames:
        shname_off[n] = len(shstrtab)
        shstrtab += n.encode() + b"\0"
    shstrtab_off = (reldyn_off + len(reldyn)) if reldyn else (dynstr_off + len(dynstr))
    shoff = _align(shstrtab_off + len(shstrtab), 8)
    idx = {n: i + 1 for i, n in enumerate(shnames)}
    assert idx[".text"] == text_shndx

    shdrs = [SHDR.pack(0, SHT_NULL, 0, 0, 0, 0, 0, 0, 0, 0)]

    def sh(name, typ, flags, off, size, link=0, info=0, align=1, entsize=0, addr=None):
        shdrs.append(SHDR.pack(shname_off[name], typ, flags, off if addr is None else addr, off,
                               size, link, info, align, entsize))

    sh(".text", SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR, text_off, len(text), align=8)
    if has_rodata:
        sh(".rodata", SHT_PROGBITS, SHF_ALLOC, ro_off, len(rodata),
           align=max(s.align for s in ro_secs))
    sh(".dynamic", SHT_DYNAMIC, SHF_ALLOC | SHF_WRITE, dynamic_off, dynamic_size,
       link=idx[".dynstr"], align=8, entsize=DYN.size)
    sh(".dynsym", SHT_DYNSYM, SHF_ALLOC, dynsym_off, len(dynsym), link=idx[".dynstr"], info=1,
       align=8, entsize=SYM.size)
    sh(".dynstr", SHT_STRTAB, SHF_ALLOC, dynstr_off, len(dynstr))
    if reldyn:
        sh(".rel.dyn", SHT_REL, SHF_ALLOC, reldyn_off, len(reldyn), link=idx[".dynsym"],
           align=8, entsize=REL.size)
    sh(".shstrtab", SHT_STRTAB, 0, shstrtab_off, len(shstrtab), addr=0)

    phdrs = [PHDR.pack(PT_LOAD, PF_R | PF_X, text_off, text_off, text_off, len(text),
                       len(text), 8)]
    if has_rodata:
        phdrs.append(PHDR.pack(PT_LOAD, PF_R, ro_off, ro_off, ro_off, len(rodata), len(rodata),
                               8))
    dyn_end = (reldyn_off + len(reldyn)) if reldyn else (dynstr_off + len(dynstr))
    phdrs.append(PHDR.pack(PT_LOAD, PF_R, dynamic_off, dynamic_off, dynamic_off,
                           dyn_end - dynamic_off, dyn_end - dynamic_off, 8))
    phdrs.append(PHDR.pack(PT_DYNAMIC, PF_R | PF_W, dynamic_off, dynamic_off, dynamic_off,
                           dynamic_size, dynamic_size, 8))
    assert len(phdrs) == n_phdrs

    ident = b"\x7fELF" + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT, 0]) + b"\0" * 8
    ehdr = EHDR.pack(ident, ET_DYN, EM_BPF, EV_CURRENT, entry_addr, EHDR.size, shoff, 0,
                     EHDR.size, PHDR.size, len(phdrs), SHDR.size, len(shdrs), idx[".shstrtab"])

    out = bytearray(shoff + len(shdrs) * SHDR.size)

    def put(off: int, data: bytes) -> None:
        out[off : off + len(data)] = data

    put(0, ehdr)
    put(EHDR.size, b"".join(phdrs))
    put(text_off, text)
    put(ro_off, rodata)
    put(dynamic_off, dynamic)
    put(dynsym_off, dynsym)
    put(dynstr_off, dynstr)
    put(reldyn_off, reldyn)
    put(shstrtab_off, shstrtab)
    put(shoff, b"".join(shdrs))
    return bytes(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", type=Path, help="relocatable EM_BPF object (.o)")
    ap.add_argument("-o", "--output", type=Path, required=True, help="shared object to write")
    ap.add_argument("--allow-undefined", action="append", default=None, metavar="NAME",
                    help="a syscall name calls may refer to (repeatable; default: any)")
    args = ap.parse_args(argv)
    try:
        so = link(args.input.read_bytes(),
                  set(args.allow_undefined) if args.allow_undefined else None)
    except LinkError as exc:
        print(f"link.py: error: {exc}", file=sys.stderr)
        return 1
    args.output.write_bytes(so)
    return 0


if __name__ == "__main__":
    sys.exit(main())
