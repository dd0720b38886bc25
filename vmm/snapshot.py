"""Snapshot files of a whole VM: memory, irqchip and clock, every vCPU's state, the guest CPUID and
a fingerprint of the source host.

Format 1.0 (little endian), self-describing and checked before any VM exists:
  header (4096 bytes): magic "VMMSNAP\\0", u16 major, u16 minor, u32 section count, then per section
      tag (16 bytes, NUL padded), u64 offset, u64 length, u32 crc32, u32 flags; crc32 of the header's
      first 4092 bytes in its last 4.
  sections at 4096-aligned offsets: "meta" (JSON), "vm" (JSON), "vcpu.N" (JSON VcpuState),
      "mem.N" (guest memory of slot N, byte for byte at its guest offset).
Memory sections are sparse: zero pages are holes in the file, the non-zero runs ("extents") are
listed in "meta" with a crc32 each. A restore maps each memory section MAP_PRIVATE (no copy, pages
load on first touch), so restore time does not grow with guest RAM; verification reads only the
extents, plus whatever the file system reports as data outside them (which must be zero).
Files are written to a temporary file, fsynced and renamed: a failed save leaves an old file intact.
"""

import json
import os
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field

from .errors import VmmError

MAGIC = b"VMMSNAP\0"
MAJOR, MINOR = 1, 0
PAGE = 4096
HEADER_SIZE = 4096
_HEAD = struct.Struct("<8sHHI")
_ENTRY = struct.Struct("<16sQQII")
MAX_SECTIONS = (HEADER_SIZE - _HEAD.size - 4) // _ENTRY.size
FLAG_SPARSE = 1  # section crc field unused; extents in meta carry the checksums


class SnapshotError(VmmError):
    """A snapshot file that cannot be used: says what is wrong with it."""


@dataclass
class Section:
    tag: str
    offset: int
    length: int
    crc: int
    flags: int


@dataclass
class Snapshot:
    path: str
    major: int
    minor: int
    sections: dict
    meta: dict
    vm: dict
    vcpus: list = field(default_factory=list)  # VcpuState per vCPU

    @property
    def memory(self):
        return self.meta["vm"]["memory"]

    def guest_cpuid(self):
        return self.vcpus[0].cpuid


def _align(n):
    return (n + PAGE - 1) & ~(PAGE - 1)


# --- host fingerprint ----------------------------------------------------------------------------
def host_fingerprint(kvm):
    """What a destination needs to know about the source host (also recorded by `vmm probe`)."""
    from .kvm import is_pvm
    from .xsave import XsaveLayout
    supported = kvm.get_supported_cpuid()
    return {
        "kernel": os.uname().release,
        "vendor": supported.vendor,
        "pvm": is_pvm(),
        "capabilities": kvm.caps(),
        "supported_cpuid": supported.to_json(),
        "xsave_layout": XsaveLayout.from_cpuid(supported).to_json(),
    }


# --- save ----------------------------------------------------------------------------------------
def _extents(mem):
    """[(offset, length)] runs of non-zero pages in a GuestMemory."""
    from ._bindings import ffi, lib
    npages = mem.size // PAGE
    marks = bytearray(npages)
    n = lib.vmm_nonzero_pages(ffi.cast("unsigned char *", mem.hva), npages, PAGE, ffi.from_buffer(marks),
                              1 if mem.anonymous else 0)
    if n < 0:
        raise MemoryError("scanning guest memory for the snapshot")
    runs, i = [], 0
    while True:
        i = marks.find(1, i)
        if i < 0:
            return runs
        j = marks.find(0, i)
        j = npages if j < 0 else j
        runs.append((i * PAGE, (j - i) * PAGE))
        i = j


