"""vCPU state save/restore on real KVM: exact round trips, feature gating, and why the order matters."""

import struct

import pytest

from vmm import msr_features, state
from vmm.errors import StateError
from vmm.guest.machine import Machine
from vmm.guest.runner import Done, Fail, Sync

MSR_TSC, MSR_TSC_DEADLINE = 0x10, 0x6E0
APIC_SVR, APIC_LVTT = 0xF0, 0x320
LVT_TIMER_TSC_DEADLINE = 2 << 17


def test_checkpoint_survives_save_and_restore_into_a_new_vm(machine):
    """Guest fills registers and memory, SYNCs; the host moves it into a fresh VM; the guest checks
    everything there and reports DONE (or FAIL naming the register)."""
    src = machine("checkpoint")
    assert isinstance(src.run(timeout=10), Sync)
    saved = state.save_state(src.vcpu)
    dst = machine("hello")  # a different guest: everything must come from the saved state
    dst.vm.write(0, src.vm.read(0, src.memory.size))
    state.restore_state(dst.vcpu, saved)
    assert dst.vcpu.get_xsave() == saved.xsave  # byte for byte
    assert dst.vcpu.get_regs() == saved.regs
    ev = dst.run(timeout=10)
    assert isinstance(ev, Done), f"{ev} (FAIL codes in guests/checkpoint.S)"


def _xcr0_steps(supported):
    """x87|SSE, then each group of XSAVE components the host has added in turn: +AVX, +AVX-512,
    +PKRU, +AMX (groups that must be enabled together, SDM vol. 1 13.3)."""
    steps, xcr0 = [0x3], 0x3
    for group in (0x4, 0xE0, 0x200, 0x60000):
        if supported & group == group and (group != 0xE0 or xcr0 & 0x4):
            xcr0 |= group
            steps.append(xcr0)
    return steps


def test_checkpoint_survives_save_and_restore_for_every_xcr0_the_host_supports(machine, kvm):
    """For each guest XCR0 this host supports (x87|SSE, +AVX, +AVX-512, +PKRU where present): a
    guest CPUID for it, the checkpoint guest fills what it enables (its SYNC says which), and the
    state moved into a new VM is what the guest finds there (DONE)."""
    import xstate_guest as xg
    from vmm.xsave import XsaveArea, XsaveLayout
    supported = kvm.get_supported_cpuid()
    layout = XsaveLayout.from_cpuid(supported)
    steps = _xcr0_steps(supported.xcr0_supported() & ~0x60000)  # AMX needs the permission: test_amx
    assert steps[0] == 0x3 and len(steps) >= 2, steps  # every x86-64 host with XSAVE has AVX
    for xcr0 in steps:
        cpuid = supported.guest_for_xcr0(xcr0).with_xsave_enabled()
        src = machine("checkpoint", cpuid=cpuid, xcr0=xcr0)
        ev = src.run(timeout=10)
        assert isinstance(ev, Sync), (hex(xcr0), ev)
        xg.check_mask(ev.value, xcr0)
        saved = state.save_state(src.vcpu)
        xg.assert_filled(XsaveArea.parse(saved.xsave, layout), ev.value)
        dst = machine("hello")
        dst.vm.write(0, src.vm.read(0, src.memory.size))
        state.restore_state(dst.vcpu, saved)
        assert dst.vcpu.get_xsave() == saved.xsave, hex(xcr0)
        assert dst.vcpu.get_xcrs()[0] == xcr0
        ev = dst.run(timeout=10)
        assert isinstance(ev, Done), (hex(xcr0), ev)


def test_checkpoint_detects_a_corrupted_register(machine):
    """The guest's own check is real: flip one bit of XMM7 through the XSAVE area and it fails."""
    m = machine("checkpoint")
    m.run(timeout=10)
    xs = bytearray(m.vcpu.get_xsave())
    xs[160 + 16 * 7] ^= 1  # XMM7: the guest fills SSE state on every x86-64 host
    m.vcpu.set_xsave(bytes(xs))
    ev = m.run(timeout=10)
    assert isinstance(ev, Fail) and ev.code == 0x207


def test_state_json_round_trip(machine):
    m = machine("checkpoint")
    m.run(timeout=10)
    s = state.save_state(m.vcpu)
    assert state.VcpuState.from_json(s.to_json()) == s
    with pytest.raises(StateError, match="malformed"):
        state.VcpuState.from_json({"regs": {}})


