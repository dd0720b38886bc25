"""The probe checks derived from the Linux KVM selftests: for each, the test measures the same thing
again with vmm's own API (not the check's code) and fails if the check reports something else. The
expectation comes from this host (what KVM says it supports), never from a CPU model."""

import errno

import pytest

from vmm import probe
from vmm._bindings import ffi, ioctl
from vmm.cpuid import CpuidTable
from vmm.errors import KvmError
from vmm.guest.machine import Machine, default_guest_cpuid
from vmm.guest.runner import Done, Fault, Sync

pytestmark = pytest.mark.kvm  # (the two offline tests need no KVM but cost nothing)

NEW = {
    "sync_regs_invalid_bits", "sync_regs_round_trip", "userspace_io_rep_ins", "vcpu_cpuid_matches_supported",
    "get_cpuid2_e2big", "set_cpuid2_after_run", "supported_xcr0_dependencies", "guest_initial_xcr0",
    "xsetbv_unsupported_gp", "xss_reset_and_save_list", "feature_msrs_reset", "hwcr_bits",
    "msrs_reset_write_read", "one_reg_agrees_with_msrs", "xsave_image_loads_anywhere", "amx_tiles_xfd_and_restore",
    "msrs_guest_access", "msr_list_matches_cpuid",
}


@pytest.fixture(scope="module")
def res(kvm):
    return {r["name"]: r for r in probe.run_checks(names=sorted(NEW))}


def test_every_new_check_names_its_selftest_and_ends_as_upstream_differs_with_a_reason_or_skipped(res):
    for name in NEW:
        c = res[name]
        assert probe.get_check(name).selftest and c["selftest"] == probe.get_check(name).selftest
        assert c["status"] in ("as-upstream", "differs", "skipped"), c
        if c["status"] == "as-upstream":  # the observed value is the upstream one wherever one is given
            assert c["upstream"]["value"] is None or c["observed"]["value"] == c["upstream"]["value"], c
        if c["status"] == "differs":
            assert c["observed"]["value"] != c["upstream"]["value"], c


def test_sync_regs_invalid_bits(res, kvm):
    c = res["sync_regs_invalid_bits"]
    with Machine("sync", kvm=kvm) as m:
        m.vcpu.kvm_run.kvm_dirty_regs = 1 << 31
        try:
            m.vcpu.run()
            seen = "0"
        except KvmError as e:
            seen = errno.errorcode[e.errno]
    assert c["observed"]["value"]["kvm_dirty_regs=0x80000000"].startswith(seen)
    assert (c["status"] == "as-upstream") == all(v == "EINVAL" for v in c["observed"]["value"].values())


def test_sync_regs_round_trip(res, kvm):
    from vmm._bindings import lib
    with Machine("sync", kvm=kvm) as m:
        run = m.vcpu.kvm_run
        run.kvm_valid_regs = lib.KVM_SYNC_X86_REGS  # the area holds the registers at the exit...
        assert isinstance(m.run(timeout=2), Sync)
        run.kvm_dirty_regs = lib.KVM_SYNC_X86_REGS  # ...and they all go back in, with rbx changed
        run.s.regs.regs.rbx = 0x5EED
        assert isinstance(m.run(timeout=2), Sync)
        written = m.vcpu.get_regs().rbx == 0x5EED
    c = res["sync_regs_round_trip"]
    assert c["observed"]["value"]["dirty REGS: rbx reaches the vCPU"] == written
    assert (c["status"] == "as-upstream") == all(c["observed"]["value"].values())


def test_userspace_io_rep_ins(res, kvm):
    from vmm._bindings import lib
    total = []

    def handler(io, data):
        if io.direction == lib.KVM_EXIT_IO_IN:
            total.append(io.count)
            ffi.buffer(data, io.count)[:] = b"\xaa" * io.count
    with Machine("rep-ins", kvm=kvm) as m:
        m.runner.serve_port_in(0x80, handler)
        events = [m.run(timeout=2) for _ in range(5)]
    syncs = [e.value for e in events if isinstance(e, Sync)]
    assert isinstance(events[-1], Done)
    c = res["userspace_io_rep_ins"]
    assert c["observed"]["value"] == {"bytes_in_exits": sum(total), "rcx_left": syncs[1], "rdi_advanced": syncs[2],
                                      "filled": syncs[3]}
    assert (c["status"] == "as-upstream") == (syncs[1:] == [0, 8192, 8192] and sum(total) == 8192)