class _Progress:
    """A progress line on stderr, only when stderr is a terminal and there is a lot to write."""

    def __init__(self, total, label):
        self.total, self.label, self.done = total, label, 0
        self.on = total >= (64 << 20) and sys.stderr.isatty()
        self.last = 0.0

    def add(self, n):
        self.done += n
        if self.on and (time.monotonic() - self.last > 0.1 or self.done >= self.total):
            self.last = time.monotonic()
            sys.stderr.write(f"\r{self.label}: {self.done >> 20}/{self.total >> 20} MiB "
                             f"{100 * self.done // max(self.total, 1)}%")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def save(path, kvm, vm, vcpus, states, guest=None, extra_meta=None):
    """Write a snapshot of `vm` (its memory slots, irqchip, clock) and the given vCPU states."""
    meta = {
        "format": f"{MAJOR}.{MINOR}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "guest": guest or {},
        "vm": {"irqchip": vm.has_irqchip, "vcpus": len(states), "memory": []},
        "host": host_fingerprint(kvm),
        **(extra_meta or {}),
    }
    vm_state = {"clock": vm.get_clock()}
    if vm.has_irqchip:
        vm_state["irqchip"] = {str(c): vm.get_irqchip(c).hex() for c in (0, 1, 2)}
    if vm.has_pit:
        vm_state["pit"] = vm.get_pit2().hex()
    blobs = [("vm", json.dumps(vm_state).encode())]
    blobs += [(f"vcpu.{i}", json.dumps(s.to_json()).encode()) for i, s in enumerate(states)]
    mems = []
    for slot, mem in enumerate(vm.memory):
        runs = _extents(mem)
        with mem.view as view:  # released here: an open view would keep the mapping from closing
            ext = [[off, n, zlib.crc32(view[off:off + n])] for off, n in runs]
        meta["vm"]["memory"].append({"slot": slot, "gpa": mem.gpa, "size": mem.size, "extents": ext})
        mems.append((f"mem.{slot}", mem, runs))
    blobs.insert(0, ("meta", json.dumps(meta).encode()))
    if len(blobs) + len(mems) > MAX_SECTIONS:
        raise SnapshotError(f"too many sections for format {MAJOR}.{MINOR}: {len(blobs) + len(mems)}")

    # lay out: header, JSON sections, then page-aligned memory sections
    entries, offset = [], HEADER_SIZE
    for tag, data in blobs:
        entries.append((tag, offset, len(data), zlib.crc32(data), 0))
        offset = _align(offset + len(data))
    for tag, mem, _ in mems:
        entries.append((tag, offset, mem.size, 0, FLAG_SPARSE))
        offset = _align(offset + mem.size)
    total = offset

    head = bytearray(HEADER_SIZE)
    _HEAD.pack_into(head, 0, MAGIC, MAJOR, MINOR, len(entries))
    for i, (tag, off, n, crc, flags) in enumerate(entries):
        _ENTRY.pack_into(head, _HEAD.size + i * _ENTRY.size, tag.encode(), off, n, crc, flags)
    struct.pack_into("<I", head, HEADER_SIZE - 4, zlib.crc32(head[:HEADER_SIZE - 4]))

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # an ordinary file, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(head)
            for (tag, data), (_, off, *_rest) in zip(blobs, entries):
                f.seek(off)
                f.write(data)
            progress = _Progress(sum(n for _, _, runs in mems for _, n in runs), "saving guest memory")
            for (tag, mem, runs), (_, base, *_rest) in zip(mems, entries[len(blobs):]):
                with mem.view as view:
                    for off, n in runs:
                        f.seek(base + off)
                        for c in range(off, off + n, 16 << 20):  # bounded chunks for the progress line
                            chunk = view[c:min(c + (16 << 20), off + n)]
                            f.write(chunk)
                            progress.add(len(chunk))
                            chunk.release()
            f.truncate(total)  # the tail of the last section may be a hole
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return total


# --- load and validate (no KVM) ------------------------------------------------------------------
def _read_header(f, size, path):
    if size < HEADER_SIZE:
        raise SnapshotError(f"{path}: truncated: {size} bytes, a snapshot header alone is {HEADER_SIZE}")
    head = f.read(HEADER_SIZE)
    magic, major, minor, n = _HEAD.unpack_from(head, 0)
    if magic != MAGIC:
        raise SnapshotError(f"{path}: not a vmm snapshot (magic {magic!r}, expected {MAGIC!r})")
    if major > MAJOR:
        raise SnapshotError(f"{path}: written in snapshot format {major}.{minor} by a newer vmm; "
                            f"this vmm reads format {MAJOR}.x")
    if major < 1:
        raise SnapshotError(f"{path}: unknown snapshot format {major}.{minor}")
    (crc,) = struct.unpack_from("<I", head, HEADER_SIZE - 4)
    if zlib.crc32(head[:HEADER_SIZE - 4]) != crc:
        raise SnapshotError(f"{path}: header checksum mismatch: the file is corrupt")
    if n > MAX_SECTIONS:
        raise SnapshotError(f"{path}: {n} sections, at most {MAX_SECTIONS} fit a header")
    sections = {}
    for i in range(n):
        tag, off, length, scrc, flags = _ENTRY.unpack_from(head, _HEAD.size + i * _ENTRY.size)
        tag = tag.rstrip(b"\0").decode("ascii", "replace")
        if off % PAGE or off < HEADER_SIZE:
            raise SnapshotError(f"{path}: section {tag!r} at unaligned offset {off}")
        if off + length > size:
            raise SnapshotError(f"{path}: truncated: section {tag!r} needs bytes up to {off + length}, "
                                f"the file has {size}")
        if tag in sections:
            raise SnapshotError(f"{path}: section {tag!r} appears twice")
        sections[tag] = Section(tag, off, length, scrc, flags)
    # no byte may escape a checksum: padding between sections is zero, nothing follows the last
    pos = HEADER_SIZE
    for sec in sorted(sections.values(), key=lambda x: x.offset):
        if sec.offset < pos:
            raise SnapshotError(f"{path}: section {sec.tag!r} overlaps the one before it")
        _check_zero_file(f, pos, sec.offset, path)
        pos = sec.offset + sec.length
    end = _align(pos)
    if size != end:
        raise SnapshotError(f"{path}: {size} bytes, the sections end at {end}: "
                            + ("truncated" if size < end else "trailing data"))
    _check_zero_file(f, pos, end, path)
    return major, minor, sections


