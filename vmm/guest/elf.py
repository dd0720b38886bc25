"""ELF64 guest images: the PT_LOAD segments of a static x86-64 executable and its entry point.

Source: System V ABI, ELF-64 Object File Format 1.5 (header and program header layout), and the
x86-64 psABI (EM_X86_64 = 62). Only what a loader needs is read: e_ident, e_type, e_machine,
e_entry and the program headers. Pure functions on bytes; no KVM.
"""

import struct
from dataclasses import dataclass

from ..errors import GuestError

MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB = 2, 1
ET_EXEC, ET_DYN = 2, 3
EM_X86_64 = 62
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
PF_X = 1

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes
_PHDR = struct.Struct("<IIQQQQQQ")         # Elf64_Phdr, 56 bytes
MAX_SEGMENTS = 64

_MACHINES = {3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "s390", 40: "ARM", 62: "x86-64",
             183: "AArch64", 243: "RISC-V", 258: "LoongArch"}


@dataclass
class Segment:
    """One PT_LOAD: `data` (p_filesz bytes) at guest-physical `addr`, zero-filled up to `memsz`."""
    addr: int
    data: bytes
    memsz: int
    executable: bool


def is_elf(data):
    return data[:4] == MAGIC


def parse(data, name):
    """(entry, [Segment]) of the static ELF64 x86-64 executable `data` (a file called `name`).
    Raises GuestError naming what makes it unusable: not ELF64/little-endian, a dynamic or
    position-independent executable, another machine, segments outside the file, no entry segment."""
    if len(data) < _EHDR.size:
        raise GuestError(f"{name}: truncated ELF header ({len(data)} bytes)")
    ident, e_type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_ = \
        _EHDR.unpack_from(data)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise GuestError(f"{name}: a {'32' if ident[4] == 1 else '?'}-bit or big-endian ELF; vmm loads "
                         "ELF64 little-endian x86-64 executables")
    if machine != EM_X86_64:
        raise GuestError(f"{name}: an ELF for {_MACHINES.get(machine, f'machine {machine}')} "
                         f"(e_machine {machine}), not x86-64 (62)")
    if e_type == ET_DYN:
        raise GuestError(f"{name}: a position-independent or shared ELF (ET_DYN); link the guest with "
                         "`ld -static` (gcc -static -no-pie) at fixed addresses")
    if e_type != ET_EXEC:
        raise GuestError(f"{name}: ELF type {e_type} is not an executable (ET_EXEC); link the object first")
    if phentsize != _PHDR.size or not 1 <= phnum <= MAX_SEGMENTS or phoff + phnum * _PHDR.size > len(data):
        raise GuestError(f"{name}: bad program header table ({phnum} entries of {phentsize} bytes at "
                         f"offset {phoff})")
    segments = []
    for i in range(phnum):
        p_type, p_flags, off, vaddr, _paddr, filesz, memsz, _align = \
            _PHDR.unpack_from(data, phoff + i * _PHDR.size)
        if p_type in (PT_INTERP, PT_DYNAMIC):
            raise GuestError(f"{name}: a dynamically linked ELF ({'PT_INTERP' if p_type == PT_INTERP else 'PT_DYNAMIC'}); "
                             "guests are static executables: link with `ld -static -nostdlib`")
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or off + filesz > len(data):
            raise GuestError(f"{name}: segment {i} at 0x{vaddr:x} has {filesz} file bytes at offset {off}, "
                             f"beyond the file ({len(data)} bytes) or its memory size {memsz}")
        segments.append(Segment(vaddr, bytes(data[off:off + filesz]), memsz, bool(p_flags & PF_X)))
    if not segments:
        raise GuestError(f"{name}: no PT_LOAD segment to load")
    segments.sort(key=lambda s: s.addr)
    for a, b in zip(segments, segments[1:]):
        if a.addr + a.memsz > b.addr:
            raise GuestError(f"{name}: segments at 0x{a.addr:x} and 0x{b.addr:x} overlap")
    if not any(s.executable and s.addr <= entry < s.addr + s.memsz for s in segments):
        raise GuestError(f"{name}: entry point 0x{entry:x} is not inside an executable PT_LOAD segment")
    return entry, segments