def test_vcpu_cpuid_matches_supported(res, kvm):
    given = kvm.get_supported_cpuid()
    with kvm.create_vm() as vm:
        v = vm.create_vcpu()
        v.set_cpuid2(given)
        held = v.get_cpuid2()
    # leaves whose non-run-time bits changed: OSXSAVE, OSPKE and CPUID.(0DH,0/1).EBX excluded
    a = {(e.function, e.index): e for e in given}
    b = {(e.function, e.index): e for e in held}
    changed = set(a) ^ set(b)
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        ecx_mask = ~(1 << 27) if k[0] == 1 else ~(1 << 4) if k == (7, 0) else ~0
        ebx_mask = 0 if k[0] == 0xD and k[1] < 2 else ~0
        if ((x.eax, x.ebx & ebx_mask, x.ecx & ecx_mask, x.edx)
                != (y.eax, y.ebx & ebx_mask, y.ecx & ecx_mask, y.edx)):
            changed.add(k)
    c = res["vcpu_cpuid_matches_supported"]
    assert len(c["observed"]["value"]) == len(changed)
    assert (c["status"] == "as-upstream") == (not changed)


def test_get_cpuid2_e2big(res, kvm):
    table = default_guest_cpuid(kvm)
    with kvm.create_vm() as vm:
        v = vm.create_vcpu()
        v.set_cpuid2(table)
        big = ffi.new("struct kvm_cpuid2 *", {"nent": len(table) + 1, "entries": len(table) + 1})
        ioctl(v.fd, "KVM_GET_CPUID2", big)
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": 1, "entries": 1})
        with pytest.raises(KvmError) as e:
            ioctl(v.fd, "KVM_GET_CPUID2", buf)
    kept = e.value.errno == errno.E2BIG and buf.nent == 1
    c = res["get_cpuid2_e2big"]
    if big.nent == len(table) + 1:  # the old ABI (Linux 6.1): nent untouched on success
        assert c["status"] == "skipped" and "not in this kernel" in c["verdict"]
        return
    assert kept == (not any(w[0] == 1 for w in c["observed"]["value"]["wrong"]))


def test_set_cpuid2_after_run(res, kvm):
    table = default_guest_cpuid(kvm)
    with Machine("sync", kvm=kvm, cpuid=table) as m:
        assert isinstance(m.run(timeout=2), Sync)
        try:
            m.vcpu.set_cpuid2(table.with_apic_id(0))
            same = "0"
        except KvmError as e:
            same = errno.errorcode[e.errno]
    c = res["set_cpuid2_after_run"]
    assert c["observed"]["value"]["the same table"] == same
    if same != "0":
        assert c["status"] == "differs"


def test_supported_xcr0_dependencies(res, kvm):
    x = kvm.get_supported_cpuid().xcr0_supported()
    holds = ((not x >> 2 & 1 or x & 0x2)  # YMM needs SSE
             and x & 0x18 in (0, 0x18)  # MPX all or none
             and x & 0xE0 in (0, 0xE0) and (not x & 0xE0 or x & 0x6 == 0x6)  # AVX-512
             and x & (3 << 17) in (0, 3 << 17))  # AMX
    c = res["supported_xcr0_dependencies"]
    assert (c["status"] == "as-upstream") == bool(holds) and (c["observed"]["value"] == []) == bool(holds)


def test_guest_initial_xcr0(res, kvm):
    table = default_guest_cpuid(kvm)
    with Machine("xcr0", kvm=kvm, cpuid=table) as m:
        ev = m.run(timeout=2)
    c = res["guest_initial_xcr0"]
    assert isinstance(ev, Sync) and c["observed"]["value"] == ev.value
    assert (c["status"] == "as-upstream") == (ev.value == table.xcr0_supported() & 0xFFFFFFFF)