def _check_zero_file(f, a, b, path):
    if b > a:
        f.seek(a)
        if f.read(b - a).count(0) != b - a:
            raise SnapshotError(f"{path}: non-zero padding at offset {a}..{b}: the file is corrupt")


def _json_section(f, sec, path):
    f.seek(sec.offset)
    data = f.read(sec.length)
    if zlib.crc32(data) != sec.crc:
        raise SnapshotError(f"{path}: section {sec.tag!r} checksum mismatch: the file is corrupt")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{path}: section {sec.tag!r} is not valid JSON: {e}") from None


def _data_ranges(fd, start, end):
    """Ranges the file system holds as data within [start, end) (SEEK_DATA/SEEK_HOLE)."""
    out, pos = [], start
    while pos < end:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break  # ENXIO: no data after pos
        if d >= end:
            break
        h = min(os.lseek(fd, d, os.SEEK_HOLE), end)
        out.append((d, h))
        pos = h
    return out


def _verify_memory(f, sec, mem_meta, path):
    """crc of every recorded extent; everything else in the section must read as zero."""
    size = mem_meta["size"]
    if sec.length != size:
        raise SnapshotError(f"{path}: memory slot {mem_meta['slot']}: section is {sec.length} bytes, "
                            f"meta says {size}")
    covered = []
    for off, n, crc in mem_meta["extents"]:
        if off < 0 or n <= 0 or off + n > size or off % PAGE:
            raise SnapshotError(f"{path}: memory slot {mem_meta['slot']}: bad extent {off}+{n}")
        f.seek(sec.offset + off)
        if zlib.crc32(f.read(n)) != crc:
            raise SnapshotError(f"{path}: guest memory at 0x{mem_meta['gpa'] + off:x}..+0x{n:x} fails its "
                                "checksum: the file is corrupt")
        covered.append((sec.offset + off, sec.offset + off + n))
    # bytes the file system stores outside the extents must be zero (a flipped byte in a hole)
    try:
        ranges = _data_ranges(f.fileno(), sec.offset, sec.offset + size)
    except OSError:
        ranges = [(sec.offset, sec.offset + size)]
    covered.sort()
    for d0, d1 in ranges:
        pos = d0
        for c0, c1 in covered:
            if c1 <= pos or c0 >= d1:
                continue
            if c0 > pos:
                _check_zero(f, pos, c0, sec, mem_meta, path)
            pos = max(pos, c1)
        if pos < d1:
            _check_zero(f, pos, d1, sec, mem_meta, path)


def _check_zero(f, a, b, sec, mem_meta, path):
    f.seek(a)
    left = b - a
    while left:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            raise SnapshotError(f"{path}: truncated inside guest memory")
        if chunk.count(0) != len(chunk):
            at = mem_meta["gpa"] + (f.tell() - len(chunk) - sec.offset)
            raise SnapshotError(f"{path}: guest memory near 0x{at:x} holds data the snapshot did not "
                                "record (corrupt file)")
        left -= len(chunk)


def load(path):
    """Read and validate a snapshot file completely; touches no KVM. Raises SnapshotError."""
    from .state import VcpuState
    from .errors import StateError
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SnapshotError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        major, minor, sections = _read_header(f, size, path)
        for tag in ("meta", "vm"):
            if tag not in sections:
                raise SnapshotError(f"{path}: no {tag!r} section")
        meta = _json_section(f, sections["meta"], path)
        vm = _json_section(f, sections["vm"], path)
        try:
            nvcpus = int(meta["vm"]["vcpus"])
            memory = meta["vm"]["memory"]
            for m in memory:
                if not all(k in m for k in ("slot", "gpa", "size", "extents")):
                    raise KeyError("memory slot fields")
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"{path}: meta section lacks {e}") from None
        vcpus = []
        for i in range(nvcpus):
            sec = sections.get(f"vcpu.{i}")
            if sec is None:
                raise SnapshotError(f"{path}: vCPU {i} of {nvcpus} has no section")
            try:
                vcpus.append(VcpuState.from_json(_json_section(f, sec, path)))
            except StateError as e:
                raise SnapshotError(f"{path}: vCPU {i}: {e}") from None
        for m in memory:
            sec = sections.get(f"mem.{m['slot']}")
            if sec is None:
                raise SnapshotError(f"{path}: memory slot {m['slot']} has no section")
            try:
                _verify_memory(f, sec, m, path)
            except (TypeError, ValueError) as e:
                raise SnapshotError(f"{path}: memory slot {m['slot']}: malformed extents ({e})") from None
    return Snapshot(path, major, minor, sections, meta, vm, vcpus)