def test_feature_gated_msrs_follow_guest_cpuid(machine, kvm):
    """XFD/XFD_ERR (and XSS, CET, TSC_AUX) are saved only when the guest CPUID has the feature;
    restore refuses state that carries them for a guest without it."""
    from vmm.guest.machine import default_guest_cpuid
    without = default_guest_cpuid(kvm)  # ordinary KVM gives RDTSCP by default, PVM here does not
    for f in ("RDTSCP", "RDPID", "XFD"):
        without.set_feature(f, False)
    m = machine("sync", cpuid=without)
    m.run(timeout=5)
    assert not m.cpuid.has("XFD") and not m.cpuid.has("RDTSCP")
    s = state.save_state(m.vcpu)
    gated = {i for i in s.msrs if i in state.FEATURE_GATED_MSRS}
    assert all(msr_features.given(i, m.cpuid) for i in gated)  # only what the guest CPUID gives
    assert state.MSR_TSC_AUX not in s.msrs and state.MSR_IA32_XFD not in s.msrs

    with_rdtscp = default_guest_cpuid(kvm)
    with_rdtscp.set_feature("RDTSCP")  # TSC_AUX exists for this guest
    m2 = machine("sync", cpuid=with_rdtscp)
    m2.run(timeout=5)
    m2.vcpu.set_msrs({state.MSR_TSC_AUX: 7})
    s2 = state.save_state(m2.vcpu)
    assert {i for i in s2.msrs if i in state.FEATURE_GATED_MSRS} - gated == {state.MSR_TSC_AUX}
    assert s2.msrs[state.MSR_TSC_AUX] == 7

    s.msrs[state.MSR_IA32_XFD] = 0
    with pytest.raises(StateError, match=r"0x1c4 \(XFD\)"):
        state.restore_state(machine("sync").vcpu, s)


def test_save_completes_pending_io(machine):
    """A vCPU stopped on an `in` (the console LSR read) has its I/O completed by save: RIP is then
    past the instruction, so the restored guest does not repeat it."""
    from vmm._bindings import lib
    m = machine("hello")
    reason = m.vcpu.run()  # hello's first exit is the LSR read before its first character
    assert reason == lib.KVM_EXIT_IO and m.vcpu.kvm_run.io.port == 0x3FD
    rip_at_exit = m.vcpu.get_regs().rip  # still at the `in`: KVM completes it on the next entry
    s = state.save_state(m.vcpu)
    assert s.regs.rip == rip_at_exit + 1  # `in %dx, %al` is one byte


def _arm_tsc_deadline(vcpu):
    lapic = bytearray(vcpu.get_lapic())
    struct.pack_into("<I", lapic, APIC_SVR, struct.unpack_from("<I", lapic, APIC_SVR)[0] | 0x100)
    struct.pack_into("<I", lapic, APIC_LVTT, LVT_TIMER_TSC_DEADLINE | 0xEC)
    vcpu.set_lapic(bytes(lapic))
    deadline = vcpu.get_msrs([MSR_TSC])[MSR_TSC] + 10**13  # hours away: it must not fire
    vcpu.set_msrs({MSR_TSC_DEADLINE: deadline})
    return deadline


def test_tsc_deadline_survives_only_with_the_lapic_restored_first(kvm):
    """KVM drops a write of MSR_IA32_TSC_DEADLINE while the LAPIC timer is not in TSC-deadline mode.
    Restoring MSRs before the LAPIC therefore loses an armed deadline; our order keeps it."""
    from vmm.guest.machine import default_guest_cpuid
    # the guest has the timer: KVM_GET_SUPPORTED_CPUID leaves the bit out on ordinary KVM (userspace
    # sets it where KVM_CAP_TSC_DEADLINE_TIMER says so, Documentation/virt/kvm/api.rst), and without it
    # KVM masks the LVTT's TSC-deadline mode away
    assert kvm.check_extension("KVM_CAP_TSC_DEADLINE_TIMER")
    cpuid = default_guest_cpuid(kvm)
    cpuid.set_feature("TSC_DEADLINE")
    with Machine("sync", kvm=kvm, cpuid=cpuid) as src:
        src.run(timeout=5)
        deadline = _arm_tsc_deadline(src.vcpu)
        assert src.vcpu.get_msrs([MSR_TSC_DEADLINE])[MSR_TSC_DEADLINE] == deadline
        s = state.save_state(src.vcpu)
    assert s.msrs[MSR_TSC_DEADLINE] == deadline and list(s.msrs)[-1] == MSR_TSC_DEADLINE

    wrong = ("cpuid", "sregs", "msrs", "lapic", "xcrs", "xsave", "events", "mp_state",
             "debugregs", "regs")
    with Machine("sync", kvm=kvm, cpuid=cpuid) as dst:
        state.restore_state(dst.vcpu, s, order=wrong)
        assert dst.vcpu.get_msrs([MSR_TSC_DEADLINE])[MSR_TSC_DEADLINE] == 0  # lost
    with Machine("sync", kvm=kvm, cpuid=cpuid) as dst:
        state.restore_state(dst.vcpu, s)
        assert dst.vcpu.get_msrs([MSR_TSC_DEADLINE])[MSR_TSC_DEADLINE] == deadline