def test_xsetbv_unsupported_gp(res, kvm):
    table = default_guest_cpuid(kvm)
    xcr0 = table.xcr0_supported()
    bit = next(i for i in range(64) if not xcr0 >> i & 1)
    with Machine("xcr0", kvm=kvm, cpuid=table) as m:
        assert isinstance(m.run(timeout=2), Sync) and m.run(timeout=2) == Sync(0, 0x100)
        r = m.vcpu.get_regs()
        r.rbx = xcr0 | 1 << bit
        m.vcpu.set_regs(r)
        ev = m.run(timeout=2)
    seen = ev.name if isinstance(ev, Fault) else "0" if isinstance(ev, Sync) else str(ev)
    c = res["xsetbv_unsupported_gp"]
    assert c["observed"]["value"][f"+ bit {bit}"] == seen
    want = {k: "0" if k in ("x87 only", "the supported XCR0") else "#GP" for k in c["observed"]["value"]}
    assert (c["status"] == "as-upstream") == (c["observed"]["value"] == want)


def test_xss_reset_and_save_list(res, kvm):
    c = res["xss_reset_and_save_list"]
    if not kvm.get_supported_cpuid().has("XSAVES"):
        assert c["status"] == "skipped" and "XSAVES" in c["verdict"]
        return
    with kvm.create_vm() as vm:
        v = vm.create_vcpu()
        v.set_cpuid2(default_guest_cpuid(kvm))
        assert c["observed"]["value"]["reset"] == v.get_msrs([0xDA0])[0xDA0]
    assert c["observed"]["value"]["in_save_list"] == (0xDA0 in kvm.get_msr_index_list())


def test_feature_msrs_reset(res, kvm):
    c = res["feature_msrs_reset"]
    rows = {int(r["index"], 16): r for r in c["details"]["msrs"]}
    with kvm.create_vm() as vm:
        v = vm.create_vcpu()
        v.set_cpuid2(default_guest_cpuid(kvm))
        for i, r in rows.items():
            assert r["reset"] == hex(v.get_msrs([i])[i])
    assert c["observed"]["value"] == sum(1 for r in rows.values() if r["reset"] != r["expected"]
                                         or r["set_supported"] is False)


def test_hwcr_bits(res, kvm):
    with kvm.create_vm() as vm:
        v = vm.create_vcpu()
        v.set_cpuid2(default_guest_cpuid(kvm))
        v.set_msrs({0xC0010015: 1 << 18})
        kept = v.get_msrs([0xC0010015])[0xC0010015] == 1 << 18
        with pytest.raises(KvmError):
            v.set_msrs({0xC0010015: 1 << 0})
        v.set_msrs({0xC0010015: 0})
        stuck = v.get_msrs([0xC0010015])[0xC0010015] != 0
    c = res["hwcr_bits"]
    if stuck:  # McStatusWrEn cannot be cleared once set: a kernel before 6.6
        assert c["status"] == "skipped" and "not in this kernel" in c["verdict"]
        return
    assert (18 not in c["observed"]["value"]) == kept


def test_msrs_reset_write_read(res, kvm):
    with kvm.create_vm() as vm:
        v = vm.create_vcpu()
        v.set_cpuid2(default_guest_cpuid(kvm))
        try:
            v.set_msrs({0xC0000082: 1 << 56})  # LSTAR, non-canonical
            refused = False
        except KvmError:
            refused = True
    c = res["msrs_reset_write_read"]
    lstar = next(r for r in c["details"]["msrs"] if r["msr"] == "LSTAR")
    assert lstar["invalid_refused"] == refused
    assert ("LSTAR" in c["observed"]["value"]) == (not refused or lstar["reset"] != 0 or not lstar["read_back"])


def test_one_reg_agrees_with_msrs(res, kvm):
    from vmm.regs import msr
    c = res["one_reg_agrees_with_msrs"]
    with kvm.create_vm() as vm:
        v = vm.create_vcpu()
        v.set_cpuid2(default_guest_cpuid(kvm))
        v.set_msrs({0xC0000082: 0xFFFFFFFF81000000})
        try:
            same = v.get_one_reg(msr(0xC0000082)) == 0xFFFFFFFF81000000
        except KvmError as e:
            assert e.errno in (errno.EINVAL, errno.ENOTTY)
            assert c["status"] == "skipped" and "not in this kernel" in c["verdict"]
            return
    assert ("LSTAR" not in c["observed"]["value"]) == same