# --- destination checks --------------------------------------------------------------------------
def host_problems(snap, kvm):
    """Why this host cannot restore the snapshot: guest CPUID features, XSAVE components and the XSAVE
    size the host cannot provide. An empty list means it can. (`vmm compat` judges by the same rules,
    with more detail; tests/test_compat.py keeps the two in agreement.)"""
    from .compat import OS_CONTROLLED
    from .xsave import XsaveLayout
    supported = kvm.supported_cpuid()  # cached, keyed by the guest XSAVE permission; only read here
    host = supported.guest_for_xcr0(supported.xcr0_supported())
    guest = snap.guest_cpuid()
    problems = []
    if guest.vendor and supported.vendor and guest.vendor != supported.vendor:
        problems.append(f"vendor: the guest ran on {guest.vendor}, this host is {supported.vendor}")
    missing = sorted(guest.features() - host.features() - OS_CONTROLLED)
    if missing:
        problems.append("guest CPUID features this host lacks: " + ", ".join(missing))
    g_layout, h_layout = XsaveLayout.from_cpuid(guest), XsaveLayout.from_cpuid(supported)
    xcr0 = guest.xcr0_supported()
    for idx in sorted(i for i in g_layout.components if xcr0 >> i & 1 and i >= 2):
        g, h = g_layout.components[idx], h_layout.components.get(idx)
        if h is None or not (supported.xcr0_supported() >> idx & 1):
            problems.append(f"XSAVE component {g.name} ({idx}) is not supported here")
        elif (g.offset, g.size) != (h.offset, h.size):
            problems.append(f"XSAVE component {g.name} ({idx}) is {g.size}@{g.offset} in the snapshot, "
                            f"{h.size}@{h.offset} here")
    from .state import fit_xsave
    from .errors import StateError
    here = kvm.check_extension("KVM_CAP_XSAVE2") or 4096
    for i, s in enumerate(snap.vcpus):
        try:
            fit_xsave(s.xsave, here)
        except StateError as e:
            problems.append(f"vCPU {i}: {e}")
            break
    return problems


def _request_amx_permission(snap):
    """A guest with XTILEDATA in its XCR0 needs this process's AMX guest permission before the
    first vCPU exists (and before KVM reports the larger XSAVE size): ask for it first."""
    from . import amx
    from .errors import KvmError
    if not snap.guest_cpuid().xcr0_supported() & amx.XFEATURE_MASK_XTILEDATA:
        return []
    try:
        amx.req_xcomp_guest_perm(amx.XFEATURE_XTILEDATA)
    except KvmError as e:
        return [f"the guest uses AMX (XTILEDATA) and this process cannot get the guest permission: {e}"]
    return []


def restore(snap, kvm):
    """Build a VM from a validated snapshot: memory mapped from the file, then VM and vCPU state.
    Returns (vm, vcpus); the caller owns the VM."""
    from .state import restore_state
    problems = _request_amx_permission(snap)
    problems += host_problems(snap, kvm)
    if problems:
        raise SnapshotError(f"{snap.path}: this host cannot restore the snapshot:\n  - "
                            + "\n  - ".join(problems))
    vm = kvm.create_vm()
    try:
        if snap.meta["vm"]["irqchip"]:
            vm.create_irqchip()
        with open(snap.path, "rb") as f:  # each mapping keeps its own reference to the file
            for m in snap.memory:
                sec = snap.sections[f"mem.{m['slot']}"]
                vm.add_memory(m["size"], m["gpa"], fileobj=f, file_offset=sec.offset)
        for chip, raw in snap.vm.get("irqchip", {}).items():
            vm.set_irqchip(bytes.fromhex(raw))
        if "pit" in snap.vm:
            vm.create_pit2()
            vm.set_pit2(bytes.fromhex(snap.vm["pit"]))
        vcpus = []
        for i, s in enumerate(snap.vcpus):
            v = vm.create_vcpu()
            restore_state(v, s)
            vcpus.append(v)
        vm.set_clock(snap.vm["clock"])
    except BaseException:
        vm.close()
        raise
    return vm, vcpus
