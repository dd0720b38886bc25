"""CPUID on real KVM: the supported table's leaf 0xD, the guest CPUID KVM holds after
KVM_SET_CPUID2 (kvm_pvm rewrites part of it), KVM_SET_CPUID2 after KVM_RUN, and `vmm cpuid`."""

import errno
import json
import subprocess
import sys

import pytest

from vmm.cpuid import CpuidTable
from vmm.errors import KvmError
from vmm.guest.runner import Done, Sync
from vmm.kvm import is_pvm
from vmm.xsave import XsaveLayout, kvm_xsave_size


def test_supported_leaf_d_agrees_with_the_layout_and_cap_xsave2(kvm):
    """KVM computes CPUID.(0DH,0).EBX/ECX and KVM_CAP_XSAVE2 from the sub-leaves it reports; the
    layout built from those sub-leaves gives the same numbers (Zen 4: XCR0 0xe7, 2432 bytes, cap 4096)."""
    supported = kvm.get_supported_cpuid()
    d0 = supported.entry(0xD, 0)
    layout = XsaveLayout.from_cpuid(supported)
    assert layout.standard_size() == d0.ecx == d0.ebx
    with kvm.create_vm() as vm:
        assert vm.xsave2_size() == kvm_xsave_size(layout) == max(4096, d0.ecx)


@pytest.mark.parametrize("hint", [None, 0, 1, 7, 500])
def test_get_cpuid2_returns_exactly_the_entries_kvm_holds_whatever_the_buffer(kvm, hint):
    """Linux 6.1 leaves kvm_cpuid2.nent as given after KVM_GET_CPUID2, so a larger buffer came back
    padded with zeroed entries (a duplicate leaf 0 sub-leaf 0, refused by CpuidTable). The table's
    size is found from E2BIG; every starting size gives the same entries, as many as were set."""
    from vmm.guest.machine import default_guest_cpuid
    from vmm.kvm import read_vcpu_cpuid2
    given = default_guest_cpuid(kvm)
    with kvm.create_vm() as vm:
        v = vm.create_vcpu()
        assert read_vcpu_cpuid2(v.fd, 3 if hint is None else hint) == []  # nothing set yet
        v.set_cpuid2(given)
        held = v.get_cpuid2() if hint is None else CpuidTable.from_kvm_entries(read_vcpu_cpuid2(v.fd, hint))
    assert len(held) == len(given)
    assert [(e.function, e.index) for e in held] == [(e.function, e.index) for e in given]


@pytest.mark.parametrize("xcr0", [0x3, 0x7, 0xE7])
def test_the_guest_leaf_d_kvm_holds(kvm, xcr0):
    """KVM_SET_CPUID2 with leaf 0xD limited to `xcr0`, then KVM_GET_CPUID2.
    Standard KVM holds the XCR0 mask it was given. kvm_pvm (this host) replaces leaves 1, 7 and
    0xD.0/0xD.1 with the host's own values (guest CPL3 code executes CPUID natively), so it holds
    the host's supported XCR0 mask whatever it was given. Leaves it leaves alone match."""
    supported = kvm.get_supported_cpuid()
    given = supported.guest_for_xcr0(xcr0 & supported.xcr0_supported())
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        vcpu.set_cpuid2(given)
        held = vcpu.get_cpuid2()
    assert held.entry(0) == given.entry(0)  # vendor and max leaf
    assert held.entry(0xD, 2) == given.entry(0xD, 2)  # the AVX sub-leaf
    if is_pvm():
        assert held.xcr0_supported() == supported.xcr0_supported()
        assert held.has("XSAVE") and held.has("AVX")
    else:
        assert held.xcr0_supported() == given.xcr0_supported()
        assert held.has("AVX") == given.has("AVX")


def test_set_cpuid2_after_run_accepts_only_the_held_table(kvm, machine):
    """Guest checkpoint runs to its SYNC. Then KVM_SET_CPUID2 must repeat exactly what KVM holds: a
    narrower table is EINVAL; the KVM_GET_CPUID2 table is accepted and the guest runs on. The
    table vmm first gave is accepted on standard KVM (which compares after its own runtime
    updates) but not on kvm_pvm, which rewrote it: a restore must use KVM_GET_CPUID2's table."""
    supported = kvm.get_supported_cpuid()
    m = machine("checkpoint")
    assert isinstance(m.run(timeout=10), Sync)
    with pytest.raises(KvmError, match="already run with a different CPUID") as ei:
        m.vcpu.set_cpuid2(supported.guest_for_xcr0(0x3).with_xsave_enabled())
    assert ei.value.ioctl == "KVM_SET_CPUID2" and ei.value.errno == errno.EINVAL
    m.vcpu.set_cpuid2(m.vcpu.get_cpuid2())
    given = m.vcpu.cpuid  # what vmm gave KVM_SET_CPUID2 (with this vCPU's APIC ID)
    if is_pvm() and given != m.vcpu.get_cpuid2():  # kvm_pvm rewrote it: the original is refused now
        with pytest.raises(KvmError):
            m.vcpu.set_cpuid2(given)
    else:
        m.vcpu.set_cpuid2(given)
    assert isinstance(m.run(timeout=10), Done)