def test_xsave_size_follows_the_process_not_the_guest(machine):
    """The buffer size is the process's (KVM_CAP_XSAVE2 grows with the AMX permission): zeros beyond
    this vCPU's size are cut or added on restore, real state there is refused before any ioctl."""
    m = machine("checkpoint")
    m.run(timeout=10)
    s = state.save_state(m.vcpu)
    assert state.fit_xsave(s.xsave[:3000], 4096) == s.xsave[:3000] + bytes(1096)
    s.xsave = s.xsave + bytes(4096)  # as saved by a process with the AMX permission
    dst = machine("hello")
    dst.vm.write(0, m.vm.read(0, m.memory.size))
    state.restore_state(dst.vcpu, s)
    assert dst.vcpu.get_xsave() == s.xsave[:4096]
    assert isinstance(dst.run(timeout=10), Done)

    s.xsave = s.xsave[:4096] + b"\x01" + bytes(4095)  # tile data this process may not have
    before = m.vcpu.get_regs()
    with pytest.raises(StateError, match="state beyond byte 4096"):
        state.restore_state(m.vcpu, s)
    assert m.vcpu.get_regs() == before


def test_tsc_rate_within_kvm_tolerance_restores_beyond_it_needs_scaling(machine, kvm):
    """A state whose TSC rate is 100 ppm off this host's restores: KVM_SET_TSC_KHZ takes rates within
    250 ppm without scaling. 1000 ppm off restores only where KVM can scale the TSC
    (KVM_CAP_TSC_CONTROL); elsewhere it is refused, with the reason, before KVM_SET_TSC_KHZ."""
    from vmm._bindings import lib
    from vmm.tsc import rate_problem, within_tolerance
    src = machine("sync")
    src.run(timeout=5)
    saved = state.save_state(src.vcpu)
    host = saved.tsc_khz
    assert host > 0
    near, far = host + host // 10_000, host + host // 1_000  # +100 ppm, +1000 ppm
    assert within_tolerance(near, host) and not within_tolerance(far, host)
    control = kvm.check_extension(lib.KVM_CAP_TSC_CONTROL)

    saved.tsc_khz = near
    dst = machine("sync")
    state.restore_state(dst.vcpu, saved)
    assert dst.vcpu.get_tsc_khz() == near

    saved.tsc_khz = far
    dst = machine("sync")
    if control:
        state.restore_state(dst.vcpu, saved)
        assert dst.vcpu.get_tsc_khz() == far
    else:
        assert rate_problem(far, host, control)
        with pytest.raises(StateError, match=r"\+1000 ppm, beyond KVM's 250 ppm tolerance"):
            state.restore_state(dst.vcpu, saved)
        assert dst.vcpu.get_tsc_khz() == host


def _by_ioctl(vcpu, cpuid, msr_indices):
    """The state read piece by piece, one ioctl each, as save_state read it before it used the C
    plan (after the KVM_RUN that completes pending I/O)."""
    msrs = vcpu.get_msrs(msr_indices)
    if MSR_TSC_DEADLINE in msrs:
        msrs[MSR_TSC_DEADLINE] = msrs.pop(MSR_TSC_DEADLINE)
    return state.VcpuState(cpuid=cpuid, mp_state=vcpu.get_mp_state(), regs=vcpu.get_regs(),
                           sregs=vcpu.get_sregs(), xsave=vcpu.get_xsave(), xcrs=vcpu.get_xcrs(), msrs=msrs,
                           events=vcpu.get_vcpu_events(), debugregs=vcpu.get_debugregs(),
                           lapic=vcpu.get_lapic() if vcpu.vm.has_irqchip else None, tsc_khz=vcpu.tsc_khz())


