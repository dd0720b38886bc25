"""Kvm / Vm / Vcpu objects on real /dev/kvm."""

import errno
import os
import resource

import pytest

from vmm._bindings import lib
from vmm.errors import KvmError
from vmm.kvm import Kvm


def test_api_version_and_capabilities(kvm):
    assert kvm.get_api_version() == 12
    assert kvm.check_extension("KVM_CAP_USER_MEMORY") == 1
    assert kvm.get_vcpu_mmap_size() >= 4096
    assert kvm.check_extension(lib.KVM_CAP_XSAVE2) >= 4096


def test_msr_index_lists(kvm):
    msrs = kvm.get_msr_index_list()
    assert 0xC0000080 in msrs or 0x10 in msrs  # EFER or TSC: every x86 KVM saves these
    assert len(msrs) == len(set(msrs))


def test_vm_memory_and_vcpu_registers(kvm):
    with kvm.create_vm() as vm:
        mem = vm.add_memory(2 << 20)
        mem.write_u64(0x1000, 0x1122334455667788)
        assert vm.read(0x1000, 8) == bytes.fromhex("8877665544332211")
        vcpu = vm.create_vcpu()
        regs = vcpu.get_regs()
        regs.rax, regs.rip = 0xDEADBEEF, 0x1234
        vcpu.set_regs(regs)
        back = vcpu.get_regs()
        assert (back.rax, back.rip) == (0xDEADBEEF, 0x1234)
        assert vm.check_extension("KVM_CAP_XSAVE2") == vm.xsave2_size()
        with pytest.raises(ValueError, match="not backed by any memory slot"):
            vm.read(4 << 20, 8)


def test_missing_device_is_a_clear_error(tmp_path):
    with pytest.raises(KvmError) as ei:
        Kvm(str(tmp_path / "kvm"))
    e = ei.value
    assert e.errno == errno.ENOENT and e.ioctl == "open"
    assert "no KVM on this host" in str(e) and "ENOENT" in str(e)


def test_ioctl_failure_names_ioctl_errno_and_hint(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(KvmError) as ei:
            vm.create_vcpu(0)
            vm.create_vcpu(0)  # the same vCPU id twice
        assert ei.value.ioctl == "KVM_CREATE_VCPU" and ei.value.errno == errno.EEXIST
        assert "KVM_CREATE_VCPU failed: EEXIST" in str(ei.value)


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


def test_500_vms_leave_fds_and_rss_flat(kvm):
    def cycle(n):
        for _ in range(n):
            with kvm.create_vm() as vm:
                vm.add_memory(1 << 20)
                vm.create_vcpu()
    cycle(50)  # warm up allocator and caches
    fds, rss = _fds(), _rss_kib()
    cycle(500)
    assert _fds() == fds
    assert _rss_kib() - rss < 8 * 1024, "RSS grew by more than 8 MiB over 500 VMs"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
