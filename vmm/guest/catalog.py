"""Guest images: the built-in guests (flat binaries built from guests/*.S, plus their symbols) and
guest files given by path (a flat binary loaded at PAYLOAD_BASE, or a static ELF64 executable).

An installed package (`pip install .`, a wheel) carries the built guests and their sources in
vmm/guest/builtin/ (setup.py builds them); a source checkout uses guests/ and guests/build/
(`make guests`). VMM_GUESTS_DIR overrides where the built binaries are read from."""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import files
from ..errors import GuestError
from ..records import FrozenRecord, Record
from . import runtime

PACKAGED_DIR = Path(__file__).resolve().parent / "builtin"
REPO_DIR = Path(__file__).resolve().parents[2] / "guests"
SOURCE_DIR = PACKAGED_DIR if (PACKAGED_DIR / "runtime.bin").is_file() else REPO_DIR
FLAT_MAX = runtime.SCRATCH_BASE - runtime.PAYLOAD_BASE  # a flat binary's room at PAYLOAD_BASE
FILE_LIMIT = 256 << 20  # a guest file is read whole: bounded
STACK_BYTES = 0x10000   # each vCPU's user stack below USER_STACK_TOP (Machine.setup_vcpu)


def build_dir():
    if "VMM_GUESTS_DIR" in os.environ:
        return Path(os.environ["VMM_GUESTS_DIR"])
    return SOURCE_DIR if SOURCE_DIR == PACKAGED_DIR else SOURCE_DIR / "build"


@dataclass(frozen=True, init=False, repr=False, eq=False)  # cheap to build: vmm/records.py
class Requirement(FrozenRecord):
    """What a guest's instructions need from the vCPU: XSAVE components (an XCR0 bit mask) that
    must be enabled, named by the CPUID feature that introduces them. The components decide:
    an instruction of a component the vCPU's XCR0 does not enable raises #UD (SDM vol. 1,
    13.3), whatever the feature flags say (kvm_pvm hosts do not list AVX-512 flags at all)."""
    feature: str
    xcr0: int
    hint: str = ""

    def __init__(self, feature, xcr0, hint=""):
        object.__setattr__(self, "feature", feature)  # frozen
        object.__setattr__(self, "xcr0", xcr0)
        object.__setattr__(self, "hint", hint)

    def __str__(self):
        return f"{self.feature} (XCR0 {self.xcr0:#x})"


# A guest's requirements, checked before its VM is created (Image.missing). Guests not listed
# adapt to the vCPU they get (guests/xstate.inc) or need nothing beyond x87/SSE.
REQUIREMENTS = {
    "avx512": (Requirement("AVX512F", 0xE0, "the adaptive guests (checkpoint, xsave-readback) "
                                            "fill whatever XSAVE state this host has"),),
    "amx": (Requirement("AMX-TILE", 0x60000, "give --amx, on a host whose KVM offers AMX"),),
}


# Guests that wait at each SYNC for their host to give them work (a value in a register): only
# the host code named here drives them; `vmm run` would answer nothing and they would loop.
DRIVERS = {
    "xcr0": "vmm probe --check xsetbv_unsupported_gp",
    "msr-access": "vmm probe --check msrs_guest_access",
}