def _same_but_tsc(a, b):
    ma, mb = dict(a.msrs), dict(b.msrs)
    assert list(ma) == list(mb)
    ta, tb = ma.pop(MSR_TSC), mb.pop(MSR_TSC)
    assert abs(ta - tb) < 10 * 10**9 and ma == mb
    for f in ("cpuid", "mp_state", "regs", "sregs", "xsave", "xcrs", "events", "debugregs", "lapic", "tsc_khz",
              "cpuid_kvm"):
        assert getattr(a, f) == getattr(b, f), f


def test_save_state_reads_what_one_ioctl_per_piece_reads(machine):
    """save_state (the C plan, pieces decoded on first access) gives, byte for byte, the state the
    per-piece ioctls read; its JSON round trip is equal; nothing is decoded before it is read."""
    m = machine("sync")
    assert m.run(timeout=5) == Sync(0, 0x11)
    s = state.save_state(m.vcpu)
    assert not {"regs", "sregs", "xsave", "msrs", "xcrs", "events"} & set(vars(s))  # lazy so far
    direct = _by_ioctl(m.vcpu, m.vcpu.cpuid, list(s.msrs))
    _same_but_tsc(s, direct)
    assert s.regs.rax == 0x11 and s.xsave == direct.xsave and len(s.xsave) == m.vcpu.xsave_size()
    assert state.VcpuState.from_json(s.to_json()) == s
    again = state.save_state(m.vcpu, list(s.msrs))
    _same_but_tsc(again, s)


def test_restore_state_from_buffers_and_from_typed_values_agree(machine):
    """A state nobody decoded is restored from its own buffers; one whose pieces were read (or
    changed) is restored from the typed values. Both leave KVM holding the state; a changed
    register is what KVM then reports; the guest runs on from the restored point."""
    m = machine("sync")
    assert m.run(timeout=5) == Sync(0, 0x11)
    untouched = state.save_state(m.vcpu)
    decoded = state.VcpuState.from_json(untouched.to_json())
    assert m.run(timeout=5) == Sync(0, 0x22)
    state.restore_state(m.vcpu, untouched)
    after = _by_ioctl(m.vcpu, m.vcpu.cpuid, list(decoded.msrs))
    _same_but_tsc(after, decoded)
    assert [m.run(timeout=5) for _ in range(3)] == [Sync(0, 0x22), Sync(0, 0x33), Done(0)]
    decoded.regs.rbx = 0x5A5A
    state.restore_state(m.vcpu, decoded)
    assert m.vcpu.get_regs() == decoded.regs and m.vcpu.get_regs().rbx == 0x5A5A
    changed = state.save_state(m.vcpu)
    changed.regs.rcx = 0xC0FFEE  # decoded, then changed: restored from the typed values
    state.restore_state(m.vcpu, changed)
    assert m.vcpu.get_regs().rcx == 0xC0FFEE


def test_restore_state_checks_everything_before_any_ioctl(machine):
    """A bad XSAVE image or a stray gated MSR is refused before KVM sees anything: the vCPU keeps
    its registers."""
    m = machine("sync")
    assert m.run(timeout=5) == Sync(0, 0x11)
    good = state.save_state(m.vcpu)
    bad = state.VcpuState.from_json(good.to_json())
    bad.regs.rax = 0xBAD
    xs = bytearray(bad.xsave)
    xs[520] = 1  # XCOMP_BV: KVM_SET_XSAVE takes the standard format only
    bad.xsave = bytes(xs)
    from vmm.xsave import XsaveError
    with pytest.raises(XsaveError, match="XCOMP_BV"):
        state.restore_state(m.vcpu, bad)
    stray = state.VcpuState.from_json(good.to_json())
    stray.regs.rax = 0xBAD
    stray.msrs[state.MSR_IA32_XFD] = 0
    with pytest.raises(StateError, match="0x1c4"):
        state.restore_state(m.vcpu, stray)
    assert m.vcpu.get_regs().rax == 0x11
