"""Snapshot files: two-process save/restore, and every kind of bad file refused before any VM."""

import json
import os
import struct
import subprocess
import sys
import zlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vmm import amx, snapshot, state
from vmm.cpuid import CpuidTable
from vmm.errors import KvmError
from vmm.files import FileError
from vmm.guest.machine import Machine
from vmm.snapshot import SnapshotError
from vmm.xsave import XsaveLayout, component_name

DATA = os.path.join(os.path.dirname(__file__), "data")


def vmm(*args):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def snap_file(tmp_path_factory):
    """A snapshot of the checkpoint guest with two vCPUs, written by a separate `vmm` process."""
    from conftest import _require_kvm
    _require_kvm()
    path = tmp_path_factory.mktemp("snap") / "s.snap"
    r = vmm("snapshot", "checkpoint", "--vcpus", "2", "-o", str(path))
    assert r.returncode == 0, r.stderr
    return path


@pytest.mark.kvm
def test_snapshot_then_restore_in_another_process_is_done(snap_file):
    r = vmm("restore", str(snap_file), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["xsave_identical"] == [True, True]
    assert [v["exit"]["event"] for v in d["vcpus"]] == ["done", "done"]


@pytest.mark.kvm
def test_inspect_needs_no_kvm_and_tells_what_is_inside(snap_file):
    d = json.loads(vmm("inspect", str(snap_file), "--json").stdout)
    assert d["guest"]["name"] == "checkpoint" and len(d["vcpus"]) == 2
    assert d["vcpus"][0]["cpl"] == 3 and d["memory"][0]["size"] == 4 << 20
    assert 0 < d["memory"][0]["stored_bytes"] < 1 << 20  # sparse: zero pages are not stored


@pytest.mark.kvm
def test_memory_is_mapped_from_the_file_not_copied(snap_file, kvm):
    snap = snapshot.load(str(snap_file))
    with Machine.from_snapshot(snap, kvm=kvm) as m:
        assert not m.memory.anonymous  # a MAP_PRIVATE view of the snapshot file
        assert m.vm.read(0x310000, 8) == (0).to_bytes(8, "little")  # qword 0 of vCPU 0's pattern


def _corrupt(tmp_path, snap_file, edit):
    data = bytearray(snap_file.read_bytes())
    edit(data)
    p = tmp_path / "bad.snap"
    p.write_bytes(bytes(data))
    return p


def _rehead(data):
    struct.pack_into("<I", data, 4092, zlib.crc32(bytes(data[:4092])))


@pytest.mark.kvm
@pytest.mark.parametrize("name, edit, message", [
    ("truncated", lambda d: d.__delitem__(slice(len(d) - 4096, None)), "truncated"),
    ("tiny", lambda d: d.__delitem__(slice(100, None)), "truncated"),
    ("magic", lambda d: d.__setitem__(slice(0, 8), b"NOTSNAP\0"), "not a vmm snapshot"),
    ("newer", lambda d: (struct.pack_into("<H", d, 8, snapshot.MAJOR + 1), _rehead(d)), "newer vmm"),
    ("header", lambda d: d.__setitem__(20, d[20] ^ 0x40), "header checksum"),
    ("trailing", lambda d: d.extend(b"x"), "trailing data"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path, snap_file, name, edit, message):
    with pytest.raises(SnapshotError, match=message):
        snapshot.load(str(_corrupt(tmp_path, snap_file, edit)))


@pytest.mark.kvm
def test_one_flipped_byte_anywhere_is_caught(tmp_path, snap_file):
    """Every region of the file: header, each JSON section and its padding, memory extents and the
    holes between them. A flip turns a zero into non-zero or changes checksummed bytes."""
    snap = snapshot.load(str(snap_file))
    size = snap_file.stat().st_size
    mem = snap.sections["mem.0"]
    ext = snap.memory[0]["extents"]
    offsets = {0, 9, 4095}
    for sec in snap.sections.values():
        offsets |= {sec.offset, sec.offset + sec.length // 2, sec.offset + sec.length - 1,
                    min(sec.offset + sec.length + 1, size - 1)}  # the padding after it
    offsets |= {mem.offset + off + n // 2 for off, n, _ in ext}  # inside stored guest memory
    offsets |= {mem.offset + mem.length - 8, mem.offset + 0x200000}  # holes (zero pages)
    for off in sorted(offsets):
        p = _corrupt(tmp_path, snap_file, lambda d: d.__setitem__(off, d[off] ^ 0x5A))
        with pytest.raises(SnapshotError):
            snapshot.load(str(p))


@pytest.mark.kvm
def test_a_host_that_cannot_provide_the_guest_is_told_what_is_missing(tmp_path, kvm):
    """The guest CPUID of a Sapphire Rapids guest with AMX cannot be provided here: the refusal
    lists vendor, features and XSAVE components, and comes before any VM is created."""
    spr = CpuidTable.from_dump(os.path.join(DATA, "intel-sapphire-rapids-w7-2475x.txt"))
    with Machine("sync", kvm=kvm) as m:
        m.run(timeout=5)
        s = state.save_state(m.vcpu)
        s.cpuid = spr.guest_for_xcr0(0x602E7)
        path = tmp_path / "spr.snap"
        snapshot.save(str(path), kvm, m.vm, m.vcpus, [s])
    snap = snapshot.load(str(path))
    problems = "\n".join(snapshot.host_problems(snap, kvm))
    assert "AMX_TILE" in problems and "XTILEDATA (18)" in problems
    assert ("GenuineIntel" in problems) == (kvm.get_supported_cpuid().vendor != "GenuineIntel")
    here = XsaveLayout.from_cpuid(kvm.get_supported_cpuid()).components
    for i, c in XsaveLayout.from_cpuid(spr).components.items():
        if i < 2 or c.supervisor:  # KVM's standard-format buffer holds user components only
            continue
        if i not in here:
            assert f"XSAVE component {component_name(i)} ({i}) is not supported here" in problems
        elif (here[i].offset, here[i].size) != (c.offset, c.size):
            assert (f"{component_name(i)} ({i}) is {c.size}@{c.offset} in the snapshot, "
                    f"{here[i].size}@{here[i].offset} here") in problems
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(SnapshotError, match="cannot restore") as ei:
        Machine.from_snapshot(snap, kvm=kvm)
    assert len(os.listdir("/proc/self/fd")) == fds
    try:  # the restore asks for the AMX guest permission the guest needs, first
        amx.req_xcomp_guest_perm()
    except KvmError as e:
        assert f"cannot get the guest permission: {e}" in str(ei.value)


@pytest.mark.kvm
def test_failed_save_leaves_the_old_file_intact(tmp_path, kvm, monkeypatch):
    path = tmp_path / "s.snap"
    path.write_bytes(b"the old snapshot")
    with Machine("sync", kvm=kvm) as m:
        m.run(timeout=5)
        s = state.save_state(m.vcpu)

        def fail(fd):
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(os, "fsync", fail)
        with pytest.raises(FileError, match="s.snap: cannot write: Input/output error"):
            snapshot.save(str(path), kvm, m.vm, m.vcpus, [s])
    assert path.read_bytes() == b"the old snapshot"
    assert os.listdir(tmp_path) == ["s.snap"]  # no temporary file left behind


@pytest.mark.kvm
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=4),
       st.sampled_from(["xor", "truncate", "insert"]))
def test_fuzz_mutated_snapshots_give_only_clean_errors(tmp_path, snap_file, edits, how):
    data = bytearray(snap_file.read_bytes())
    seen = set()
    for pos, val in edits:
        pos %= len(data)
        if pos in seen:  # two flips of one byte could cancel out
            continue
        seen.add(pos)
        if how == "xor":
            data[pos] ^= val
        elif how == "truncate":
            del data[pos:]
            break
        else:
            data[pos:pos] = bytes([val])
    p = tmp_path / "fuzz.snap"
    p.write_bytes(bytes(data))
    # every mutation changes the file, so every load must be refused, and only with SnapshotError
    with pytest.raises(SnapshotError):
        snapshot.load(str(p))


RESTORE_AMX = """
import sys
from vmm import snapshot
from vmm.guest.machine import Machine
snap = snapshot.load(sys.argv[1])
with Machine.from_snapshot(snap) as m:  # asks for the AMX guest permission before its vCPU
    assert m.vcpu.get_xsave() == snap.vcpus[0].xsave, "XSAVE (with the tile data) differs"
    print(m.run(timeout=10))
"""


@pytest.mark.amx
def test_amx_guest_snapshot_restores_in_a_fresh_process(tmp_path, kvm):
    """On AMX hosts: the amx guest, snapshotted with TMM0 loaded (SYNC 1), restores in a process
    that never asked for AMX itself, with its 11 KiB XSAVE area intact, and reaches SYNC 2."""
    import conftest  # the AMX process asked for the guest permission before any vCPU
    conftest.needs_amx(kvm)
    path = tmp_path / "amx.snap"
    r = vmm("snapshot", "amx", "--amx", "-o", str(path))
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", RESTORE_AMX, str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "sync 0x2"


def _pit_channel2(raw):
    from vmm._bindings import ffi
    c = ffi.new("struct kvm_pit_state2 *")
    ffi.buffer(c)[:] = raw
    ch = c.channels[2]
    return (ch.count, ch.rw_mode, ch.mode, ch.gate, ch.bcd)


@pytest.mark.kvm
def test_pit_state_travels_with_the_snapshot(tmp_path, kvm):
    """A VM with an in-kernel i8254 gets it back on restore, with the state it had (channel 2
    programmed to something no fresh PIT has: mode 2, count 0x1234, gate high)."""
    from vmm._bindings import ffi
    path = tmp_path / "pit.snap"
    with Machine("checkpoint", kvm=kvm, pit=True) as m:
        m.run(timeout=10)
        c = ffi.new("struct kvm_pit_state2 *")
        ffi.buffer(c)[:] = m.vm.get_pit2()
        ch = c.channels[2]
        ch.count, ch.rw_mode, ch.mode, ch.gate = 0x1234, 3, 2, 1
        m.vm.set_pit2(bytes(ffi.buffer(c)))
        assert _pit_channel2(m.vm.get_pit2()) == (0x1234, 3, 2, 1, 0)
        snapshot.save(str(path), kvm, m.vm, m.vcpus, [state.save_state(m.vcpu)])
    snap = snapshot.load(str(path))
    with Machine.from_snapshot(snap, kvm=kvm) as r:
        assert r.vm.has_pit
        assert _pit_channel2(r.vm.get_pit2()) == (0x1234, 3, 2, 1, 0)
        assert r.run(timeout=10).kind == "done"


@pytest.mark.kvm
def test_a_zero_tail_xsave_of_an_amx_permitted_saver_restores_without_warning(tmp_path, kvm):
    """A process holding the AMX guest permission saves 11008 bytes (KVM_CAP_XSAVE2) for a guest
    without AMX: the tail is zero. Restore fits it to this process's size; the read-back is compared
    with the fitted image, so the restore is clean (exit 0, nothing on stderr)."""
    with Machine("sync", kvm=kvm) as m:
        ev = m.run(timeout=5)
        s = state.save_state(m.vcpu, diagnose=True)
        assert len(s.xsave) <= 11008
        s.xsave = s.xsave + bytes(11008 - len(s.xsave))
        path = tmp_path / "zero-tail.snap"
        snapshot.save(str(path), kvm, m.vm, m.vcpus, [s], guest={"name": "sync"}, extra_meta={"at_sync": 1})
    assert "SYNC" in str(ev) or "sync" in str(ev).lower()
    assert len(snapshot.load(str(path)).vcpus[0].xsave) == 11008
    r = vmm("restore", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == "" and r.stdout.rstrip().endswith("done")


def _sync_snapshot(path, kvm, memory=4 << 20, fill=0):
    """The sync guest at its first SYNC, `fill` bytes of a pattern written above the runtime."""
    from vmm.guest import runtime
    with Machine("sync", kvm=kvm, memory=memory) as m:
        assert m.run(timeout=10).kind == "sync"
        if fill:
            pattern = (bytes(range(1, 256)) * (fill // 255 + 1))[:fill]
            m.vm.write(runtime.MIN_MEMORY, pattern)
        snapshot.save(str(path), kvm, m.vm, m.vcpus, [state.save_state(v) for v in m.vcpus])
    return path


def _rewrite_section(data, snap, tag, obj):
    """Puts `obj` as JSON in section `tag` of the file bytes `data` (of `snap`), with its length and
    checksum (and the header's) made right again, as a deliberate editor would."""
    blob = json.dumps(obj).encode()
    sec = snap.sections[tag]
    room = min((s.offset for s in snap.sections.values() if s.offset > sec.offset), default=len(data)) - sec.offset
    assert len(blob) <= room
    data[sec.offset:sec.offset + room] = blob + bytes(room - len(blob))
    for i in range(struct.unpack_from("<I", data, 12)[0]):
        at = 16 + i * 40
        if data[at:at + 16].rstrip(b"\0") == tag.encode():
            struct.pack_into("<QI", data, at + 24, len(blob), zlib.crc32(blob))
    _rehead(data)


def _as_format_1(path, out):
    """The same snapshot as format 1 wrote it: crc32 (an integer) per memory extent."""
    snap = snapshot.load(str(path))
    data = bytearray(path.read_bytes())
    meta = dict(snap.meta, format="1.0")
    mem = snap.sections["mem.0"]
    for m in meta["vm"]["memory"]:
        del m["hash"]
        m["extents"] = [[off, n, zlib.crc32(data[mem.offset + off:mem.offset + off + n])]
                        for off, n, _ in m["extents"]]
    struct.pack_into("<HH", data, 8, 1, 0)
    _rewrite_section(data, snap, "meta", meta)
    out.write_bytes(bytes(data))
    return out


@pytest.mark.kvm
@pytest.mark.parametrize("tag, edit, message", [
    ("meta", lambda o: o["vm"].__setitem__("vcpus", 0), "0 vCPUs"),
    ("meta", lambda o: o["vm"]["memory"][0].__setitem__("gpa", 5), "page-aligned"),
    ("meta", lambda o: o["vm"]["memory"][0].__setitem__("size", 0), "non-empty"),
    ("vm", lambda o: o.__setitem__("clock", -1), "clock -1"),
    ("vm", lambda o: o.__setitem__("clock", 1 << 64), "unsigned 64-bit"),
])
def test_values_kvm_would_refuse_are_bad_input_with_checksums_intact(tmp_path, snap_file, tag, edit, message):
    """A file edited with its checksums made right again: what KVM would refuse (no vCPU, a slot not
    of whole pages, a clock out of __u64) is refused at load, before any VM, as bad input (exit 2)."""
    snap = snapshot.load(str(snap_file))
    data = bytearray(snap_file.read_bytes())
    obj = json.loads(json.dumps(snap.meta if tag == "meta" else snap.vm))
    edit(obj)
    _rewrite_section(data, snap, tag, obj)
    bad = tmp_path / "edited.snap"
    bad.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=message):
        snapshot.load(str(bad))
    for command in ("inspect", "restore", "compat"):
        r = vmm(command, str(bad))
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (command, r.stderr)


@pytest.mark.kvm
def test_format_1_files_still_load_and_restore(tmp_path, kvm):
    """A format-1 file (crc32 per extent) loads, restores and runs on; a flipped byte in its
    guest memory is still caught, by load and by restore."""
    new = _sync_snapshot(tmp_path / "new.snap", kvm, memory=8 << 20, fill=64 << 10)
    old = _as_format_1(new, tmp_path / "old.snap")
    snap = snapshot.load(str(old))
    assert (snap.major, snap.minor) == (1, 0)
    assert snap.memory[0]["extents"] and all(isinstance(c, int) for _, _, c in snap.memory[0]["extents"])
    with Machine.from_snapshot(snapshot.load(str(old), check_memory=False), kvm=kvm) as r:
        assert [r.run(timeout=10).kind for _ in range(3)] == ["sync", "sync", "done"]
    off, n, _ = snap.memory[0]["extents"][-1]
    at = snap.sections["mem.0"].offset + off + n // 2
    bad = _corrupt(tmp_path, old, lambda d: d.__setitem__(at, d[at] ^ 1))
    with pytest.raises(SnapshotError, match="fails its checksum"):
        snapshot.load(str(bad))
    with pytest.raises(SnapshotError, match="fails its checksum"):
        Machine.from_snapshot(snapshot.load(str(bad), check_memory=False), kvm=kvm)


@pytest.mark.kvm
def test_restore_checks_every_extent_before_the_guest_runs(tmp_path, kvm):
    """load(check_memory=False) leaves the memory checksums to the restore, which checks them on
    worker threads and refuses the snapshot before any KVM_RUN; extents are at most EXTENT_MAX
    bytes (the unit of parallel checking), hashed with XXH3-64."""
    path = _sync_snapshot(tmp_path / "big.snap", kvm, memory=192 << 20, fill=150 << 20)
    snap = snapshot.load(str(path))
    ext = snap.memory[0]["extents"]
    assert snap.major == 2 and snap.memory[0]["hash"] == "xxh3_64"
    assert max(n for _, n, _ in ext) == snapshot.EXTENT_MAX and len(ext) >= 3
    assert sum(n for _, n, _ in ext) >= 150 << 20
    lazy = snapshot.load(str(path), check_memory=False)
    assert set(lazy.unchecked) == {0} and len(lazy.unchecked[0][1]) == len(ext)
    with Machine.from_snapshot(lazy, kvm=kvm) as r:
        assert r.run(timeout=10).kind == "sync"
    for off, n, _ in (ext[0], ext[len(ext) // 2], ext[-1]):
        at = snap.sections["mem.0"].offset + off + n - 1
        bad = _corrupt(tmp_path, path, lambda d: d.__setitem__(at, d[at] ^ 0x80))
        lazy = snapshot.load(str(bad), check_memory=False)  # the flip is not looked at here
        fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(SnapshotError, match=f"0x{off:x}..\\+0x{n:x} fails its checksum"):
            Machine.from_snapshot(lazy, kvm=kvm)
        assert len(os.listdir("/proc/self/fd")) == fds  # the VM is gone


@pytest.mark.kvm
def test_compat_and_restore_agree_on_the_tsc_rate(tmp_path, kvm):
    """A snapshot whose TSC rate is 100 ppm off this host's restores (KVM takes it without scaling);
    1000 ppm off restores only where KVM can scale the TSC. `vmm compat --host here`, the restore's
    host check and `vmm restore` give the same verdict."""
    from vmm._bindings import lib
    control = kvm.check_extension(lib.KVM_CAP_TSC_CONTROL)
    with Machine("sync", kvm=kvm) as m:
        m.run(timeout=5)
        s = state.save_state(m.vcpu)
        host = s.tsc_khz
        for ppm in (100, 1000):
            s.tsc_khz = host + host * ppm // 1_000_000
            snapshot.save(str(tmp_path / f"{ppm}.snap"), kvm, m.vm, m.vcpus, [s], guest={"name": "sync"})
    for ppm in (100, 1000):
        path = str(tmp_path / f"{ppm}.snap")
        ok = ppm == 100 or bool(control)
        problems = snapshot.host_problems(snapshot.load(path), kvm)
        assert (problems == []) == ok, problems
        c = vmm("compat", path, "--host", "here")
        assert c.returncode == (0 if ok else 1), c.stdout + c.stderr
        r = vmm("restore", path)
        assert (r.returncode == 0) == ok, r.stdout + r.stderr
        if not ok:
            assert f"+{ppm} ppm, beyond KVM's 250 ppm tolerance" in c.stdout
            assert f"+{ppm} ppm, beyond KVM's 250 ppm tolerance" in r.stderr