# -- `vmm cpuid` ----------------------------------------------------------------------------------

def vmm(*args):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True, text=True,
                          timeout=60)


def same_host_cpuid(a, b):
    """Equal but for the APIC ID of the host CPU KVM_GET_SUPPORTED_CPUID ran on (leaf 1
    EBX[31:24], leaf 0xB/0x1F EDX): two processes on different CPUs see different ones there."""
    a, b = a.copy(), b.copy()
    for t in (a, b):
        for e in t:
            if e.function == 1:
                e.ebx &= 0x00FFFFFF
            if e.function in (0xB, 0x1F):
                e.edx = 0
    return a == b


def test_cli_cpuid_supported_round_trips_through_a_dump(kvm, tmp_path):
    """`vmm cpuid` prints KVM_GET_SUPPORTED_CPUID as a dump; `--file` reads it back to the same
    table; `--json` says the same; `--feature` answers from it."""
    supported = kvm.get_supported_cpuid()
    r = vmm("cpuid")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("# KVM_GET_SUPPORTED_CPUID on /dev/kvm\nCPUID 00000000: ")
    xcr0 = supported.xcr0_supported()
    assert f"# XCR0 supported {xcr0:#x} (" in r.stdout
    dump = tmp_path / "supported.txt"
    dump.write_text(r.stdout)
    printed = CpuidTable.from_dump(dump)
    assert same_host_cpuid(printed, supported)

    d = json.loads(vmm("cpuid", "--file", str(dump), "--json").stdout)
    assert CpuidTable.from_json(d) == printed
    assert d["xcr0_supported"] == hex(xcr0) and d["features"] == sorted(supported.features())
    again = CpuidTable.from_json(json.loads(vmm("cpuid", "--supported", "--json").stdout))
    assert same_host_cpuid(again, supported)

    r = vmm("cpuid", "--feature", "avx512f", "--feature", "FXSR")
    assert r.stdout.splitlines() == [
        f"AVX512F          CPUID.(0x7,0).EBX[16]  {'yes' if supported.has('AVX512F') else 'no'}",
        f"FXSR             CPUID.(0x1,0).EDX[24]  {'yes' if supported.has('FXSR') else 'no'}"]


@pytest.mark.kvm
def test_cli_cpuid_vcpu_shows_what_kvm_changed(tmp_path, kvm):
    """`vmm cpuid --vcpu checkpoint --xcr0 0x3`: KVM_GET_CPUID2 of the vCPU and how it differs from
    what vmm gave KVM_SET_CPUID2. On kvm_pvm leaf 0xD.0 EAX went from 0x3 to the host's supported
    XCR0 (e.g. 0xe7 on Zen 4); standard KVM keeps what it was given there.
    The --json output is a CPU file `vmm run --cpu` accepts."""
    supported = kvm.get_supported_cpuid().xcr0_supported()
    r = vmm("cpuid", "--vcpu", "checkpoint", "--xcr0", "0x3", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    leaf_d0 = [c for c in d["changed_by_kvm"] if (c["leaf"], c["subleaf"]) == ("0xd", 0)]
    if is_pvm() and supported & 0xFFFFFFFF != 0x3:
        assert leaf_d0[0]["registers"]["eax"] == ["0x3", hex(supported & 0xFFFFFFFF)]
        assert "# KVM changed " in vmm("cpuid", "--vcpu", "checkpoint", "--xcr0", "0x3").stdout
    elif not is_pvm():
        assert not leaf_d0 or "eax" not in leaf_d0[0]["registers"]
    cpu = tmp_path / "cpu.json"
    cpu.write_text(r.stdout)
    r = vmm("run", "checkpoint", "--cpu", str(cpu))
    assert r.returncode == 0 and r.stdout.endswith("done\n"), r.stdout + r.stderr


@pytest.mark.parametrize("args, message", [
    (("cpuid", "--feature", "AVX512X"), "unknown CPUID feature 'AVX512X'; did you mean AVX512F"),
    (("cpuid", "--supported", "--file", "x.txt"), "give one of --supported, --vcpu GUEST, --file DUMP"),
    (("cpuid", "--xcr0", "0x7"), "--xcr0 and --at-sync need --vcpu GUEST"),
    (("cpuid", "--vcpu", "checkpoint", "--xcr0", "avx-512"), "unknown XSAVE component 'avx-512'"),
])
def test_cli_cpuid_bad_input_fails_before_kvm(args, message):
    """Each refused before /dev/kvm is opened: the device given does not exist."""
    r = vmm(*args, "--device", "/nonexistent/kvm")
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_cli_cpuid_dump_with_garbage_names_the_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("CPUID 00000000: 00000010-68747541-444D4163-69746E65\nthis is not cpuid\n")
    r = vmm("cpuid", "--file", str(bad))
    assert r.returncode == 2
    assert f"{bad}:2: not a CPUID dump line: 'this is not cpuid'" in r.stderr
    bad.write_text('{"entries": [{"function": "0x0"}]}')
    r = vmm("cpuid", "--file", str(bad))
    assert r.returncode == 2 and "missing ['index', 'flags', 'eax', 'ebx', 'ecx', 'edx']" in r.stderr