@dataclass(init=False, repr=False, eq=False)
class Image(Record):
    """A payload: flat `code` at PAYLOAD_BASE, or ELF `segments` (elf.Segment) with its `entry`."""
    name: str
    code: bytes
    symbols: dict = field(default_factory=dict)
    description: str = ""
    entry: int = runtime.PAYLOAD_BASE
    elf_segments: list = None
    path: str = None
    requires: tuple = ()
    driver: str = None  # what drives a guest that waits for its host at each SYNC (DRIVERS)

    def __init__(self, name, code, symbols=None, description="", entry=runtime.PAYLOAD_BASE, elf_segments=None,
                 path=None, requires=(), driver=None):
        """`symbols` left None is a fresh empty dict."""
        self.name, self.code, self.symbols = name, code, {} if symbols is None else symbols
        self.description, self.entry, self.elf_segments, self.path = description, entry, elf_segments, path
        self.requires, self.driver = requires, driver

    @property
    def segments(self):
        """[(guest-physical address, bytes)] to write; memory past p_filesz is the VM's fresh zeros."""
        if self.elf_segments is not None:
            return [(s.addr, s.data) for s in self.elf_segments]
        return [(runtime.PAYLOAD_BASE, self.code)]

    def check_fits(self, memory, vcpus=1):
        """Raise GuestError unless the payload fits guest memory of `memory` bytes with `vcpus`
        user stacks. Every piece of it, ELF segments and a flat binary (one piece at PAYLOAD_BASE)
        alike, must lie at or above PAYLOAD_BASE (the runtime's tables are below), inside guest
        memory (at most runtime.MAX_PDS GiB) and clear of the vCPUs' user stacks below
        USER_STACK_TOP; a flat binary also within FLAT_MAX bytes."""
        what = "segment" if self.elf_segments is not None else "flat binary"
        if self.elf_segments is None:
            if len(self.code) > FLAT_MAX:
                raise GuestError(f"guest {self.name!r} is {len(self.code)} bytes, larger than the {FLAT_MAX} "
                                 f"bytes of guest memory reserved for the payload at 0x{runtime.PAYLOAD_BASE:x}")
            pieces = [(runtime.PAYLOAD_BASE, len(self.code))]
        else:
            pieces = [(s.addr, s.memsz) for s in self.elf_segments]
        stacks = (runtime.USER_STACK_TOP - vcpus * STACK_BYTES, runtime.USER_STACK_TOP)
        max_memory = runtime.MAX_PDS << 30
        for addr, size in pieces:
            end = addr + size
            if addr < runtime.PAYLOAD_BASE:
                raise GuestError(f"guest {self.name!r}: segment at 0x{addr:x} is below 0x{runtime.PAYLOAD_BASE:x}, "
                                 "where the runtime keeps its tables; link it at 0x100000 or above")
            if end > memory:
                fix = (f"give --memory {-(-end >> 20)} or more" if end <= max_memory else
                       f"it cannot fit: guest memory is at most {max_memory >> 20} MiB")
                raise GuestError(f"guest {self.name!r}: {what} 0x{addr:x}..0x{end:x} lies beyond guest memory "
                                 f"({memory >> 20} MiB); {fix}")
            if addr < stacks[1] and end > stacks[0]:
                raise GuestError(f"guest {self.name!r}: {what} 0x{addr:x}..0x{end:x} overlaps the vCPU user "
                                 f"stacks at 0x{stacks[0]:x}..0x{stacks[1]:x}"
                                 + (f" ({vcpus} vCPUs)" if vcpus > 1 else ""))

    def missing(self, xcr0_supported):
        """The requirements that `xcr0_supported` (bit mask of XSAVE components the vCPU can be
        given) does not meet."""
        return [r for r in self.requires if r.xcr0 & ~xcr0_supported]


def _symbols(path):
    syms = {}
    if path.is_file():
        try:  # optional: an unreadable symbol file means no symbols, not an error
            text = files.read_text(path, "symbol file", 16 << 20)
        except files.FileError:
            text = ""
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3:
                syms[parts[2]] = int(parts[0], 16)
    return syms


def describe(name):
    """A built-in guest's one-paragraph description (from its source's header comment)."""
    src = SOURCE_DIR / f"{name}.S"
    if src.exists():
        m = re.search(r"/\*\s*(.*?)\s*\*/", src.read_text(), re.S)
        if m:
            lines = (ln.strip().removeprefix("*").strip() for ln in m.group(1).splitlines())
            text = " ".join(" ".join(ln for ln in lines if ln).split())
            return text.split(": ", 1)[-1] if text.startswith(name + ":") else text
    return ""


def names():
    """Built-in guest names (every guests/*.S but the runtime)."""
    return sorted(p.stem for p in SOURCE_DIR.glob("*.S") if p.stem != "runtime")


def load_file(path):
    """A guest file: a static ELF64 x86-64 executable (by its magic), else a flat binary for
    PAYLOAD_BASE. Raises GuestError (missing, empty, a directory or special file, too big, bad ELF)."""
    try:
        data = files.read_bytes(path, "guest image (flat binary or ELF64)", FILE_LIMIT)
    except files.FileError as e:
        raise GuestError(str(e)) from None
    from . import elf  # on use: the built-in guests are flat binaries (cold start of `vmm run`)
    p = Path(path)
    name = p.stem or p.name
    if elf.is_elf(data):
        entry, segments = elf.parse(data, str(path))
        return Image(name, b"", _symbols(p.with_suffix(".sym")), entry=entry, elf_segments=segments,
                     path=str(path))
    return Image(name, data, _symbols(p.with_suffix(".sym")), path=str(path))


def load(name_or_path):
    """A built-in guest by name, or a guest file by path (with or without a slash; see load_file).
    A name without a slash that is both a built-in and a file in the current directory is the built-in."""
    name_or_path = os.fspath(name_or_path)
    if not name_or_path:
        raise GuestError("empty guest name; give a built-in name (vmm guests) or a guest file")
    builtin = name_or_path in names() or name_or_path == "runtime"
    if "/" in name_or_path or (not builtin and os.path.lexists(name_or_path)):
        return load_file(name_or_path)
    if not builtin:
        raise GuestError(f"unknown guest {name_or_path!r}: not a built-in guest ({', '.join(names())}) "
                         "and no such file")
    path = build_dir() / f"{name_or_path}.bin"
    if not path.is_file():
        raise GuestError(f"guest {name_or_path!r} is not built ({path} missing): run `make guests`")
    return Image(name_or_path, path.read_bytes(), _symbols(path.with_suffix(".sym")),
                 describe(name_or_path), requires=REQUIREMENTS.get(name_or_path, ()),
                 driver=DRIVERS.get(name_or_path))
