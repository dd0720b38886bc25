"""Snapshot files of a whole VM: memory, irqchip and clock, every vCPU's state, the guest CPUID and
a fingerprint of the source host.

Format 2.0 (little endian), self-describing and checked before the guest runs:
  header (4096 bytes): magic "VMMSNAP\0", u16 major, u16 minor, u32 section count, then per section
      tag (16 bytes, NUL padded), u64 offset, u64 length, u32 crc32, u32 flags; crc32 of the header's
      first 4092 bytes in its last 4.
  sections at 4096-aligned offsets: "meta" (JSON), "vm" (JSON), "vcpu.N" (JSON VcpuState),
      "mem.N" (guest memory of slot N, byte for byte at its guest offset).
Memory sections are sparse: zero pages are holes in the file, the non-zero runs are cut into
extents of at most EXTENT_MAX bytes, listed in "meta" with a checksum each: XXH3-64 (the xxhash
library; "hash": "xxh3_64", 16 hex digits) in format 2, zlib's crc32 (an integer) in format 1,
which still loads. A restore maps each memory section MAP_PRIVATE (no copy, pages load on first
touch), so restore time does not grow with guest RAM; verification reads only the extents, plus
whatever the file system reports as data outside them (which must be zero).
Extents are checked in worker threads (the hashes release the GIL), while saving as the bytes are
written, while restoring alongside the restore's own ioctls and always before restore() returns,
so before the guest can read a byte; load() checks them itself unless told restore() will.
Files are written through vmm.files.output (a temporary file, fsynced and renamed): a failed save
leaves an old file intact, and a FIFO or device is written through, never replaced.
"""

import json
import os
import struct
import stat
import threading
import time
import zlib
from dataclasses import dataclass, field

from .errors import VmmError
from .host import Host, fingerprint

MAGIC = b"VMMSNAP\0"
MAJOR, MINOR = 2, 0
HASH = "xxh3_64"       # extent checksum of format 2
EXTENT_MAX = 64 << 20  # extents are cut to this size: the unit of parallel hashing, chunk of I/O
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
    # slot -> (hash function, [(offset, length, checksum)]): extents load() left for restore()
    unchecked: dict = field(default_factory=dict)

    @property
    def memory(self):
        return self.meta["vm"]["memory"]

    def guest_cpuid(self):
        return self.vcpus[0].cpuid


def _align(n):
    return (n + PAGE - 1) & ~(PAGE - 1)


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


def _xxh3(buf):
    """XXH3-64 of a buffer (no copy); the xxhash object releases the GIL for large inputs."""
    import xxhash
    h = xxhash.xxh3_64()
    h.update(buf)
    return h.intdigest()


def _hash_of(major, mem_meta):
    """(hash function, checksum as stored -> int) for extents of this format."""
    if major >= 2:
        if mem_meta.get("hash", HASH) != HASH:
            raise ValueError(f"unknown extent hash {mem_meta.get('hash')!r}")
        return _xxh3, lambda v: int(v, 16)
    return zlib.crc32, int


def _pieces(runs):
    """Runs cut into extents of at most EXTENT_MAX bytes."""
    return [(o, min(EXTENT_MAX, off + n - o)) for off, n in runs for o in range(off, off + n, EXTENT_MAX)]


def _parallel(jobs, workers=None):
    """Run the callables in `jobs` on worker threads (at most one per CPU, up to 4); returns their
    results in order, raising the first exception. Meant for work that releases the GIL."""
    jobs = list(jobs)
    results, errors = [None] * len(jobs), []
    n = max(1, min(workers or min(os.cpu_count() or 1, 4), len(jobs)))
    it = iter(range(len(jobs)))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(it, None)
            if i is None or errors:
                return
            try:
                results[i] = jobs[i]()
            except BaseException as e:  # handed to the caller
                errors.append(e)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results, errors


def _join(started):
    threads, results, errors = started
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


class _NoProgress:
    def update(self, n):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(progress, total):
    """`progress(total)` (a context manager whose update(n) counts bytes, or None; the CLI passes a
    progress bar on a terminal) or one that does nothing."""
    return (progress(total) if progress else None) or _NoProgress()


