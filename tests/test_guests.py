"""The built-in guests, run on real KVM: each test reads as guest story + host checks."""

import struct

import pytest

import xstate_guest as xg

from vmm.errors import GuestError
from vmm.guest import catalog, runtime
from vmm.guest.runner import Done, Fault, InternalError, Mmio, Shutdown, Sync, Timeout
from vmm.kvm import is_pvm


def test_hello_prints_and_is_done(machine):
    m = machine("hello")
    ev = m.run(timeout=5)
    assert isinstance(ev, Done), ev
    assert m.console == "Hello from a vmm guest!\n"


def test_sync_values_reach_the_host_in_order(machine):
    m = machine("sync")
    values = []
    while isinstance(ev := m.run(timeout=5), Sync):
        values.append(ev.value)
        assert m.vcpu.get_sregs().cpl == 3  # the payload really runs at CPL3
    assert values == [0x11, 0x22, 0x33]
    assert isinstance(ev, Done)


def test_ud2_is_reported_with_the_faulting_rip(machine):
    m = machine("ud2")
    ev = m.run(timeout=5)
    assert isinstance(ev, Fault) and ev.name == "#UD"
    assert ev.rip == m.image.symbols["ud2_here"]
    assert ev.cs & 3 == 3
    assert str(ev) == f"fault #UD at 0x{ev.rip:x} (cpl 3)"


def test_triple_fault_is_a_shutdown(machine):
    ev = machine("triple-fault").run(timeout=5)
    assert isinstance(ev, Shutdown), ev


def test_spin_stops_at_the_timeout(machine):
    ev = machine("spin").run(timeout=0.5)
    assert isinstance(ev, Timeout)
    assert 0.5 <= ev.seconds < 1.5
    assert runtime.PAYLOAD_BASE <= ev.rip < runtime.PAYLOAD_BASE + 16


def test_checkpoint_guest_fills_what_this_vcpu_has_at_cpl3(machine):
    """The checkpoint guest reports (SYNC value) the XSAVE components it filled: those of the XCR0
    vmm gave it that CPL3 can write; its vector patterns are in the vCPU's XSAVE state."""
    m = machine("checkpoint")
    ev = m.run(timeout=10)
    assert isinstance(ev, Sync), ev
    xg.check_mask(ev.value, m.xcr0)
    assert m.vcpu.get_sregs().cpl == 3
    xs = m.vcpu.get_xsave()
    lo, hi = struct.unpack_from("<QQ", xs, 160 + 16 * 4)  # XMM4 at legacy offset 160 + 16 * 4
    assert (lo, hi) == (0xA5A5000000000000 | 4 << 8 | 0, 0xA5A5000000000000 | 4 << 8 | 1)
    assert isinstance(m.run(timeout=10), Done)


def test_a_guest_needing_what_the_host_lacks_is_refused_before_its_vm(machine, kvm):
    img = catalog.load("avx512")
    assert [str(r) for r in img.requires] == ["AVX512F (XCR0 0xe0)"]
    supported = kvm.get_supported_cpuid().xcr0_supported()
    if supported & 0xE0 == 0xE0:
        assert img.missing(supported) == []
        img.requires = (catalog.Requirement("NOT_HERE", 1 << 62),)  # a component no host has
    else:
        assert img.missing(supported) == list(img.requires)
    with pytest.raises(GuestError, match=f"needs .*; this host's KVM supports XCR0 {supported:#x}"):
        machine(img)


def test_avx512_guest_syncs_at_cpl3_with_its_patterns(machine, kvm):
    from conftest import needs_xcr0
    needs_xcr0(kvm, "AVX512F", 0xE0)
    m = machine("avx512")
    ev = m.run(timeout=10)
    assert isinstance(ev, Sync) and ev.value == 1
    assert m.vcpu.get_sregs().cpl == 3
    # the pattern is in the vCPU's XSAVE state: XMM4 (low 128 bits of ZMM4) at legacy offset 160+16*4
    xs = m.vcpu.get_xsave()
    lo, hi = struct.unpack_from("<QQ", xs, 160 + 16 * 4)
    assert (lo, hi) == (0xA5A5000000000000 | 4 << 8 | 0, 0xA5A5000000000000 | 4 << 8 | 1)
    assert isinstance(m.run(timeout=10), Sync)
    assert isinstance(m.run(timeout=10), Done)


def test_cpl0_payload(machine):
    """At CPL0 integer code runs everywhere (emulated on PVM). The checkpoint guest's XGETBV and
    vector instructions at CPL0 are an emulation failure on PVM, reported with the instruction and
    a hint to use CPL3; where CPL0 runs natively it fills and checks its state as at CPL3."""
    m = machine("sync", cpl=0)
    assert isinstance(m.run(timeout=10), Sync)
    assert m.vcpu.get_sregs().cpl == 0
    m = machine("checkpoint", cpl=0)
    ev = m.run(timeout=30)
    if is_pvm():
        assert isinstance(ev, InternalError), ev
        assert "CPL3" in ev.hint and ev.insn
    else:
        assert isinstance(ev, Sync), ev
        xg.check_mask(ev.value, m.xcr0)
        assert isinstance(m.run(timeout=30), Done)


def test_bad_guests_are_clear_errors(machine, tmp_path):
    with pytest.raises(GuestError, match="unknown guest 'nope'"):
        catalog.load("nope")
    with pytest.raises(GuestError, match="no such file"):
        catalog.load(str(tmp_path / "missing.bin"))
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x90" * (3 << 20))
    with pytest.raises(GuestError, match="larger than"):
        machine(str(big))


def test_mmio_to_unbacked_memory_is_reported(machine):
    m = machine("mmio")
    ev = m.run(timeout=5)
    assert isinstance(ev, Mmio), ev
    assert (ev.address, ev.is_write, ev.len, ev.data) == (0xD0000000, True, 4, 0x1234ABCD)
    # KVM completes an MMIO write before it exits: RIP is already past the 6-byte `movl $imm, (%rdi)`
    assert ev.rip == m.image.symbols["mmio_store"] + 6


def test_an_xcr0_asked_for_is_the_one_the_guest_gets(machine):
    """--xcr0 x87|SSE: the guest CPUID gets CPUID.1:ECX.XSAVE (KVM needs it for CR4.OSXSAVE and
    XCR0) even where KVM_GET_SUPPORTED_CPUID does not list it, so XCR0 is 0x3, not KVM's reset 0x1;
    the checkpoint guest fills exactly x87 and SSE."""
    m = machine("checkpoint", xcr0=0x3)
    assert m.cpuid.has("XSAVE") and m.vcpu.get_xcrs()[0] == 0x3
    ev = m.run(timeout=10)
    assert isinstance(ev, Sync) and ev.value == 0x3, ev
    assert isinstance(m.run(timeout=10), Done)


def test_a_guest_its_host_must_drive_is_not_run_alone():
    """xcr0 and msr-access wait at each SYNC for a value from their host (vmm probe drives them):
    `vmm run` refuses them in one line naming what drives them, instead of looping to the timeout."""
    import subprocess
    import sys
    for name, driver in catalog.DRIVERS.items():
        assert catalog.load(name).driver == driver
        r = subprocess.run([sys.executable, "-m", "vmm.cli", "run", name], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.strip().endswith(f"run it through `{driver}`") and len(r.stderr.splitlines()) == 1