def test_xsave_image_loads_anywhere(res, kvm):
    c = res["xsave_image_loads_anywhere"]
    supported = kvm.get_supported_cpuid().xcr0_supported() & ~(3 << 17)
    with Machine("sync", kvm=kvm) as m:
        assert isinstance(m.run(timeout=2), Sync)
        image = bytearray(m.vcpu.get_xsave())
        image[512:520] = supported.to_bytes(8, "little")
        v = m.vm.create_vcpu()
        v.set_cpuid2(CpuidTable([]))
        try:
            probe.core.raw_set_xsave(v, bytes(image))
            seen = "0"
        except KvmError as e:
            seen = errno.errorcode[e.errno]
    assert c["observed"]["value"]["empty guest CPUID, XSTATE_BV = supported XCR0"] == seen
    assert len(c["observed"]["value"]) == 4 + bin(supported).count("1")


def test_amx_tiles_xfd_and_restore(res):
    """Skipped exactly where the host has no AMX; on AMX hosts (where tests/test_amx.py runs the same
    guest step by step) as upstream exactly when every step held."""
    from vmm import amx
    c = res["amx_tiles_xfd_and_restore"]
    assert c["process"] == "amx-guest"  # the permission request stays out of this process
    if not amx.get_xcomp_supp() >> amx.XFEATURE_XTILEDATA & 1:
        assert c["status"] == "skipped" and "no AMX" in c["verdict"]
    else:
        assert (c["status"] == "as-upstream") == all(c["observed"]["value"].values())


def test_msrs_guest_access(res, kvm):
    """One access measured again: the guest's WRMSR of a non-canonical LSTAR."""
    from vmm.guest.runtime import SCRATCH_BASE
    c = res["msrs_guest_access"]
    row = next(r for r in c["details"]["msrs"] if r["msr"] == "LSTAR")
    with Machine("msr-access", kvm=kvm) as m:
        assert m.run(timeout=2) == Sync(0, 0x100)
        r = m.vcpu.get_regs()
        r.rbx, r.r12, r.r13 = 0xC0000082, 1 << 56, 1
        m.vcpu.set_regs(r)
        ev = m.run(timeout=2)
    seen = [ev.name] if isinstance(ev, Fault) else "0"
    assert row["invalid"] == seen
    assert ("LSTAR" in c["observed"]["value"]) == (seen != ["#GP"] or not row["read_back"]
                                                    or row["after_invalid"] != hex(0xFFFFFFFF81000000))
    assert SCRATCH_BASE == 0x300000  # where the guest stores what RDMSR read (vmm.inc SCRATCH)


def test_msr_list_matches_cpuid(res, kvm):
    c = res["msr_list_matches_cpuid"]
    listed, supported = set(kvm.get_msr_index_list()), kvm.get_supported_cpuid()
    rows = {r["msr"].split("(")[-1].rstrip(")"): r for r in c["details"]["msrs"]}
    assert rows["LSTAR"]["listed"] == (0xC0000082 in listed) and rows["LSTAR"]["supported"] == supported.has("LM")
    aux = supported.has("RDTSCP") or supported.has("RDPID")
    assert rows["TSC_AUX"]["supported"] == aux and rows["TSC_AUX"]["listed"] == (0xC0000103 in listed)
    assert (c["status"] == "as-upstream") == all(r["listed"] == r["supported"] for r in rows.values())


def test_a_difference_names_the_platform_that_explains_it(tmp_path, monkeypatch):
    """PVM first; else a CPU emulated by QEMU TCG (nested KVM on these machines), read from the model name."""
    from types import SimpleNamespace
    from vmm.probe import core
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: QEMU TCG CPU version 2.5+\n")
    assert core.cpu_model(str(cpuinfo)) == "QEMU TCG CPU version 2.5+"
    assert core.cpu_model(str(tmp_path / "missing")) == ""
    monkeypatch.setattr(core, "cpu_model", lambda: "QEMU TCG CPU version 2.5+")
    assert "PVM" in core.pvm_note(SimpleNamespace(pvm=True))
    assert "TCG" in core.pvm_note(SimpleNamespace(pvm=False))
    monkeypatch.setattr(core, "cpu_model", lambda: "AMD EPYC 7B13 64-Core Processor")
    assert core.pvm_note(SimpleNamespace(pvm=False)) == ""


def test_the_cli_offers_the_probe_groups():
    """`vmm probe --group` lists the groups without importing vmm.probe (CLI start-up): the same tuple."""
    from vmm.commands.probe import PROBE_GROUPS
    assert PROBE_GROUPS == probe.GROUPS