def save(path, kvm, vm, vcpus, states, guest=None, extra_meta=None, progress=None):
    """Write a snapshot of `vm` (its memory slots, irqchip, clock) and the given vCPU states to
    `path` through vmm.files.output: a regular file atomically (temporary file, fsync, rename), "-"
    (standard output), a FIFO or a character device written through in order (zeros instead of
    holes). Returns the file size. The extents are hashed on worker threads while this thread
    writes them (both straight from guest memory, no copy). `progress(total_bytes)`, if given, is a
    context manager whose update(n) counts guest memory written. vmm.files.FileError when the file
    cannot be written."""
    from . import files
    meta = {
        "format": f"{MAJOR}.{MINOR}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "guest": guest or {},
        "vm": {"irqchip": vm.has_irqchip, "vcpus": len(states), "memory": []},
        "host": fingerprint(kvm),
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
        pieces = _pieces(_extents(mem))
        # hashes are filled in after the memory is written; 16 hex digits keep the JSON's length
        ext = [[off, n, "0" * 16] for off, n in pieces]
        meta["vm"]["memory"].append({"slot": slot, "gpa": mem.gpa, "size": mem.size, "hash": HASH,
                                     "extents": ext})
        mems.append((f"mem.{slot}", mem, pieces, ext))
    if len(blobs) + 1 + len(mems) > MAX_SECTIONS:
        raise SnapshotError(f"too many sections for format {MAJOR}.{MINOR}: {len(blobs) + 1 + len(mems)}")

    # lay out: header, JSON sections (meta first), then page-aligned memory sections
    meta_len = len(json.dumps(meta).encode())
    entries, offset = [("meta", HEADER_SIZE, meta_len, 0, 0)], _align(HEADER_SIZE + meta_len)
    for tag, data in blobs:
        entries.append((tag, offset, len(data), zlib.crc32(data), 0))
        offset = _align(offset + len(data))
    for tag, mem, _, _ in mems:
        entries.append((tag, offset, mem.size, 0, FLAG_SPARSE))
        offset = _align(offset + mem.size)
    total = offset

    def header(hashes):
        it = iter(hashes)
        for _, _, _, ext in mems:
            for e in ext:
                e[2] = f"{next(it):016x}"
        meta_data = json.dumps(meta).encode()
        assert len(meta_data) == meta_len  # fixed-width hashes: the layout holds
        entries[0] = ("meta", HEADER_SIZE, meta_len, zlib.crc32(meta_data), 0)
        head = bytearray(HEADER_SIZE)
        _HEAD.pack_into(head, 0, MAGIC, MAJOR, MINOR, len(entries))
        for i, (tag, off, n, crc, flags) in enumerate(entries):
            _ENTRY.pack_into(head, _HEAD.size + i * _ENTRY.size, tag.encode(), off, n, crc, flags)
        struct.pack_into("<I", head, HEADER_SIZE - 4, zlib.crc32(head[:HEADER_SIZE - 4]))
        return bytes(head), meta_data

    views = [mem.view for _, mem, _, _ in mems]
    memory_bytes = sum(n for _, _, pieces, _ in mems for _, n in pieces)
    try:
        with files.output(path, binary=True) as f, _progress(progress, memory_bytes) as bar:
            fd = f.fileno()
            hashing = _parallel(lambda v=v, o=o, n=n: _xxh3(v[o:o + n])
                                for v, (_, _, pieces, _) in zip(views, mems) for o, n in pieces)
            if stat.S_ISREG(os.fstat(fd).st_mode):  # sparse, memory first, the header last
                try:
                    for (tag, data), (_, off, *_rest) in zip(blobs, entries[1:]):
                        os.pwrite(fd, data, off)
                    for view, (_, _, pieces, _), (_, base, *_rest) in zip(views, mems, entries[1 + len(blobs):]):
                        for off, n in pieces:
                            chunk = view[off:off + n]
                            done = 0
                            while done < n:
                                done += os.pwrite(fd, chunk[done:], base + off + done)
                            chunk.release()
                            bar.update(n)
                finally:
                    hashes = _join(hashing)
                head, meta_data = header(hashes)
                os.pwrite(fd, head, 0)
                os.pwrite(fd, meta_data, HEADER_SIZE)
                os.ftruncate(fd, total)  # the tail of the last section may be a hole
            else:  # a pipe or a device: in order, after the hashes, zeros where a file has holes
                head, meta_data = header(_join(hashing))
                pos = 0

                def put(data, at):
                    nonlocal pos
                    while pos < at:
                        pos += f.write(bytes(min(at - pos, 1 << 20)))
                    f.write(data)
                    pos += len(data)
                put(head, 0)
                put(meta_data, HEADER_SIZE)
                for (tag, data), (_, off, *_rest) in zip(blobs, entries[1:]):
                    put(data, off)
                for view, (_, _, pieces, _), (_, base, *_rest) in zip(views, mems, entries[1 + len(blobs):]):
                    for off, n in pieces:
                        chunk = view[off:off + n]
                        put(chunk, base + off)
                        chunk.release()
                        bar.update(n)
                put(b"", total)
    finally:
        for v in views:  # an open view would keep the mapping from closing
            v.release()
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
        from . import files
        return files.parse_json(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{path}: section {sec.tag!r} is not valid JSON: {e}") from None


def _data_ranges(fd, start, end):
    """Ranges the file system holds as data within [start, end) (SEEK_DATA/SEEK_HOLE). The fd's
    offset is put back: a buffered reader on it keeps its own idea of where it is."""
    out, pos = [], start
    saved = os.lseek(fd, 0, os.SEEK_CUR)
    try:
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
    finally:
        os.lseek(fd, saved, os.SEEK_SET)
    return out


def _check_extents(sec, mem_meta, path):
    """The recorded extents, validated against the section: [(offset, length, checksum)]."""
    size = mem_meta["size"]
    if sec.length != size:
        raise SnapshotError(f"{path}: memory slot {mem_meta['slot']}: section is {sec.length} bytes, "
                            f"meta says {size}")
    out, end = [], 0
    for off, n, crc in mem_meta["extents"]:
        if off < 0 or n <= 0 or off + n > size or off % PAGE or off < end:
            raise SnapshotError(f"{path}: memory slot {mem_meta['slot']}: bad extent {off}+{n}")
        out.append((off, n, crc))
        end = off + n
    return out


def _extent_list(major, sec, mem_meta, path):
    """(hash function, [(offset, length, expected checksum)]) of one memory section."""
    fn, stored = _hash_of(major, mem_meta)
    return fn, [(off, n, stored(crc)) for off, n, crc in _check_extents(sec, mem_meta, path)]


def _extent_jobs(fn, extents, view, gpa, path):
    """One callable per extent that checks it in `view` (the section's bytes, no copy)."""
    def job(off, n, want):
        if fn(view[off:off + n]) != want:
            raise SnapshotError(f"{path}: guest memory at 0x{gpa + off:x}..+0x{n:x} fails its "
                                "checksum: the file is corrupt")
    return [lambda a=e: job(*a) for e in extents]


def _check_unrecorded(f, sec, mem_meta, path):
    """Bytes the file system stores outside the extents must be zero (a flipped byte in a hole)."""
    size = mem_meta["size"]
    try:
        ranges = _data_ranges(f.fileno(), sec.offset, sec.offset + size)
    except OSError:
        ranges = [(sec.offset, sec.offset + size)]
    covered = sorted((sec.offset + off, sec.offset + off + n) for off, n, _ in mem_meta["extents"])
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


def _verify_extents(f, sec, mem_meta, fn, extents, path):
    """Every recorded extent against its checksum, read through a mapping of the file on worker
    threads."""
    import mmap
    with mmap.mmap(f.fileno(), sec.length, prot=mmap.PROT_READ, offset=sec.offset) as mm:
        view = memoryview(mm)
        try:
            _join(_parallel(_extent_jobs(fn, extents, view, mem_meta["gpa"], path)))
        finally:
            view.release()


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


def load(path, check_memory=True):
    """Read and validate a snapshot file; touches no KVM. Raises SnapshotError.

    Everything is checked here, except, with check_memory=False, the checksums of the memory
    extents: restore() then checks them on worker threads alongside its own work, before it returns
    (so before the guest runs). The layout of the extents and the zero bytes outside them are
    checked either way."""
    from .state import VcpuState
    from .errors import StateError
    from . import files
    try:
        f = files.open_input(path, "vmm snapshot")  # a regular, non-empty file; mapped, not read whole
    except files.FileError as e:
        raise SnapshotError(str(e)) from None
    with f:
        size = f.size
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
        _check_vm_values(nvcpus, memory, vm, path)
        vcpus = []
        for i in range(nvcpus):
            sec = sections.get(f"vcpu.{i}")
            if sec is None:
                raise SnapshotError(f"{path}: vCPU {i} of {nvcpus} has no section")
            try:
                vcpus.append(VcpuState.from_json(_json_section(f, sec, path)))
            except StateError as e:
                raise SnapshotError(f"{path}: vCPU {i}: {e}") from None
        unchecked = {}
        for m in memory:
            sec = sections.get(f"mem.{m['slot']}")
            if sec is None:
                raise SnapshotError(f"{path}: memory slot {m['slot']} has no section")
            try:
                fn, extents = _extent_list(major, sec, m, path)
                _check_unrecorded(f, sec, m, path)
            except (TypeError, ValueError) as e:
                raise SnapshotError(f"{path}: memory slot {m['slot']}: malformed extents ({e})") from None
            if check_memory:
                _verify_extents(f, sec, m, fn, extents, path)
            else:
                unchecked[m["slot"]] = (fn, extents)
    return Snapshot(path, major, minor, sections, meta, vm, vcpus, unchecked)


def _is_u64(x):
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 64


def _check_vm_values(nvcpus, memory, vm, path):
    """What KVM would refuse, refused as bad input before any VM exists: at least one vCPU; memory
    slots page-aligned and non-empty (KVM_SET_USER_MEMORY_REGION: guest_phys_addr and memory_size
    are multiples of the page size; Documentation/virt/kvm/api.rst); the clock a __u64
    (struct kvm_clock_data, include/uapi/linux/kvm.h)."""
    if nvcpus < 1:
        raise SnapshotError(f"{path}: the snapshot has {nvcpus} vCPUs; a VM has at least one")
    for m in memory:
        gpa, size = m["gpa"], m["size"]
        if not (_is_u64(gpa) and _is_u64(size) and size > 0 and gpa % PAGE == 0 and size % PAGE == 0
                and gpa + size <= 1 << 64):
            raise SnapshotError(f"{path}: memory slot {m['slot']!r} at {gpa!r} of {size!r} bytes: a slot is "
                                f"a non-empty run of whole {PAGE}-byte pages at a page-aligned address")
    clock = vm.get("clock") if isinstance(vm, dict) else None
    if not _is_u64(clock):
        raise SnapshotError(f"{path}: vm section: clock {clock!r} is not an unsigned 64-bit count of ns")


# --- destination checks --------------------------------------------------------------------------
def host_problems(snap, kvm):
    """Why this host (this process's /dev/kvm, with the AMX permission it holds) cannot restore the
    snapshot, in words; an empty list means it can. The judge is vmm.compat.compare, the one
    `vmm compat` uses, worded "in the snapshot ... here"."""
    from .compat import RESTORE, Guest, compare
    guest = Guest.from_snapshot(snap, f"snapshot {snap.path}")
    return compare(guest, Host.from_kvm(kvm), RESTORE).problems


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
        jobs, views = [], []
        with open(snap.path, "rb") as f:  # each mapping keeps its own reference to the file
            for m in snap.memory:
                sec = snap.sections[f"mem.{m['slot']}"]
                mem = vm.add_memory(m["size"], m["gpa"], fileobj=f, file_offset=sec.offset)
                if m["slot"] in snap.unchecked:  # the very mapping the guest gets
                    fn, extents = snap.unchecked[m["slot"]]
                    views.append(mem.view)
                    jobs += _extent_jobs(fn, extents, views[-1], m["gpa"], snap.path)
        checking = _parallel(jobs)  # alongside the ioctls below; joined before the guest can run
        try:
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
        finally:
            try:
                _join(checking)
            finally:
                for v in views:
                    v.release()
    except BaseException:
        vm.close()
        raise
    return vm, vcpus
