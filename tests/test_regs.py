"""Registers by id on real KVM: x86 ONE_REG against KVM_GET/SET_MSRS (like the kernel's msrs_test)."""

import errno
import os

import pytest

from vmm import regs
from vmm._bindings import ffi, ioctl, lib
from vmm.errors import KvmError
from vmm.guest.runner import Done, Sync

MSR_TSC = 0x10
# MSRs a host may write with any canonical value and read back unchanged
WRITABLE = {0xC0000102: 0x0000_5678_9ABC_D000,   # KERNEL_GS_BASE
            0xC0000082: 0xFFFF_FFFF_8100_0000,   # LSTAR
            0xC0000083: 0xFFFF_FFFF_8100_1000,   # CSTAR
            0xC0000084: 0x4700,                  # SYSCALL_MASK
            0x174: 0x10, 0x175: 0x8000, 0x176: 0x9000}  # SYSENTER_CS/ESP/EIP


def test_cap_constant_matches_header():
    assert regs._KVM_CAP_ONE_REG == lib.KVM_CAP_ONE_REG


@pytest.fixture
def one_reg(machine):
    """x86 KVM_GET/SET_ONE_REG exists from Linux 6.18 (6.1 and 6.12 have none): tests of it skip on
    older kernels with that reason (VMM_REQUIRE=ONE_REG makes it a failure)."""
    from conftest import lacking
    if not regs.RegisterAccess.probe_one_reg(machine("sync").vcpu):
        lacking("ONE_REG", f"not in this kernel ({os.uname().release}): x86 KVM_GET/SET_ONE_REG arrived in "
                           "Linux 6.18; vmm uses KVM_GET/SET_MSRS here")


def test_the_access_path_is_discovered_and_named(machine):
    """RegisterAccess uses ONE_REG where this kernel has it and says so; else KVM_GET/SET_MSRS."""
    m = machine("sync")
    acc = regs.RegisterAccess(m.vcpu)
    assert acc.one_reg == regs.RegisterAccess.probe_one_reg(m.vcpu)
    assert acc.via == ("ONE_REG" if acc.one_reg else "KVM_GET/SET_MSRS")
    acc.set(regs.parse_reg("LSTAR"), 0xFFFF_FFFF_8100_0000)
    assert acc.get(regs.parse_reg("LSTAR")) == m.vcpu.get_msrs([0xC0000082])[0xC0000082] == 0xFFFF_FFFF_8100_0000


def test_one_reg_and_get_msrs_agree_on_every_listed_msr(one_reg, machine, kvm):
    m = machine("sync")
    assert isinstance(m.run(timeout=5), Sync)
    acc = regs.RegisterAccess(m.vcpu)
    assert acc.one_reg
    listed = kvm.get_msr_index_list()
    via_one_reg = acc.readable_msrs(listed)
    assert len(via_one_reg) >= len(listed) // 2
    via_msrs = m.vcpu.get_msrs(via_one_reg)
    for index, value in via_one_reg.items():
        if index == MSR_TSC:  # it ticks between the two reads
            assert 0 <= via_msrs[index] - value < 1 << 40
        else:
            assert via_msrs[index] == value, f"MSR 0x{index:x}"


def test_value_set_through_one_is_read_through_the_other(one_reg, machine):
    m = machine("sync")
    m.run(timeout=5)
    v = m.vcpu
    for index, value in WRITABLE.items():
        v.set_one_reg(regs.msr(index), value)
        assert v.get_msrs([index])[index] == value
        v.set_msrs({index: value ^ 0x1000})
        assert v.get_one_reg(regs.msr(index)) == value ^ 0x1000


def test_fallback_through_msrs_when_one_reg_is_not_used(machine):
    m = machine("sync")
    m.run(timeout=5)
    acc = regs.RegisterAccess(m.vcpu, prefer_one_reg=False)
    assert acc.via == "KVM_GET/SET_MSRS"
    acc.set(regs.parse_reg("KERNEL_GS_BASE"), 0xABC000)
    assert m.vcpu.get_msrs([0xC0000102])[0xC0000102] == 0xABC000
    with pytest.raises(KvmError, match="no x86 ONE_REG"):
        acc.get(regs.kvm_reg(regs.KVM_REG_GUEST_SSP))


def test_guest_ssp_is_einval_without_shadow_stacks(one_reg, machine):
    m = machine("sync")
    assert not m.cpuid.has("SHSTK")
    with pytest.raises(KvmError) as ei:
        regs.RegisterAccess(m.vcpu).get(regs.parse_reg("GUEST_SSP"))
    assert ei.value.errno == errno.EINVAL
    assert "SHSTK" in str(ei.value) and "GUEST_SSP" in str(ei.value)


def test_reg_list_protocol(one_reg, machine):
    """KVM_GET_REG_LIST asked with n=0: a kernel with x86 ONE_REG lists no MSRs (GUEST_SSP only with
    SHSTK), so without SHSTK it answers n=0 without E2BIG; get_reg_list() agrees."""
    v = machine("sync").vcpu
    probe = ffi.new("struct kvm_reg_list *", {"n": 0, "reg": 0})
    try:
        ioctl(v.fd, "KVM_GET_REG_LIST", probe)
        listed = 0
    except KvmError as e:
        assert e.errno == errno.E2BIG  # a kernel with registers to list says how many
        listed = probe.n
    assert len(v.get_reg_list()) == listed


def test_bad_register_input_is_refused_before_kvm():
    for text, msg in [("NOPE", "unknown register"), ("0x1_0000_0000", "neither"),
                      ("0x2050000200000000", "KVM_REG_SIZE_U256"),
                      ("0x2030100200000000", "reserved")]:
        with pytest.raises(regs.RegError, match=msg):
            regs.parse_reg(text)


def test_guest_observes_an_msr_the_host_set_by_id(machine):
    """Through ONE_REG where the kernel has it, else KVM_SET_MSRS: the guest reads what was set."""
    m = machine("msr-report")
    assert m.run(timeout=5) == Sync(0, 1)
    regs.RegisterAccess(m.vcpu).set(regs.msr(0xC0000102), 0x7EED_F00D_0000)
    seen = {}
    while isinstance(ev := m.run(timeout=10), Sync):
        seen[ev.value] = m.vm.read(0x300000 + 8 * len(seen), 8)
    assert isinstance(ev, Done)
    assert int.from_bytes(seen[0xC0000102], "little") == 0x7EED_F00D_0000
    assert "guest reads MSR 0x00000000c0000102 = 0x00007eedf00d0000" in m.console
